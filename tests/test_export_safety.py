"""Export and safe loading with real training processes: exported embeddings equal the live
training model's (ZeRO 0 and 3); planted malicious pickles are refused by resume, export and
inference without running; non-finite steps are skipped and counted, and K in a row stop the
run naming the loss term."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import faultkit
import trainkit as tk
from mmpretrain.checkpoint import complete_checkpoints, consolidated_state_dict

pytestmark = pytest.mark.distributed
SCRIPT = tk.REPO / "tests" / "scripts" / "train_then_embed.py"
_RUNS: dict = {}


def train_and_embed(stage: int, data: Path, root: Path) -> Path:
    """3 steps at ZeRO `stage` (2 processes, 1 for stage 0), then embeddings from the live model."""
    if stage not in _RUNS:
        out, log = root / f"z{stage}", root / f"z{stage}.log"
        nproc = 1 if stage == 0 else 2
        over = tk.tiny_overrides(out, data, "train.steps=3", f"train.zero_stage={stage}")
        cmd = [str(tk.VENV_BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(tk.free_port()),
               str(SCRIPT), str(out / "live_embeddings.pt"), str(data / "eval" / "eval-000000.tar"),
               "--config", str(tk.TINY_CONFIG), *over]
        with open(log, "wb") as f:
            rc = subprocess.run(cmd, cwd=tk.REPO, env=tk.env(), stdout=f, stderr=subprocess.STDOUT, timeout=300).returncode
        assert rc == 0, log.read_text()[-3000:]
        _RUNS[stage] = out
    return _RUNS[stage]


@pytest.fixture(scope="module")
def runroot(tmp_path_factory):
    _RUNS.clear()
    return tmp_path_factory.mktemp("export_runs")


def export_cli(ckpt: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmpretrain.export", "--checkpoint", str(ckpt), "--out", str(out)],
                          cwd=tk.REPO, env=tk.env(), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("stage", [0, 3])
def test_exported_embeddings_equal_the_training_model(stage, tiny_data, runroot, tmp_path):
    from mmpretrain import inference

    run = train_and_embed(stage, tiny_data, runroot)
    res = export_cli(run, tmp_path / "export")
    assert res.returncode == 0, res.stderr[-3000:]
    exp = tmp_path / "export"
    assert {"model.safetensors", "config.json", "tokenizer"} <= {p.name for p in exp.iterdir()}
    live = torch.load(run / "live_embeddings.pt", weights_only=True)
    m = inference.load(exp, "cpu")
    assert not any(p.name.startswith(".export.") for p in tmp_path.iterdir())  # no temp dir left
    got = {"image": m.encode_image(live["inputs"]["image"]), "audio": m.encode_audio(live["inputs"]["audio"]),
           "text": m.encode_text(live["inputs"]["text"])}
    for mod in ("image", "audio", "text"):
        assert got[mod].shape == (8, m.cfg.model.embed_dim)
        torch.testing.assert_close(got[mod], live["emb"][mod], atol=1e-6, rtol=0, msg=f"{mod} embeddings differ")
    # retrieval through the loaded model: matching text ranks its own image first more often than chance
    _, idx = m.retrieve(got["text"], got["image"], k=8)
    assert idx.shape == (8, 8) and sorted(idx[0].tolist()) == list(range(8))


class _Payload:
    """Unpickling this runs `touch <path>`: the side effect shows whether a loader executed it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def plant(target: Path, sentinel: Path) -> None:
    """Replace a checkpoint file by a pickle that would run code, keeping the tensors beside it."""
    torch.save({"module": {"w": torch.zeros(2)}, "payload": _Payload(sentinel)}, target)


