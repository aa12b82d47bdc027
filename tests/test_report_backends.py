"""log.report_to: TensorBoard and wandb backends that survive requeues. Two segments of one run
(construct MetricsLogger, log steps 1..5, close; construct again resumed at step 5, log 6..10,
close) must land in ONE wandb run (same id, read back from the offline .wandb files) and on ONE
monotone TensorBoard step axis. Offline, in-process, no training."""
from __future__ import annotations

import copy
import json
import struct
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
import torch

from mmpretrain import preflight, report_backends
from mmpretrain.config import ConfigError, load_config
from mmpretrain.logging import MetricsLogger


@pytest.fixture(scope="module")
def base_cfg():
    return load_config(None, ["run.name=rb"])


def _cfg(out: Path, *extra: str):
    return load_config(None, [f"run.output_dir={out}", "run.name=rb", *extra])


def _record(step: int, seg: int) -> dict:
    # segment-specific values: a redone step shows which segment's value a reader keeps
    return {"kind": "train", "step": step, "loss": 10.0 * seg + 1.0 / step, "lr": torch.tensor(1e-3 * step),
            "loss/image_text": 0.5 * step, "source": "a", "saved": True, "counts": [1, 2]}


def _segment(cfg, start: int, stop: int, seg: int, eval_at: int = 0) -> None:
    m = MetricsLogger(cfg, rank=0, total_steps=10, start_step=start)
    for s in range(start + 1, stop + 1):
        m.log(_record(s, seg), console=False)
        if s == eval_at:
            m.log({"kind": "eval", "step": s, "zeroshot/image/accuracy": 0.25 * seg}, console=False)
    m.close()


# ----------------------------------------------------------------------------- config


def test_report_to_validation_and_default():
    cfg = load_config(None, [])
    assert cfg.log.report_to == [] and cfg.log.wandb.mode == "disabled"
    assert report_backends.wandb_mode(cfg, env={}) is None  # today's default: jsonl only
    assert load_config(None, ["log.report_to=[jsonl,tensorboard,wandb]"]).log.report_to == ["jsonl", "tensorboard",
                                                                                          "wandb"]
    with pytest.raises(ConfigError, match=r"'log.report_to' = \['tensorboard', 'mlflow'\].*'mlflow'"):
        load_config(None, ["log.report_to=[tensorboard,mlflow]"])


@pytest.mark.parametrize("report_to,mode,env,expected", [
    ([], "disabled", {}, None),
    ([], "offline", {}, "offline"),  # the older switch alone still turns wandb on
    (["wandb"], "disabled", {}, "online"),  # listed: wandb's own default
    (["wandb"], "offline", {}, "offline"),
    (["wandb"], "online", {"WANDB_MODE": "offline"}, "offline"),  # the environment wins
    (["wandb"], "online", {"WANDB_MODE": "disabled"}, None),
    (["tensorboard"], "disabled", {"WANDB_MODE": "online"}, None),  # the environment alone turns nothing on
])
def test_wandb_mode_combines_report_to_mode_and_env(base_cfg, report_to, mode, env, expected):
    cfg = copy.deepcopy(base_cfg)  # a load_config per case costs ~0.5 s
    cfg.log.report_to, cfg.log.wandb.mode = report_to, mode
    assert report_backends.wandb_mode(cfg, env=env) == expected


def test_preflight_names_missing_package(monkeypatch, tmp_path):
    cfg = _cfg(tmp_path, "log.report_to=[tensorboard]")
    real = report_backends.importlib.util.find_spec
    monkeypatch.setattr(report_backends.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"'log.report_to' = \['tensorboard'\].*mmpretrain\[tensorboard\]"):
        preflight.check_report_to(cfg, env={})
    preflight.check_report_to(_cfg(tmp_path), env={})  # nothing requested: nothing needed


