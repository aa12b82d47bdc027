"""What a run leaves behind: the resolved config, metrics.jsonl with every promised field, a
log per rank, rank 0's progress line with ETA and end-of-run summary, and an offline wandb run."""
from __future__ import annotations

import math

import pytest
import yaml

import trainkit as tk
from mmpretrain.config import from_dict, load_config, to_dict

pytestmark = pytest.mark.distributed
PAIRS = ("image_text", "audio_text", "image_audio")


def test_two_process_run_writes_config_metrics_logs_and_wandb(tiny_data, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    over = tk.tiny_overrides(out, tiny_data, "train.steps=4", "train.log_every=2", "log.wandb.mode=offline",
                             "log.progress=true", "train.grad_clip=0.5", "log.report_to=[tensorboard]")
    assert tk.run("torchrun", 2, over, log, WANDB_MODE="offline") == 0, log.read_text()[-3000:]

    written = from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    assert to_dict(written) == to_dict(load_config(str(tk.TINY_CONFIG), over))

    rows = tk.train_rows(out)
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        for key in ("samples_seen", "loss", "loss/contrastive", "lr", "grad_norm", "samples_per_s", "step_time",
                    "data_wait", *(f"loss/{p}" for p in PAIRS), *(f"temperature/{p}" for p in PAIRS)):
            assert isinstance(r.get(key), (int, float)) and math.isfinite(r[key]), (key, r.get(key))
        assert r["samples_seen"] == r["step"] * 8 * 2  # micro batch 8, 2 ranks
        assert 0 < r["data_wait"] < r["step_time"]
        assert r["grad_norm"] > 0
        assert all(0.0 < r[f"temperature/{p}"] <= 0.07 + 1e-3 for p in PAIRS)  # init 0.07, clamped
        assert any(k.startswith("data/") for k in r)  # skip counters per reason and source
    assert rows[1]["lr"] != rows[0]["lr"]  # warmup + cosine moves it

    for rank in (0, 1):
        assert "launcher=torchrun rank=%d/2" % rank in (out / "logs" / f"rank{rank}.log").read_text()
    assert "step 4/4" in (out / "logs" / "rank0.log").read_text() and "ETA" in log.read_text()
    # the end-of-run summary (mmpretrain.console), also without data.eval_urls: stdout and metrics.jsonl
    stdout = log.read_text()
    assert "step 4/4 (100.0%)" in stdout and "ETA 0:00:00" in stdout and "(process peak RSS)" in stdout
    block = stdout[stdout.index("run summary"):]
    assert "4/4 (4 this session)" in block and "2 devices" in block and "no evaluation ran" in block
    assert str(out / "checkpoints" / "step_00000004") in block
    summary = tk.metrics_rows(out)[-1]
    assert summary["event"] == "summary" and summary["status"] == "completed" and summary["step"] == 4
    assert summary["samples_seen"] == 4 * 8 * 2 and summary["world_size"] == 2
    assert summary["final_loss"]["loss"] == pytest.approx((rows[0]["loss"] + rows[1]["loss"]) / 2)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), list((out / "wandb").iterdir())
    # log.report_to (mmpretrain.report_backends): the wandb id kept in the run directory; tensorboard scalars
    assert runs[0].name.endswith("-" + (out / "wandb_id").read_text().strip())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(r["step"], pytest.approx(r["loss"])) for r in rows]
