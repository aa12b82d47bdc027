"""CheckpointManager without DeepSpeed (a stand-in engine that writes the stage-0 module file):
save cadence, resume planning (exact / universal / weights only, explicit PATH and requeue),
the restored counters, RNG and loader position, the LR schedule carried over a weights-only
restart without warnings, and a save that the old fault variables cannot interrupt."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

from mmpretrain import checkpoint as ckpt_lib
from mmpretrain import distributed as D
from mmpretrain.checkpoint import CheckpointManager, Progress, complete_checkpoints
from mmpretrain.config import load_config
from mmpretrain.engine import SkippableAdamW, lr_lambda

REPO = Path(__file__).resolve().parents[1]


def make_cfg(out: Path, *extra: str):
    return load_config(str(REPO / "configs/demo.yaml"),
                       [f"run.output_dir={out}", "train.steps=10", "optim.warmup_steps=4", "train.zero_stage=0", *extra])


def info(world_size: int = 1) -> D.DistInfo:
    return D.DistInfo(rank=0, local_rank=0, world_size=world_size, local_world_size=world_size, master_addr="",
                      master_port=0, launcher="single")


class FakeEngine:
    """What the manager needs of a DeepSpeed engine; saves like ZeRO stage 0 (one module file)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.loaded: List[Path] = []

    def save_checkpoint(self, root: str, tag: str, save_latest: bool = True) -> None:
        d = Path(root) / tag
        d.mkdir(parents=True, exist_ok=True)
        sd = {f"model.{k}": v.detach().clone() for k, v in self.model.state_dict().items()}
        torch.save({"module": sd}, d / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, root: str, tag: str, **_: Any) -> None:
        self.loaded.append(Path(root) / tag)


class FakeLoader:
    def __init__(self) -> None:
        self.position = 0
        self.restored: List[Dict[str, Any]] = []

    def state_dict(self) -> Dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        self.restored.append(d)
        self.position = d["position"]