def test_default_config_writes_jsonl_only(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    _segment(_cfg(tmp_path), 0, 3, seg=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_scalars_keep_numbers_only_and_prefix_other_kinds():
    rec = _record(4, seg=1)
    got = report_backends.scalars(rec)
    assert got == pytest.approx({"loss": 10.25, "lr": 4e-3, "loss/image_text": 2.0})
    assert report_backends.scalars({"kind": "eval", "step": 4, "time": 1.0, "zeroshot/image/accuracy": 0.5,
                                    "captioning/image/examples": ["a | b"]}) == {"eval/zeroshot/image/accuracy": 0.5}


# ----------------------------------------------------------------------------- wandb


def test_wandb_id_persists_and_differs_per_run_dir(tmp_path):
    a = report_backends.wandb_run_id(str(tmp_path / "a"))
    assert (tmp_path / "a" / "wandb_id").read_text().strip() == a
    assert report_backends.wandb_run_id(str(tmp_path / "a")) == a  # a requeue reads it back
    assert report_backends.wandb_run_id(str(tmp_path / "b")) != a
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["wandb_id"]  # no temporary file left
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "wandb_id").write_text("not/an id\n")
    c = report_backends.wandb_run_id(str(tmp_path / "c"))
    assert c != "not/an id" and (tmp_path / "c" / "wandb_id").read_text().strip() == c


def _wandb_records(path: Path) -> Iterator:
    """The protobuf records of an offline .wandb file (a LevelDB-style log: 7-byte file header,
    32 KiB blocks of [crc32, length, type] chunks); wandb >= 0.19 ships no Python reader."""
    from wandb.proto import wandb_internal_pb2 as pb

    buf = path.read_bytes()
    assert buf[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(buf):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", buf[pos:pos + 7])
        if kind == 0 and n == 0:
            pos += left
            continue
        pending += buf[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST chunk
            rec = pb.Record()
            rec.ParseFromString(pending)
            pending = b""
            yield rec


def _wandb_history(run_dir: Path) -> List[Dict]:
    (f,) = run_dir.glob("*.wandb")
    return [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in _wandb_records(f) if r.WhichOneof("record_type") == "history"]


def test_two_segments_land_in_one_wandb_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = _cfg(tmp_path, "log.report_to=[wandb]")
    started = int(time.time())
    _segment(cfg, 0, 5, seg=1, eval_at=5)
    run_id = (tmp_path / "wandb_id").read_text().strip()
    # wandb names an offline run's directory by its start second and id: two segments started in the
    # same second (a fast machine; a real requeue takes far longer) would share one directory
    while int(time.time()) <= started:
        time.sleep(0.05)
    _segment(cfg, 5, 10, seg=2)
    assert (tmp_path / "wandb_id").read_text().strip() == run_id
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs), runs
    for r in runs:  # the run record each segment wrote carries the same id
        (f,) = r.glob("*.wandb")
        assert [x.run.run_id for x in _wandb_records(f) if x.WhichOneof("record_type") == "run"] == [run_id]
    rows = _wandb_history(runs[0]) + _wandb_history(runs[1])
    assert [h["_step"] for h in rows] == list(range(1, 11))
    assert [h["loss"] for h in rows] == pytest.approx([10 + 1 / s for s in range(1, 6)] + [20 + 1 / s for s in range(6, 11)])
    assert rows[4]["eval/zeroshot/image/accuracy"] == 0.25  # merged into step 5's row
    assert not any(k in h for h in rows for k in ("source", "saved", "counts", "step", "time"))


def test_wandb_disabled_by_environment_does_not_fail(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    _segment(_cfg(tmp_path, "log.report_to=[wandb,tensorboard]", "log.wandb.mode=online"), 0, 2, seg=1)
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "wandb_id").exists()
    assert (tmp_path / "tensorboard").is_dir() and (tmp_path / "metrics.jsonl").is_file()


# ----------------------------------------------------------------------------- tensorboard


def _tb_scalars(log_dir: Path) -> Dict[str, List]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("crashed_at", [5, 7], ids=["requeue-after-save", "crash-after-step-7"])
def test_two_segments_share_one_tensorboard_axis(tmp_path, monkeypatch, crashed_at):
    pytest.importorskip("tensorboard")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = _cfg(tmp_path, "log.report_to=[tensorboard]")
    # segment 1 logged up to crashed_at, its last checkpoint is step 5: segment 2 redoes 6..crashed_at
    _segment(cfg, 0, crashed_at, seg=1, eval_at=4)
    _segment(cfg, 5, 10, seg=2)
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    got = _tb_scalars(tmp_path / "tensorboard")
    assert set(got) == {"loss", "lr", "loss/image_text", "eval/zeroshot/image/accuracy"}
    assert [s for s, _ in got["loss"]] == list(range(1, 11))
    want = [10 + 1 / s for s in range(1, 6)] + [20 + 1 / s for s in range(6, 11)]
    assert [v for _, v in got["loss"]] == pytest.approx(want, rel=1e-6)
    assert [v for _, v in got["lr"]] == pytest.approx([1e-3 * s for s in range(1, 11)], rel=1e-6)
    assert got["eval/zeroshot/image/accuracy"] == [(4, 0.25)]
