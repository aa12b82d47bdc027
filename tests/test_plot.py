"""mmpretrain-plot: the series drawn are exactly the runs' metrics, read back from the HTML's JSON
block and the PNG's text chunk; truncated lines are skipped and counted; bad paths are named."""
import json
import re
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402

from mmpretrain import plot  # noqa: E402


def _write(run: Path, records, tail: str = "") -> Path:
    run.mkdir(parents=True)
    with open(run / "metrics.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.write(tail)
    return run


def _train(step, loss, it, at, lr, sps, wait, st, t_it=0.07, t_at=0.07, caption=None, pairs_at=8.0):
    r = {"kind": "train", "step": step, "samples_seen": step * 16, "loss/image_text": it, "loss/audio_text": at,
         "pairs/image_text": 16.0, "pairs/audio_text": pairs_at,
         "loss/contrastive": it + at if isinstance(at, float) else "NaN",
         "temperature/image_text": t_it, "temperature/audio_text": t_at, "loss": loss, "step_time": st,
         "data_wait": wait, "nonfinite_steps": 0, "lr": lr, "grad_norm": 1.5, "samples_per_s": sps,
         "data/per_source": {"demo": step * 8}, "time": 1.0 + step}
    if caption is not None:
        r.update({"loss/caption": caption, "loss/caption_image": caption + 0.5, "caption/token_acc": 0.1})
    return r


def _eval(step, r1, r5, zs=None):
    r = {"kind": "eval", "step": step, "image_to_text/R@1": r1, "image_to_text/R@5": r5,
         "image_to_text/median_rank": 3.0, "text_to_image/R@1": r1 / 2, "text_to_image/R@5": r5 / 2, "chance": 0.1}
    if zs is not None:
        r["zeroshot/image/accuracy"] = zs
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot")
    a = _write(root / "alpha", [
        _eval(0, 0.1, 0.3, zs=0.05),
        _train(10, 9.0, 4.0, 4.5, 1e-3, 100.0, 0.01, 0.5, caption=2.5, pairs_at=0.0),  # no audio-text pair
        _train(20, 8.0, 3.5, 4.0, 9e-4, 110.0, 0.02, 0.4, caption=2.0),
        {"kind": "budget", "step": 20, "total_steps": 30, "step_s": 0.4},
        # a resumed run logs step 20 again: the later record wins
        _train(20, 7.5, 3.25, 3.75, 8e-4, 120.0, 0.03, 0.45, caption=1.75, t_it=0.06),
        _train(30, 7.0, 3.0, "NaN", 5e-4, 130.0, 0.04, 0.35, caption=1.5, t_it=0.05, t_at=0.065),
        _eval(30, 0.5, 0.75, zs=0.25),
    ])
    b = _write(root / "beta", [
        _train(5, 6.0, 2.0, 2.5, 2e-3, 50.0, 0.1, 1.0),
        _eval(15, 0.25, 0.5),
        _train(15, 5.0, 1.5, 2.0, 1e-3, 55.0, 0.2, 1.5),
    ], tail='{"kind": "train", "step": 20, "loss": 4.')  # cut short by a crash
    return root, a, b


def _by_key(series):
    return {(p["id"], s["run"], s["name"]): (s["steps"], s["values"]) for p in series["panels"] for s in p["series"]}


EXPECTED = {
    ("loss", "alpha", "total"): ([10, 20, 30], [9.0, 7.5, 7.0]),
    ("loss", "beta", "total"): ([5, 15], [6.0, 5.0]),
    ("loss", "alpha", "contrastive"): ([10, 20], [8.5, 7.0]),  # step 30: "NaN" (a non-finite term)
    ("loss", "beta", "contrastive"): ([5, 15], [4.5, 3.5]),
    ("loss_pairs", "alpha", "image_text"): ([10, 20, 30], [4.0, 3.25, 3.0]),
    ("loss_pairs", "beta", "image_text"): ([5, 15], [2.0, 1.5]),
    ("loss_pairs", "alpha", "audio_text"): ([20], [3.75]),  # step 10: no pair; step 30: NaN
    ("loss_pairs", "beta", "audio_text"): ([5, 15], [2.5, 2.0]),
    ("caption_loss", "alpha", "all"): ([10, 20, 30], [2.5, 1.75, 1.5]),
    ("caption_loss", "alpha", "image"): ([10, 20, 30], [3.0, 2.25, 2.0]),
    ("temperature", "alpha", "image_text"): ([10, 20, 30], [0.07, 0.06, 0.05]),
    ("temperature", "beta", "image_text"): ([5, 15], [0.07, 0.07]),
    ("temperature", "alpha", "audio_text"): ([10, 20, 30], [0.07, 0.07, 0.065]),
    ("temperature", "beta", "audio_text"): ([5, 15], [0.07, 0.07]),
    ("lr", "alpha", "lr"): ([10, 20, 30], [1e-3, 8e-4, 5e-4]),
    ("lr", "beta", "lr"): ([5, 15], [2e-3, 1e-3]),
    ("throughput", "alpha", "samples/s"): ([10, 20, 30], [100.0, 120.0, 130.0]),
    ("throughput", "beta", "samples/s"): ([5, 15], [50.0, 55.0]),
    ("data_wait", "alpha", "data wait"): ([10, 20, 30], [0.01, 0.03, 0.04]),
    ("data_wait", "beta", "data wait"): ([5, 15], [0.1, 0.2]),
    ("data_wait", "alpha", "step time"): ([10, 20, 30], [0.5, 0.45, 0.35]),
    ("data_wait", "beta", "step time"): ([5, 15], [1.0, 1.5]),
    ("recall/image_to_text", "alpha", "R@1"): ([0, 30], [0.1, 0.5]),
    ("recall/image_to_text", "beta", "R@1"): ([15], [0.25]),
    ("recall/image_to_text", "alpha", "R@5"): ([0, 30], [0.3, 0.75]),
    ("recall/image_to_text", "beta", "R@5"): ([15], [0.5]),
    ("recall/text_to_image", "alpha", "R@1"): ([0, 30], [0.05, 0.25]),
    ("recall/text_to_image", "beta", "R@1"): ([15], [0.125]),
    ("recall/text_to_image", "alpha", "R@5"): ([0, 30], [0.15, 0.375]),
    ("recall/text_to_image", "beta", "R@5"): ([15], [0.25]),
    ("zeroshot", "alpha", "image"): ([0, 30], [0.05, 0.25]),
}


def _check(series, runs):
    _, a, b = runs
    assert series["format"] == plot.FORMAT
    assert [(r["label"], r["path"], r["records"], r["skipped_lines"]) for r in series["runs"]] == [
        ("alpha", str(a), 7, 0), ("beta", str(b), 3, 1)]
    assert _by_key(series) == EXPECTED
    assert [p["id"] for p in series["panels"]] == [
        "loss", "loss_pairs", "caption_loss", "temperature", "lr", "throughput", "data_wait",
        "recall/image_to_text", "recall/text_to_image", "zeroshot"]


def test_html_embeds_exact_series_self_contained(runs, tmp_path, capsys):
    _, a, b = runs
    out = tmp_path / "report.html"
    assert plot.main([str(a), str(b), "--out", str(out)]) == 0
    io = capsys.readouterr()
    assert f"wrote {out}" in io.out
    # the truncated last line of beta: skipped, counted, named with its line number
    assert re.search(rf"{re.escape(str(b / 'metrics.jsonl'))}: skipped 1 line\(s\).*line 4", io.err), io.err
    _check(plot.read_series(str(out)), runs)
    text = out.read_text()
    assert text.count("<svg") == 10  # one inline figure per panel with data
    ids = re.findall(r'\bid="([^"]+)"', text)  # ten figures on one page: no id twice, every reference found
    assert len(ids) == len(set(ids)) and set(re.findall(r'(?:url\(#|href="#)([^)"]+)', text)) <= set(ids)
    # nothing fetched: no external script, stylesheet, image or URL besides the SVG namespaces
    assert not re.search(r"<script[^>]*\bsrc=|<link\b|<img\b|@import|url\(http", text)
    assert set(re.findall(r"https?://[^\s\"'<>]+", text)) <= {"http://www.w3.org/2000/svg",
                                                              "http://www.w3.org/1999/xlink"}


def test_png_is_an_image_carrying_the_series(runs, tmp_path, capsys):
    _, a, b = runs
    out = tmp_path / "report.png"
    assert plot.main([str(a), str(b), "--out", str(out)]) == 0
    with Image.open(out) as im:
        im.verify()  # a whole, well-formed PNG (chunks and CRCs)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 500 and im.size[1] > 500
        assert im.size == (3 * 468, 4 * 324)  # 10 panels: 3 columns x 4 rows of 5.2 x 3.6 in at 90 dpi
        meta = json.loads(im.text[plot.SERIES_ID])
    _check(meta, runs)
    assert plot.read_series(str(out)) == meta


def test_only_panels_with_data_and_default_out(runs, capsys):
    _, _, b = runs
    assert plot.main([str(b / "metrics.jsonl")]) == 0  # a metrics file named directly; out: beside it
    assert f"wrote {b / 'report.html'}" in capsys.readouterr().out
    ids = [p["id"] for p in plot.read_series(str(b / "report.html"))["panels"]]
    assert "caption_loss" not in ids and "zeroshot" not in ids and ids[0] == "loss"


def test_labels_disambiguate_same_names(tmp_path):
    paths = [tmp_path / "x" / "run" / "metrics.jsonl", tmp_path / "y" / "run" / "metrics.jsonl"]
    assert plot._labels(paths) == ["x/run", "y/run"]
    assert plot._labels([paths[0], paths[0]]) == ["run", "run#2"]


@pytest.mark.parametrize("case", ["missing", "no_metrics", "empty", "garbage", "no_series", "bad_suffix"])
def test_clear_errors_name_the_path(tmp_path, capsys, case):
    run = tmp_path / "run"
    if case != "missing":
        run.mkdir()
    if case in ("empty", "garbage", "no_series", "bad_suffix"):
        body = {"empty": "", "garbage": "not json\n{\"step\": 1\n",
                "no_series": json.dumps({"kind": "budget", "step": 3}) + "\n",
                "bad_suffix": json.dumps({"kind": "train", "step": 3, "loss": 1.0}) + "\n"}[case]
        (run / "metrics.jsonl").write_text(body)
    out = tmp_path / ("r.svg" if case == "bad_suffix" else "r.html")
    assert plot.main([str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "mmpretrain-plot: error:" in err
    named = {"missing": f"run directory not found: {run}", "no_metrics": f"no metrics.jsonl in {run}",
             "empty": f"{run / 'metrics.jsonl'} holds no records",
             "garbage": f"{run / 'metrics.jsonl'} holds only 2 line(s) that are not JSON",
             "no_series": f"no train or eval metrics to plot in {run / 'metrics.jsonl'}",
             "bad_suffix": f"--out {out}: the suffix chooses"}[case]
    assert named in err, err
    assert not out.exists()
