"""mmpretrain.loading.load_model: one loader for exports and checkpoints (a step dir, a
checkpoints dir, a run dir), used by inference.load, evaluate.load_for_eval and export; exports
are readable by teammates (umask-respecting modes, not mkdtemp's 0700). In process, on a
hand-made ZeRO-0 checkpoint of the tiny test model (the layout DeepSpeed's stage 0 writes)."""
import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "models"))
from tiny import tiny_cfg, write_stage0_checkpoint  # noqa: E402

from mmpretrain import inference  # noqa: E402
from mmpretrain.evaluate import load_for_eval  # noqa: E402
from mmpretrain.export import export  # noqa: E402
from mmpretrain.loading import load_model  # noqa: E402
from mmpretrain.models import build_model  # noqa: E402


def fake_run(root: Path, step: int = 7) -> "tuple[Path, dict]":
    """A run dir with one complete stage-0 checkpoint of a randomly initialised tiny model."""
    cfg = tiny_cfg(f"run.output_dir={root}")
    torch.manual_seed(3)
    model = build_model(cfg, 259)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # differs from any fresh init
    ckpt = write_stage0_checkpoint(root, cfg, model, step)
    return ckpt, {k: v.clone() for k, v in model.state_dict().items()}


def _same(model: torch.nn.Module, want: dict) -> None:
    got = model.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k].float(), want[k].float(), atol=0, rtol=0, msg=k)


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_every_kind_of_path_loads_the_same_model(tmp_path, umask022):
    ckpt, want = fake_run(tmp_path / "run")
    exp = export(tmp_path / "run", tmp_path / "exports" / "tiny")
    for path in (ckpt, ckpt.parent, tmp_path / "run", exp):
        model, cfg, tok = load_model(path, "cpu")
        assert not model.training and cfg.model.text.decoder_depth == 1 and tok.vocab_size == 259
        assert next(model.parameters()).device == torch.device("cpu")
        _same(model, want)
    # the three public entry points go through it
    m = inference.load(exp, "cpu")
    assert isinstance(m, inference.InferenceModel) and m.device == torch.device("cpu")
    _same(m.model, want)
    model, _, _ = load_for_eval(str(ckpt))
    _same(model, want)
    # a bf16 export loads back as fp32 weights rounded to bf16
    exp16 = export(ckpt, tmp_path / "exports" / "tiny16", dtype="bf16")
    model, _, _ = load_model(exp16, "cpu")
    _same(model, {k: v.to(torch.bfloat16).float() for k, v in want.items()})
    meta = json.loads((exp16 / "config.json").read_text())
    assert meta["step"] == 7 and meta["dtype"] == "bf16" and meta["source_checkpoint"] == str(ckpt.resolve())


def test_paths_that_hold_no_model_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_model(tmp_path / "empty")
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        inference.load(half)
    # weights that do not fit the config are refused, naming the file
    ckpt, _ = fake_run(tmp_path / "run")
    exp = export(ckpt, tmp_path / "exp")
    meta = json.loads((exp / "config.json").read_text())
    meta["config"]["model"]["text"]["decoder_depth"] = 0
    (exp / "config.json").write_text(json.dumps(meta))
    with pytest.raises(RuntimeError, match="model.safetensors: weights do not fit"):
        load_model(exp, "cpu")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_is_readable_as_the_umask_allows(tmp_path, umask):
    ckpt, _ = fake_run(tmp_path / "run")
    old = os.umask(umask)
    try:
        out = export(ckpt, tmp_path / "exports" / "tiny")
        out = export(ckpt, out)  # replacing an export keeps the modes too
    finally:
        os.umask(old)
    dirs = [out] + [p for p in out.rglob("*") if p.is_dir()]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(dirs) == 2 and {"model.safetensors", "config.json"} <= {f.name for f in files}
    for d in dirs:
        assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~umask, d
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]  # no temporary directory left
