"""Generation: search algorithms on a small recurrent toy model (brute force as ground truth),
logits processors against hand-computed values, and the real model's cached decoding."""
import itertools
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "models"))
from tiny import fake_batch, tiny_cfg  # noqa: E402

from mmpretrain.config import GenerationConfig  # noqa: E402
from mmpretrain.generation import (  # noqa: E402
    CaptionState, _beam_search, apply_repetition_penalty, caption_context, decoder_logits, generate,
    generate_captions, generate_ids, top_k_top_p_filter,
)
from mmpretrain.models import build_model  # noqa: E402

V, EOS, BOS, PAD = 5, 3, 4, 4  # toy vocab: 0, 1, 2 real tokens, 3 = EOS, 4 = BOS/PAD (suppressed)


class ToyState:
    """Recurrent toy LM: logits depend on the whole prefix (not Markov)."""

    def __init__(self, n, seed=0, sharp=2.0):
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(8, 8, generator=g, dtype=torch.float64) * 0.8
        self.E = torch.randn(V, 8, generator=g, dtype=torch.float64)
        self.W = torch.randn(8, V, generator=g, dtype=torch.float64) * sharp
        self.h = torch.randn(n, 8, generator=g, dtype=torch.float64)  # per-row "context"

    def step(self, tokens):
        self.h = torch.tanh(self.h @ self.A + self.E[tokens])
        return self.h @ self.W

    def select(self, index):
        self.h = self.h.index_select(0, index)


def toy_seq_logprob(row_h0, seq, seed=0, sharp=2.0):
    """log p(seq) under the toy model with the suppressed ids removed (as generate does)."""
    st = ToyState(1, seed, sharp)
    st.h = row_h0.clone()[None]
    cur, total = BOS, 0.0
    for tok in seq:
        logits = st.step(torch.tensor([cur])).float()
        logits[:, BOS] = float("-inf")
        total += float(logits.log_softmax(-1)[0, tok])
        cur = tok
    return total


def _brute_force(h0, T, lp, sharp):
    best, best_seq = -math.inf, None
    cands = [list(b) + [EOS] for L in range(1, T + 1) for b in itertools.product(range(3), repeat=L - 1)]
    cands += [list(b) for b in itertools.product(range(3), repeat=T)]  # unfinished, stopped by max length
    for seq in cands:
        s = toy_seq_logprob(h0, seq, sharp=sharp) / len(seq) ** lp
        if s > best:
            best, best_seq = s, [t for t in seq if t != EOS]
    return best, best_seq


@pytest.mark.parametrize("lp", [0.0, 1.0])
def test_exhaustive_beam_search_finds_the_brute_force_optimum(lp):
    T, n, sharp = 4, 8, 0.7
    h0 = ToyState(n).h.clone()
    results = {}
    for k in (1, 2, 110):  # 110 beams hold every prefix (27 live x 4 tokens at most): exhaustive
        cfg = GenerationConfig(max_new_tokens=T, num_beams=k, length_penalty=lp)
        results[k] = _beam_search(ToyState(n, sharp=sharp), n, BOS, EOS, PAD, cfg, (BOS,), None)
    wrong = {1: 0, 2: 0}
    for i in range(n):
        best, best_seq = _brute_force(h0[i], T, lp, sharp)
        out = results[110]
        assert out.tokens[i, : out.lengths[i]].tolist() == best_seq, i
        assert float(out.scores[i]) == pytest.approx(best, abs=1e-4)
        for k in wrong:
            wrong[k] += results[k].tokens[i, : results[k].lengths[i]].tolist() != best_seq
            assert float(results[k].scores[i]) <= best + 1e-6  # never better than the optimum
    assert wrong[1] > 0  # narrow searches miss the optimum somewhere: the comparison has teeth


def test_beam_beats_or_ties_greedy_and_one_beam_is_greedy():
    n, T = 16, 6
    greedy = generate(ToyState(n, seed=3, sharp=0.7), n, BOS, EOS, PAD, GenerationConfig(max_new_tokens=T),
                      suppress=(BOS,))
    one = _beam_search(ToyState(n, seed=3, sharp=0.7), n, BOS, EOS, PAD,
                       GenerationConfig(max_new_tokens=T, num_beams=1, length_penalty=0.0), (BOS,), None)
    assert torch.equal(greedy.tokens, one.tokens) and torch.equal(greedy.lengths, one.lengths)
    torch.testing.assert_close(greedy.scores, one.scores.float(), rtol=1e-5, atol=1e-5)
    beam = generate(ToyState(n, seed=3, sharp=0.7), n, BOS, EOS, PAD,
                    GenerationConfig(max_new_tokens=T, num_beams=8, length_penalty=0.0), suppress=(BOS,))
    # wide beams find a sequence at least as likely as greedy's on every row, better on some
    assert (beam.scores >= greedy.scores - 1e-5).all()
    assert (beam.scores > greedy.scores + 1e-3).any()


