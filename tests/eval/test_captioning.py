"""Captioning metrics on hand-computed cases: BLEU (brevity penalty, effective order), CIDEr-D
(idf and missing n-gram orders), exact match, attribute accuracy."""
import math

import pytest

from mmpretrain.eval.captioning import (
    attribute_accuracy, bleu, caption_metrics, cider, demo_attribute_groups, find_attribute, normalize_caption,
)


def test_bleu_hand_computed():
    assert bleu(["a b c d e f"], [["a b c d e f"]]) == pytest.approx(100.0)
    # all n-gram precisions 1, hypothesis 4 vs reference 6 tokens: BP = exp(1 - 6/4)
    assert bleu(["a b c d"], [["a b c d e f"]]) == pytest.approx(100 * math.exp(-0.5))
    # three-word captions have no 4-grams: effective order keeps perfect captions at 100, not 0
    assert bleu(["a red circle", "a blue square"], [["a red circle"], ["a blue square"]]) == pytest.approx(100.0)
    # unigrams 2/3, bigrams 1/2, trigrams 0/1 -> exp smoothing 1/(2 * 1); no 4-grams (order 3):
    # BLEU = (2/3 * 1/2 * 1/2) ** (1/3)
    assert bleu(["a red square"], [["a red circle"]]) == pytest.approx(100 * (2 / 3 * 1 / 2 * 1 / 2) ** (1 / 3))
    # the best of several references counts
    assert bleu(["a b c d"], [["x y z w", "a b c d"]]) == pytest.approx(100.0)


def test_cider_hand_computed():
    pytest.importorskip("pycocoevalcap")
    # "a" occurs in both references: idf = log(2/2) = 0, so it carries no weight; the other
    # uni- and bigrams match exactly (cosine 1), trigrams too, 4-grams do not exist (cosine 0):
    # score = 10 * (1 + 1 + 1 + 0) / 4 = 7.5 per sample
    preds = ["a red circle", "a blue square"]
    assert cider(preds, [["a red circle"], ["a blue square"]]) == pytest.approx(7.5)
    assert cider(["x y z", "u v w"], [["a red circle"], ["a blue square"]]) == pytest.approx(0.0)
    # normalization: case and punctuation do not matter
    assert cider(["A red circle.", "a BLUE square!"], [["a red circle"], ["a blue square"]]) == pytest.approx(7.5)


def test_caption_metrics_and_exact_match():
    m = caption_metrics(["A red circle.", "a blue circle"], [["a red circle"], ["a blue square", "a blue circle"]])
    assert m["exact_match"] == 1.0 and m["num_samples"] == 2
    m = caption_metrics(["a red circle", "a green square"], [["a red circle"], ["a blue square"]])
    assert m["exact_match"] == 0.5
    with pytest.raises(ValueError):
        caption_metrics(["x"], [])


def test_attributes():
    g = demo_attribute_groups("audio")
    assert find_attribute("pulsed beeps at very high pitch", g["pitch"]) == "very high"
    assert find_attribute("pulsed beeps at high pitch", g["pitch"]) == "high"
    assert find_attribute("a low and high pitch", g["pitch"]) is None  # ambiguous
    assert normalize_caption(" A  buzzy Square-wave,  tone! ") == "a buzzy square-wave tone"
    acc = attribute_accuracy(
        ["pulsed beeps at high pitch", "a smooth sine tone at low pitch", "a bright sawtooth tone at"],
        ["pulsed beeps at very high pitch", "a smooth sine tone at low pitch", "a bright sawtooth tone at medium pitch"],
        g)
    assert acc == {"timbre": 1.0, "pitch": pytest.approx(1 / 3), "all": pytest.approx(1 / 3)}
    gi = demo_attribute_groups("image")
    acc = attribute_accuracy(["a red circle", "a red square", "a square"], ["a red circle", "a blue square", "a red square"], gi)
    assert acc == {"colour": pytest.approx(1 / 3), "shape": 1.0, "all": pytest.approx(1 / 3)}
