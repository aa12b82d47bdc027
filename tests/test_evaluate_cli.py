"""`python -m mmpretrain.evaluate` end to end on tiny demo shards and an exported tiny model:
a table on stdout (JSON with --json), every task present, figures equal to a direct computation, and two ranks
giving the same result as one."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from trainkit import TINY_CONFIG, free_port  # noqa: E402

# the tiny test config (it has a caption decoder); loaders in this process, fewer captions, and
# text long enough to hold the demo's whole captions (the references below end in "... pitch")
OV = ["data.num_workers=0", "data.text_max_len=48", "eval.caption_samples=6", "eval.generation.max_new_tokens=8",
      "eval.templates=['{}','a photo of {}']"]


@pytest.fixture(scope="module")
def setup(tiny_data, tmp_path_factory):
    from safetensors.torch import save_file

    from mmpretrain.config import load_config, to_dict
    from mmpretrain.data.tokenizer import ByteTokenizer
    from mmpretrain.models import build_model

    root = tmp_path_factory.mktemp("evalcli")
    data = tiny_data
    # the run's train shards: the linear probe's default training set
    cfg = load_config(str(TINY_CONFIG), [*OV, f"data.train=[{{name: tiny, urls: '{data}/train/train-{{000000..000003}}.tar'}}]"])
    torch.manual_seed(0)
    model = build_model(cfg, 259).eval()
    export = root / "export"
    export.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(export / "model.safetensors"))
    (export / "config.json").write_text(json.dumps(to_dict(cfg)))
    ByteTokenizer().save(str(export))
    return {"data": str(data / "eval" / "eval-000000.tar"), "export": str(export), "root": root}


def _env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    e.pop("TRITON_INTERPRET", None)
    return e


def test_cli_prints_json_with_every_task(setup):
    out = subprocess.run([sys.executable, "-m", "mmpretrain.evaluate", "--checkpoint", setup["export"], "--data",
                          setup["data"], "--caption-attributes", "demo", "--batch-size", "16", "--json"],
                         capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)  # stdout is pure JSON
    assert res["num_samples"] == 64
    for d in ("image_to_text", "text_to_image", "audio_to_text", "text_to_audio", "image_to_audio", "audio_to_image"):
        r = res["retrieval"]
        assert 0 <= r[f"{d}/R@1"] <= r[f"{d}/R@5"] <= r[f"{d}/R@10"] <= 1 and r[f"{d}/median_rank"] >= 1
        assert res["retrieval_instance"][f"{d}/num_queries"] == 64
    for m in ("image", "audio"):
        z = res["zeroshot"][m]
        assert len(z["confusion_matrix"]) == 16 and sum(map(sum, z["confusion_matrix"])) == 64
        assert abs(z["accuracy"] - sum(z["confusion_matrix"][i][i] for i in range(16)) / 64) < 1e-12
        c = res["captioning"][m]
        assert c["num_samples"] == 6 and {"BLEU", "exact_match", "attribute_accuracy"} <= set(c)
    assert res["zeroshot"]["templates"] == ["{}", "a photo of {}"]
    assert set(res["linear_probe"]) >= {"image", "audio", "image+audio/concat", "image+audio/attention", "split"}
    split = res["linear_probe"]["split"]  # trained on the config's train shards, scored on all of --data
    assert split["kind"] == "train_shards" and split["num_train"] == 256 and split["num_test"] == 64
    # references are the json per-modality captions of the same samples
    ex = res["captioning"]["audio"]["examples"][0]
    assert " pitch" in ex["reference"] and ex["key"].startswith("eval_")
    bad = subprocess.run([sys.executable, "-m", "mmpretrain.evaluate", "--checkpoint", str(setup["root"] / "nope"),
                          "--data", setup["data"]], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_cli_refuses_probe_without_disjoint_training_items(setup):
    """No train shards and no json group field: the probe is refused with a message naming the
    options, instead of training on half of eval items that may repeat."""
    out = subprocess.run([sys.executable, "-m", "mmpretrain.evaluate", "--checkpoint", setup["export"], "--data",
                          setup["data"], "--tasks", "linear_probe", "--probe-group-key", "no_such_field",
                          "data.train=[]", "--json"], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    msg = json.loads(out.stdout)["linear_probe"]["refused"]
    assert "--probe-train" in msg and "json 'no_such_field'" in msg and "data.train" in msg
    assert "warning: linear probe refused" in out.stderr


def test_overrides_are_never_taken_as_templates():
    """`key=value` is a config override wherever it stands (as in mmpretrain.train): a list option
    such as --templates stops before it; the value of a one-value option stays that option's."""
    from mmpretrain import evaluate, submit, train

    a = evaluate.parse_args(["--checkpoint", "c", "--data", "d", "--templates", "a photo of {}",
                             "data.num_workers=0"])
    assert a.templates == ["a photo of {}"] and a.overrides == ["data.num_workers=0"]
    a = evaluate.parse_args(["--checkpoint", "c", "eval.caption_samples=2", "--data", "d", "--templates", "{}",
                             "a {} sound", "data.train=[{name: a, urls: 'x y.tar'}]", "--out", "x=y.json",
                             "--tasks=retrieval"])
    assert a.templates == ["{}", "a {} sound"] and a.out == "x=y.json" and a.tasks == "retrieval"
    assert a.overrides == ["eval.caption_samples=2", "data.train=[{name: a, urls: 'x y.tar'}]"]
    assert evaluate.parse_args(["--check", "c", "--data", "d=e"]).data == "d=e"  # an abbreviated option keeps its value
    t = train.parse_args(["--config", "a=b.yaml", "optim.lr=3e-4", "train.steps=3"])
    assert t.config == "a=b.yaml" and t.overrides == ["optim.lr=3e-4", "train.steps=3"]
    s = submit.build_parser()
    assert submit.parse_cli(s, ["--config", "c.yaml", "--setup", "X=1", "train.steps=3"]).setup == ["X=1"]