def test_batched_equals_one_by_one():
    n, T = 5, 5
    for cfg in (GenerationConfig(max_new_tokens=T), GenerationConfig(max_new_tokens=T, num_beams=3)):
        full = generate(ToyState(n, seed=1), n, BOS, EOS, PAD, cfg, suppress=(BOS,))
        for i in range(n):
            st = ToyState(n, seed=1)
            st.select(torch.tensor([i]))
            one = generate(st, 1, BOS, EOS, PAD, cfg, suppress=(BOS,))
            assert full.tokens[i, : full.lengths[i]].tolist() == one.tokens[0, : one.lengths[0]].tolist()


def test_max_and_min_length_and_padding():
    n = 6
    out = generate(ToyState(n, seed=2), n, BOS, EOS, PAD, GenerationConfig(max_new_tokens=2), suppress=(BOS,))
    assert out.tokens.shape[1] <= 2 and (out.lengths <= 2).all()
    free = generate(ToyState(n, seed=2), n, BOS, EOS, PAD, GenerationConfig(max_new_tokens=8), suppress=(BOS,))
    assert (free.lengths < 8).any(), "toy model must emit EOS early for this test to mean something"
    out = generate(ToyState(n, seed=2), n, BOS, EOS, PAD, GenerationConfig(max_new_tokens=8, min_new_tokens=5),
                   suppress=(BOS,))
    assert (out.lengths >= 5).all()
    for i in range(n):  # padding after the end, never EOS / BOS inside
        row = out.tokens[i].tolist()
        assert EOS not in row[: out.lengths[i]] and BOS not in row[: out.lengths[i]]
        assert all(t == PAD for t in row[out.lengths[i]:])


def test_repetition_penalty_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [1.0, 1.0, -2.0, 0.0]])
    prev = torch.tensor([[0, 1, 0], [2, 3, 3]])
    out = apply_repetition_penalty(logits, prev, 2.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, -2.0, 0.5, 3.0], [1.0, 1.0, -4.0, 0.0]]))
    assert torch.equal(apply_repetition_penalty(logits, prev, 1.0), logits)
    # in generation: a strong penalty makes greedy avoid repeating tokens
    n = 8
    plain = generate(ToyState(n, seed=4, sharp=0.5), n, BOS, EOS, PAD, GenerationConfig(max_new_tokens=6),
                     suppress=(BOS, EOS))
    pen = generate(ToyState(n, seed=4, sharp=0.5), n, BOS, EOS, PAD,
                   GenerationConfig(max_new_tokens=6, repetition_penalty=50.0), suppress=(BOS, EOS))

    def repeats(g):
        return sum(len(r) - len(set(r[:3])) for r in (g.tokens[i, :3].tolist() for i in range(n)))

    assert repeats(pen) < repeats(plain)


def test_top_k_top_p_filter_hand_computed():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    keep = lambda x: torch.isfinite(x)[0].tolist()  # noqa: E731
    assert keep(top_k_top_p_filter(logits, top_k=2)) == [True, True, False, False, False]
    assert keep(top_k_top_p_filter(logits, top_p=0.5)) == [True, False, False, False, False]
    assert keep(top_k_top_p_filter(logits, top_p=0.6)) == [True, True, False, False, False]
    assert keep(top_k_top_p_filter(logits, top_p=0.86)) == [True, True, True, True, False]
    assert keep(top_k_top_p_filter(logits, top_k=3, top_p=0.99)) == [True, True, True, False, False]
    assert keep(top_k_top_p_filter(logits, top_p=0.01)) == [True, False, False, False, False]


def test_sampling_seeded_and_restricted():
    n = 64
    cfg = GenerationConfig(max_new_tokens=4, do_sample=True, seed=7)
    a = generate(ToyState(n, seed=5, sharp=0.5), n, BOS, EOS, PAD, cfg, suppress=(BOS,))
    b = generate(ToyState(n, seed=5, sharp=0.5), n, BOS, EOS, PAD, cfg, suppress=(BOS,))
    assert torch.equal(a.tokens, b.tokens)
    c = generate(ToyState(n, seed=5, sharp=0.5), n, BOS, EOS, PAD,
                 GenerationConfig(max_new_tokens=4, do_sample=True, seed=8), suppress=(BOS,))
    assert not torch.equal(a.tokens, c.tokens)
    greedy = generate(ToyState(n, seed=5, sharp=0.5), n, BOS, EOS, PAD, GenerationConfig(max_new_tokens=4),
                      suppress=(BOS,))
    k1 = generate(ToyState(n, seed=5, sharp=0.5), n, BOS, EOS, PAD,
                  GenerationConfig(max_new_tokens=4, do_sample=True, top_k=1, seed=3), suppress=(BOS,))
    assert torch.equal(k1.tokens, greedy.tokens)
    # first token with top_k=2: always one of the two most likely
    st = ToyState(n, seed=5, sharp=0.5)
    first = st.step(torch.full((n,), BOS)).float()
    first[:, BOS] = float("-inf")
    top2 = first.topk(2, -1).indices
    s2 = generate(ToyState(n, seed=5, sharp=0.5), n, BOS, EOS, PAD,
                  GenerationConfig(max_new_tokens=1, do_sample=True, top_k=2, seed=11), suppress=(BOS,))
    tok0 = torch.where(s2.lengths > 0, s2.tokens[:, 0] if s2.tokens.shape[1] else torch.full((n,), EOS),
                       torch.full((n,), EOS))
    assert all(int(t) in top2[i].tolist() for i, t in enumerate(tok0))