def test_planted_pickles_are_refused_and_never_run(tiny_data, runroot, tmp_path):
    from mmpretrain import inference
    from mmpretrain.safe_load import UnsafeCheckpointError, safe_load

    src = train_and_embed(3, tiny_data, runroot)
    sentinel = tmp_path / "pwned"

    # the planted file really is malicious: an unsafe load runs it (in a child, on another sentinel)
    probe = tmp_path / "probe.pt"
    plant(probe, tmp_path / "proof")
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(probe)!r}, weights_only=False)"],
                   env=tk.env(), capture_output=True, timeout=120)
    assert (tmp_path / "proof").exists()
    with pytest.raises(UnsafeCheckpointError, match="probe.pt"):
        safe_load(probe)

    for victim in ("rank_00000.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        run = tmp_path / f"run_{victim[:12]}"
        shutil.copytree(src, run)
        ckpt = complete_checkpoints(run / "checkpoints")[-1]
        plant(ckpt / victim, sentinel)
        # resume: every rank refuses together (exit 2; torchrun itself exits 1), naming the file
        log = tmp_path / f"{victim}.log"
        over = tk.tiny_overrides(run, tiny_data, "train.steps=5", "train.zero_stage=3")
        assert tk.run("torchrun", 2, over, log, timeout=240) != 0, log.read_text()[-3000:]
        text = log.read_text()
        assert "refusing to load" in text and victim in text and "exitcode  : 2" in text, text[-3000:]
        for rank in (0, 1):
            assert "refus" in (run / "logs" / f"rank{rank}.log").read_text()
        assert not sentinel.exists()
        # export refuses too
        res = export_cli(run, tmp_path / f"export_{victim[:12]}")
        assert res.returncode == 2 and "refusing to load" in res.stderr, res.stderr[-2000:]
        assert not (tmp_path / f"export_{victim[:12]}").exists()
        assert not sentinel.exists()

    # an export whose safetensors file is swapped for a pickle does not load
    exp = tmp_path / "export"
    assert export_cli(src, exp).returncode == 0
    plant(exp / "model.safetensors", sentinel)
    with pytest.raises(Exception) as e:
        inference.load(exp, "cpu")
    assert not isinstance(e.value, (AssertionError, pickle.PickleError)) and not sentinel.exists()


@pytest.mark.parametrize("stage", [0, 2])
def test_nonfinite_step_is_skipped_and_counted(stage, tiny_data, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    over = tk.tiny_overrides(out, tiny_data, "train.steps=4", "train.save_every=1", "train.keep_last=10",
                             f"train.zero_stage={stage}")
    over.append(faultkit.plugin("nan_image"))  # one NaN image on rank 0 at step 3
    assert tk.run("single", 1, over, log, **{faultkit.NAN_IMAGE_VAR: "3"}) == 0, log.read_text()[-3000:]
    rows = {r["step"]: r for r in tk.train_rows(out)}
    assert [rows[s]["nonfinite_steps"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    ckpts = {int(p.name[5:]): p for p in complete_checkpoints(out / "checkpoints")}
    w2, w3, w4 = (consolidated_state_dict(ckpts[s]) for s in (2, 3, 4))
    tk.assert_same_weights(w2, w3)  # the poisoned step changed nothing
    assert all(torch.isfinite(v).all() for v in w4.values())
    assert any(not torch.equal(w3[k], w4[k]) for k in w3)  # and training went on
    assert "step 3 skipped: non-finite loss terms" in (out / "logs" / "rank0.log").read_text()


def test_consecutive_nonfinite_steps_stop_the_run_naming_the_term(tiny_data, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    over = tk.tiny_overrides(out, tiny_data, "train.steps=8", "train.save_every=1", "train.max_nonfinite_steps=3",
                             "train.zero_stage=2")
    rc = tk.run("torchrun", 2, [*over, faultkit.plugin("nan_image")], log, **{faultkit.NAN_IMAGE_VAR: "3,4,5"})
    assert rc != 0, log.read_text()[-3000:]
    text = (out / "logs" / "rank0.log").read_text()
    line = next(ln for ln in text.splitlines() if "consecutive steps" in ln)
    assert "3 consecutive steps up to step 5" in line and "loss/image_text" in line, line
    assert "loss/audio_text" not in line, line  # audio-text stayed finite
    # it points at the last checkpoint, saved after the skipped step 4: finite, unpoisoned weights
    last = complete_checkpoints(out / "checkpoints")[-1]
    assert last.name == "step_00000004" and last.name in line
    assert all(torch.isfinite(v).all() for v in consolidated_state_dict(last).values())