def test_results_table_lays_out_every_task():
    """Skipped / refused tasks say why; probe and caption rows carry their figures in aligned columns."""
    from mmpretrain.eval.results_table import format_results

    res = {"checkpoint": "exp", "data": "d.tar", "num_samples": 4,
           "retrieval": {"image_to_text/R@1": 0.5, "image_to_text/R@5": 1.0, "image_to_text/median_rank": 1.5,
                         "image_to_text/num_queries": 4, "image_to_text/chance": 0.25, "chance": 0.25},
           "zeroshot": {"skipped": "no class names"},
           "linear_probe": {"image": {"accuracy": 0.75, "macro_recall": 0.5, "macro_f1": 0.4, "num_samples": 4,
                                      "num_train": 8},
                            "image+audio/concat": {"accuracy": 1.0, "macro_recall": 1.0, "macro_f1": 1.0,
                                                   "num_samples": 4, "num_train": 8},
                            "split": {"kind": "train_shards", "description": "trained on data.train"}},
           "captioning": {"image": {"BLEU": 0.1234, "exact_match": 0.0, "num_samples": 6,
                                    "attribute_accuracy": {"colour": 0.5, "all": 0.25},
                                    "examples": [{"prediction": "a red\nsquare", "reference": "a red circle"}]},
                          "audio": {"BLEU": 0.2, "exact_match": 0.5, "num_samples": 6}}}
    lines = format_results(res).splitlines()
    assert lines[:3] == ["checkpoint  exp", "data        d.tar", "samples     4"]
    i = lines.index("retrieval (a hit is the paired item)")
    assert lines[i + 1:i + 3] == ["direction        R@1    R@5  median rank  queries  chance R@1",
                                  "image_to_text  0.500  1.000          1.5        4       0.250"]
    assert "zero-shot: skipped: no class names" in lines
    i = lines.index("linear probe")
    assert lines[i + 1:i + 5] == ["features            accuracy  macro recall  macro F1  train  test",
                                  "image                  0.750         0.500     0.400      8     4",
                                  "image+audio/concat     1.000         1.000     1.000      8     4",
                                  "  trained on data.train"]
    i = lines.index("captioning")
    assert lines[i + 1:i + 5] == ["modality   BLEU  exact match  attributes  samples",
                                  "image     0.123        0.000       0.250        6",
                                  "audio     0.200        0.500           -        6",
                                  '  image: "a red\\nsquare"  (reference "a red circle")']  # one line per example
    assert format_results({"linear_probe": {"refused": "no split"}}) == "linear probe: refused: no split\n"