def parts(cfg):
    model = torch.nn.Linear(3, 2)
    opt = SkippableAdamW(model.parameters(), lr=cfg.optim.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    return model, opt, sched


def start(cfg, root: Path, world_size: int = 1):
    """Manager + model + engine + scheduler + loader, in the trainer's order."""
    m = CheckpointManager(cfg, info(world_size), root)
    model, opt, sched = parts(cfg)
    m.prepare_model(model)
    engine, loader = FakeEngine(model), FakeLoader()
    return m, model, opt, sched, engine, loader


def counters(step: int) -> Progress:
    return Progress(step=step, samples_seen=8 * step, modality_counts={"image": step, "text": 2 * step},
                    nonfinite_total=step // 4)


def test_fresh_start_and_save_cadence(tmp_path):
    cfg = make_cfg(tmp_path, "train.save_every=3", "train.keep_last=2")
    root = tmp_path / "checkpoints"
    m, _, _, sched, engine, loader = start(cfg, root)
    assert m.mode is None and not m.load_universal and m.data_seed == cfg.run.seed
    assert m.load(engine, sched, loader) == Progress()
    with pytest.raises(RuntimeError, match="twice"):
        m.load(engine, sched, loader)
    calls: List[int] = []

    def progress_at(step):
        return lambda: calls.append(step) or counters(step)

    saved = [s for s in range(1, 11) if m.save(s, progress_at(s)) is not None]
    assert saved == [3, 6, 9]
    assert calls == [3, 6, 9]  # the counters are asked for only when a save is due
    assert m.save(10, progress_at(10), last=True) == root / "step_00000010"
    assert m.save(10, progress_at(10), last=True) is None  # the final step is saved once
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000009", "step_00000010"]  # keep_last
    assert (root / "latest").read_text().strip() == "step_00000010" and m.latest() == root / "step_00000010"
    state = json.loads((root / "step_00000010" / "trainer_state.json").read_text())
    assert state["step"] == 10 and state["samples_seen"] == 80 and state["modality_counts"] == {"image": 10, "text": 20}
    assert state["world_size"] == 1 and state["zero_stage"] == 0 and state["data_seed"] == cfg.run.seed
    assert state["origin"] is None
    with pytest.raises(ValueError, match="counters of step 9"):
        m.save_now(10, lambda: counters(9))


def test_time_based_saves(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, "train.save_every_minutes=1")
    clock = [1000.0]
    monkeypatch.setattr(ckpt_lib.time, "time", lambda: clock[0])
    m, _, _, sched, engine, loader = start(cfg, tmp_path / "checkpoints")
    m.load(engine, sched, loader)  # the clock starts here
    saved = []
    for step in range(1, 7):
        clock[0] += 25  # 25 s per step: a save every third step (>= 60 s since the last)
        if m.save(step, lambda: counters(step)) is not None:
            saved.append(step)
    assert saved == [3, 6]


def test_exact_resume_restores_counters_rng_and_loader(tmp_path):
    cfg = make_cfg(tmp_path, "train.save_every=3")
    root = tmp_path / "checkpoints"
    m, _, _, sched, engine, loader = start(cfg, root)
    m.load(engine, sched, loader)
    loader.position = 42
    torch.manual_seed(123)
    m.save(3, lambda: counters(3))
    after_save = torch.rand(4)

    m2, _, _, sched2, engine2, loader2 = start(cfg, root)  # the next job of the same run
    assert m2.mode == "exact" and not m2.load_universal and m2.data_seed == cfg.run.seed
    torch.manual_seed(999)
    assert m2.load(engine2, sched2, loader2) == counters(3)
    assert torch.equal(torch.rand(4), after_save)  # RNG as it was when the checkpoint was written
    assert engine2.loaded == [root / "step_00000003"] and loader2.restored == [{"position": 42}]
    assert m2.save(3, lambda: counters(3), last=True) is None  # its own checkpoint: not saved again


def test_zero_stage_change_is_weights_only_with_the_schedule_carried_on(tmp_path):
    cfg0 = make_cfg(tmp_path / "a")
    src_root = tmp_path / "a" / "checkpoints"
    m, model, _, sched, engine, loader = start(cfg0, src_root)
    m.load(engine, sched, loader)
    with torch.no_grad():
        model.weight.fill_(0.5)
    src = m.save(6, lambda: counters(6), last=True)

    cfg1 = make_cfg(tmp_path / "b", "train.zero_stage=1", f"train.resume={src}")
    m1 = CheckpointManager(cfg1, info(), tmp_path / "b" / "checkpoints")
    assert m1.mode == "weights_only" and not m1.load_universal
    assert m1.data_seed == cfg1.run.seed + 6  # the data stream restarts, re-seeded
    model1, opt1, sched1 = parts(cfg1)
    with pytest.raises(RuntimeError, match="prepare_model"):
        m1.load(FakeEngine(model1), sched1, FakeLoader())
    m1.prepare_model(model1)  # before the engine: the weights are the checkpoint's
    assert torch.equal(model1.weight, torch.full((2, 3), 0.5))
    loader1 = FakeLoader()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # moving the schedule warns about nothing
        assert m1.load(FakeEngine(model1), sched1, loader1) == counters(6)
    assert loader1.restored == []  # the data position does not carry over
    # the schedule stands where an uninterrupted run has it after step 6, and goes on from there
    _, opt_ref, sched_ref = parts(cfg1)
    for _ in range(6):
        opt_ref.step()
        sched_ref.step()
    assert sched1.last_epoch == 6 and sched1.get_last_lr() == sched_ref.get_last_lr()
    assert [g["lr"] for g in opt1.param_groups] == [g["lr"] for g in opt_ref.param_groups]
    opt1.step()
    sched1.step()
    opt_ref.step()
    sched_ref.step()
    assert sched1.get_last_lr() == sched_ref.get_last_lr() == [cfg1.optim.lr * lr_lambda(cfg1)(7)]
    # origin: the explicit checkpoint it started from, kept by its saves
    saved = m1.save(7, lambda: counters(7), last=True)
    assert json.loads((saved / "trainer_state.json").read_text())["origin"] == ckpt_lib.origin_of(src)


def test_world_size_change_plans_a_universal_load(tmp_path):
    cfg = make_cfg(tmp_path, "train.zero_stage=1")
    root = tmp_path / "checkpoints"
    m, _, _, sched, engine, loader = start(cfg, root)
    m.load(engine, sched, loader)
    m.save(5, lambda: counters(5), last=True)
    m2 = CheckpointManager(cfg, info(world_size=2), root)
    assert m2.mode == "universal" and m2.load_universal and m2.data_seed == cfg.run.seed + 5
    assert m2.last_saved_step == -1  # not an exact resume: the final step is saved again


def test_requeued_explicit_resume_continues_from_its_own_newest(tmp_path):
    cfg = make_cfg(tmp_path / "a")
    m, _, _, sched, engine, loader = start(cfg, tmp_path / "a" / "checkpoints")
    m.load(engine, sched, loader)
    src = m.save(4, lambda: counters(4), last=True)

    own = tmp_path / "b" / "checkpoints"
    cfg_b = make_cfg(tmp_path / "b", f"train.resume={src}")
    mb, _, _, sched_b, engine_b, loader_b = start(cfg_b, own)
    assert mb.mode == "exact" and mb.origin == ckpt_lib.origin_of(src) and mb.last_saved_step == -1
    assert mb.load(engine_b, sched_b, loader_b).step == 4
    mb.save(6, lambda: counters(6), last=True)
    # the requeued job re-runs train.resume=<src>: it continues from step 6 of its own run
    mc, _, _, sched_c, engine_c, loader_c = start(cfg_b, own)
    assert mc.plan.ckpt == own / "step_00000006" and mc.last_saved_step == 6
    assert mc.origin == ckpt_lib.origin_of(src)
    assert mc.load(engine_c, sched_c, loader_c).step == 6
    never = CheckpointManager(make_cfg(tmp_path / "b", "train.resume=never"), info(), own)
    assert never.plan is None and never.origin is None


def test_old_fault_variables_do_not_interrupt_a_save(tmp_path, monkeypatch):
    """MMPRETRAIN_FAULT_* killed a rank mid-save; nothing reads them any more."""
    monkeypatch.setenv("MMPRETRAIN_FAULT_KILL_IN_SAVE", "1,2")
    monkeypatch.setenv("MMPRETRAIN_FAULT_NAN_IMAGE_STEPS", "1,2")
    cfg = make_cfg(tmp_path)
    m, _, _, sched, engine, loader = start(cfg, tmp_path / "checkpoints")
    m.load(engine, sched, loader)
    ckpt = m.save_now(1, lambda: counters(1))  # still alive
    assert (ckpt / "COMPLETE").exists() and (ckpt / "rank_00000.pt").exists()