# ----------------------------------------------------------------------------- real model


def _model(seed=0):
    cfg = tiny_cfg()
    torch.manual_seed(seed)
    return cfg, build_model(cfg, 259).eval()


def test_cached_decoding_matches_full_forward():
    cfg, model = _model()
    b = fake_batch(cfg, 3)
    with torch.no_grad():
        ctx, mask = caption_context(model, {"image": b.inputs["image"], "audio": b.inputs["audio"]},
                                    {"audio": torch.tensor([True, False, True])})
        prefix = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(0))
        prefix[:, 0] = 257
        full = decoder_logits(model, prefix, ctx, mask)  # (3, 7, V)
        st = CaptionState(model, ctx, mask)
        for t in range(7):
            torch.testing.assert_close(st.step(prefix[:, t]), full[:, t], rtol=1e-4, atol=1e-5)


def test_real_model_batched_captions_equal_single():
    cfg, model = _model(1)
    b = fake_batch(cfg, 4)
    gcfg = GenerationConfig(max_new_tokens=6, num_beams=2)
    from mmpretrain.data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    batched = generate_captions(model, tok, {"image": b.inputs["image"]}, cfg=gcfg)
    single = [generate_captions(model, tok, {"image": b.inputs["image"][i: i + 1]}, cfg=gcfg)[0] for i in range(4)]
    assert batched == single
    ids = generate_ids(model, tok.bos_id, tok.eos_id, tok.pad_id, {"audio": b.inputs["audio"]},
                       cfg=GenerationConfig(max_new_tokens=100))
    assert ids.tokens.shape[1] <= cfg.data.text_max_len - 1  # capped by the text context


def test_model_generate_method_and_sampling_on_real_model():
    cfg, model = _model(2)
    b = fake_batch(cfg, 3)
    a = model.generate({"image": b.inputs["image"]}, bos_id=257, eos_id=258, pad_id=256, max_new_tokens=6, num_beams=2)
    ref = generate_ids(model, 257, 258, 256, {"image": b.inputs["image"]},
                       cfg=GenerationConfig(max_new_tokens=6, num_beams=2))
    assert torch.equal(a.tokens, ref.tokens)
    aud = {"audio": b.inputs["audio"]}
    s1 = model.generate(aud, bos_id=257, eos_id=258, pad_id=256, max_new_tokens=6, do_sample=True,
                        top_p=0.9, temperature=1.5, seed=5)
    s2 = model.generate(aud, bos_id=257, eos_id=258, pad_id=256, max_new_tokens=6, do_sample=True,
                        top_p=0.9, temperature=1.5, seed=5)
    assert torch.equal(s1.tokens, s2.tokens)
    for i in range(3):  # BOS and PAD are never generated
        assert not set(s1.tokens[i, : s1.lengths[i]].tolist()) & {256, 257}


def test_decoding_and_training_share_the_block_forward():
    """One forward path: changing one Block's MLP changes both the training caption logits and what
    cached decoding generates (a re-implemented decoding path would not notice)."""
    cfg, model = _model(3)
    b = fake_batch(cfg, 3)
    tok_ids = dict(bos_id=257, eos_id=258, pad_id=256, max_new_tokens=8)
    with torch.no_grad():
        logits_before = model(b).caption.logits.clone()
        gen_before = model.generate({"image": b.inputs["image"]}, **tok_ids)
        for blk in (model.text.encoder.blocks[0], model.decoder.encoder.blocks[0]):
            old = blk.mlp
            blk.mlp = torch.nn.Sequential(old, torch.nn.Tanh(), torch.nn.Linear(old[-1].out_features,
                                                                                old[-1].out_features))
            torch.nn.init.normal_(blk.mlp[-1].weight, std=2.0)
            logits_after = model(b).caption.logits
            gen_after = model.generate({"image": b.inputs["image"]}, **tok_ids)
            assert not torch.allclose(logits_before, logits_after), "training logits ignored the new MLP"
            # the generated sequences' log-probabilities move (their argmax tokens may by chance not)
            assert not torch.allclose(gen_before.scores, gen_after.scores), "decoding ignored the new MLP"
            # and decoding still equals the training forward's next-token argmax at every step
            st_ctx = caption_context(model, {"image": b.inputs["image"]})
            prefix = torch.cat([torch.full((3, 1), 257), gen_after.tokens[:, :4].clamp(max=255)], 1)
            full = decoder_logits(model, prefix, *st_ctx)
            st = CaptionState(model, *st_ctx)
            for t in range(prefix.shape[1]):
                torch.testing.assert_close(st.step(prefix[:, t]), full[:, t], rtol=1e-4, atol=1e-5)
            blk.mlp = old