def test_main_prints_a_table_and_json_on_request(setup, tmp_path, capsys):
    """In process: the readable table by default (numbers as in the JSON, aligned columns), the JSON
    with --json, --out in both cases; an override after --templates applies and is not a template."""
    from mmpretrain import evaluate

    common = ["--checkpoint", setup["export"], "--data", setup["data"], "--tasks", "retrieval,zeroshot",
              "--templates", "a photo of {}", "data.num_workers=0"]
    assert evaluate.main([*common, "--out", str(tmp_path / "a.json")]) == 0
    table = capsys.readouterr().out
    res = json.loads((tmp_path / "a.json").read_text())
    assert res["zeroshot"]["templates"] == ["a photo of {}"]
    lines = table.splitlines()
    row = next(ln for ln in lines if ln.startswith("image_to_text "))
    r = res["retrieval"]
    assert row.split()[1:4] == [f"{r[f'image_to_text/R@{k}']:.3f}" for k in (1, 5, 10)]
    head = next(ln for ln in lines if ln.startswith("direction "))  # the class-level retrieval table's

    def ends(line):  # where each number column ends (cells are two or more spaces apart; names left-aligned)
        return [m.end() for m in re.finditer(r"\S+(?: \S+)*", line)][1:]

    assert head.split() == ["direction", "R@1", "R@5", "R@10", "median", "rank", "queries", "chance", "R@1"]
    assert lines[lines.index(head) + 1] == row  # pair order: image_to_text first
    assert ends(row) == ends(head) == ends(lines[lines.index(row) + 1]) and len(ends(row)) == 6
    z = res["zeroshot"]["image"]
    zrow = next(ln for ln in lines if ln.startswith("image ") and f"{z['accuracy']:.3f}" in ln)
    assert zrow.split()[1:4] == [f"{z[k]:.3f}" for k in ("accuracy", "macro_recall", "macro_f1")]
    assert not table.lstrip().startswith("{")
    assert evaluate.main([*common, "--json", "--out", str(tmp_path / "b.json")]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((tmp_path / "b.json").read_text())
    # an override refused as training refuses it
    assert evaluate.main([*common, "data.num_workerz=0"]) == 2
    assert "override 'data.num_workerz=0': config key 'data.num_workerz' is invalid" in capsys.readouterr().err


def test_figures_equal_direct_computation(setup):
    from mmpretrain.data.pipeline import build_eval_loader
    from mmpretrain.eval.retrieval import retrieval_metrics
    from mmpretrain.eval.suite import EvalOptions, EvalSuite
    from mmpretrain.evaluate import load_for_eval

    model, cfg, tok = load_for_eval(setup["export"])
    res = EvalSuite(model, cfg, tok).run(setup["data"], EvalOptions(tasks=("retrieval",), batch_size=7))
    img, txt, lab = [], [], []
    with torch.no_grad():
        for b in build_eval_loader(setup["data"], cfg, tok, batch_size=64):
            img.append(model.encode_image(b.inputs["image"]))
            txt.append(model.encode_text(b.inputs["text"], b.text_len))
            lab.append(b.labels)
    img, txt, lab = torch.cat(img), torch.cat(txt), torch.cat(lab)
    direct = retrieval_metrics(img, txt, lab, lab)
    for k in ("R@1", "R@5", "R@10", "median_rank"):
        assert res["retrieval"][f"image_to_text/{k}"] == pytest.approx(direct[k], abs=1e-9)
    inst = retrieval_metrics(txt, img)
    assert res["retrieval_instance"]["text_to_image/R@5"] == pytest.approx(inst["R@5"], abs=1e-9)


def _worker(rank, port, export, data, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    from mmpretrain.eval.suite import EvalOptions, EvalSuite
    from mmpretrain.evaluate import load_for_eval

    model, cfg, tok = load_for_eval(export)
    res = EvalSuite(model, cfg, tok).run(data, EvalOptions(tasks=("retrieval", "zeroshot", "linear_probe", "captioning")))
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_equal_one(setup):
    from mmpretrain.eval.suite import EvalOptions, EvalSuite
    from mmpretrain.evaluate import load_for_eval

    out = setup["root"] / "two.json"
    mp.spawn(_worker, args=(free_port(), setup["export"], setup["data"], str(out)), nprocs=2, join=True)
    two = json.loads(out.read_text())
    model, cfg, tok = load_for_eval(setup["export"])
    one = EvalSuite(model, cfg, tok).run(setup["data"], EvalOptions(tasks=("retrieval", "zeroshot", "linear_probe",
                                                                          "captioning")))
    one = json.loads(json.dumps(one))
    assert two["num_samples"] == one["num_samples"] == 64
    for k, v in one["retrieval"].items():
        assert two["retrieval"][k] == pytest.approx(v, abs=1e-6), k
    for m in ("image", "audio"):
        assert two["zeroshot"][m]["confusion_matrix"] == one["zeroshot"][m]["confusion_matrix"]
        assert two["linear_probe"][m]["accuracy"] == pytest.approx(one["linear_probe"][m]["accuracy"])
        # 6 captions per modality in all (3 per rank), gathered from both ranks' samples
        assert two["captioning"][m]["num_samples"] == 6
    keys = [e["key"] for e in two["captioning"]["image"]["examples"]]
    assert len(set(keys)) == 6


def test_caption_tool_matches_direct_generation(setup, tmp_path):
    """tools/caption.py on files and on shards prints what the loaded model generates directly."""
    import tarfile

    from mmpretrain import inference

    files = {}
    with tarfile.open(setup["data"]) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            if ext in ("png", "jpg", "flac", "wav") and len([f for f in files if f.endswith(ext)]) < 2:
                path = tmp_path / m.name
                path.write_bytes(tf.extractfile(m).read())
                files[str(path)] = ext
    images = sorted(p for p, e in files.items() if e in ("png", "jpg"))
    audio = sorted(p for p, e in files.items() if e in ("flac", "wav"))
    out = subprocess.run([sys.executable, "tools/caption.py", "--checkpoint", setup["export"], "--image", *images,
                          "--audio", *audio, "--max-new-tokens", "8", "--json"],
                         capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    m = inference.load(setup["export"], "cpu")
    want = m.caption(image=images, max_new_tokens=8) + m.caption(audio=audio, max_new_tokens=8)
    assert [(r["modality"], r["name"]) for r in rows] == [("image", p) for p in images] + [("audio", p) for p in audio]
    assert [r["caption"] for r in rows] == want

    out = subprocess.run([sys.executable, "tools/caption.py", "--checkpoint", setup["export"], "--shards",
                          setup["data"], "--limit", "3", "--max-new-tokens", "4"],
                         capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 6 and {ln.split("\t")[0] for ln in lines} == {"image", "audio"}  # 3 samples x 2
