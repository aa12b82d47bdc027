"""train.async_save (mmpretrain.async_checkpoint): the snapshot is a frozen, faithful copy; async
and sync saves write the same files; training goes on while a save is written; at most one save
is pending; the final and preemption saves wait; a failed background write stops the run at the
next save; and (2 processes, ZeRO-2, real runs) SIGKILLs during background writes leave `latest`
at a complete checkpoint that resumes bit-exactly (bench/async_save_kill.py runs 10 such trials)."""
from __future__ import annotations

import errno
import io
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict

import pytest
import torch

import asyncsavekit as ak
from mmpretrain import faults
from mmpretrain.async_checkpoint import Snapshot, StagingPool
from mmpretrain.checkpoint import CheckpointManager, CheckpointWriteError, complete_checkpoints
from mmpretrain.config import load_config
from mmpretrain.ema import WeightEMA
from mmpretrain.engine import SkippableAdamW, lr_lambda
from test_checkpoint_manager import FakeLoader, counters, info

REPO = Path(__file__).resolve().parents[1]


class _TorchEngine:
    """Stands in for DeepSpeed's TorchCheckpointEngine: save(state, path) is torch.save."""

    def save(self, state_dict: Any, path: str) -> None:
        torch.save(state_dict, path)


class Engine:
    """A stand-in for the DeepSpeed engine that writes through a checkpoint engine, as DeepSpeed does:
    the module file plus an optimizer file whose state shares storage (views of one flat buffer)."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        self.model, self.opt = model, opt
        self.checkpoint_engine = _TorchEngine()
        self.flat = torch.zeros(8)

    def save_checkpoint(self, root: str, tag: str, save_latest: bool = True) -> None:
        d = Path(root) / tag
        d.mkdir(parents=True, exist_ok=True)
        self.checkpoint_engine.save({"module": self.model.state_dict()}, str(d / "mp_rank_00_model_states.pt"))
        self.checkpoint_engine.save({"optimizer": self.opt.state_dict(), "views": [self.flat[:4], self.flat[2:]]},
                                    str(d / "optim_states.pt"))

    def load_checkpoint(self, root: str, tag: str, **_: Any) -> None:
        pass


def make(tmp: Path, async_save: bool, *extra: str):
    cfg = load_config(str(REPO / "configs/demo.yaml"),
                      [f"run.output_dir={tmp}", "train.steps=10", "train.zero_stage=0", "train.save_every=3",
                       "train.keep_last=10", f"train.async_save={str(async_save).lower()}", *extra])
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = SkippableAdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    m = CheckpointManager(cfg, info(), tmp / "checkpoints")
    m.prepare_model(model)
    engine, loader = Engine(model, opt), FakeLoader()
    m.ema = engine.ema = WeightEMA(model, decay=0.5)  # rank 0 writes its ema.pt with every save
    m.load(engine, sched, loader)
    return m, engine, loader


def train_step(engine: Engine, loader: FakeLoader, step: int) -> None:
    """A deterministic step that changes weights, optimizer moments and the shared buffer in place."""
    x = torch.full((4, 3), float(step))
    engine.model(x).square().mean().backward()
    engine.opt.step()
    engine.opt.zero_grad()
    engine.ema.update(step)
    engine.flat += step
    loader.position = 7 * step


class Gate:
    """A checkpoint.async_write hook that holds the background writer until opened (per step)."""

    def __init__(self) -> None:
        self.opened: Dict[int, threading.Event] = {}
        self.started: Dict[int, float] = {}

    def event(self, step: int) -> threading.Event:
        return self.opened.setdefault(step, threading.Event())

    def __call__(self, step: int, rank: int, path: str) -> None:
        self.started.setdefault(step, time.perf_counter())
        assert self.event(step).wait(30), "the test never opened the gate"


def _bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_snapshot_is_frozen_faithful_and_reuses_its_buffers():
    base = torch.arange(12.0)
    state = OrderedDict(w=torch.nn.Parameter(torch.ones(2, 3)), view=base[2:6], again=base.view(3, 4), n=3,
                        nested=[{"m": torch.full((5,), 2.0, requires_grad=True)}, ("s", base[:1])])
    state._metadata = {"": {"version": 1}}  # as module.state_dict() carries it
    before = _bytes(state)
    pool = StagingPool()
    snap = Snapshot(pool)
    copy = snap.take(state)
    with torch.no_grad():  # training goes on: every source changes in place
        base.add_(100)
        state["w"].mul_(5)
        state["nested"][0]["m"].zero_()
    state["n"] = 4
    assert _bytes(copy) == before  # what torch.save writes of the snapshot is what it wrote before the changes
    loaded = torch.load(io.BytesIO(_bytes(copy)), weights_only=False)
    assert loaded["view"].untyped_storage().data_ptr() == loaded["again"].untyped_storage().data_ptr()
    assert type(loaded["w"]) is torch.nn.Parameter and loaded["nested"][0]["m"].requires_grad
    assert len(snap.staging) == 3  # base's storage once, w, m
    first = sorted(s.data_ptr() for s in snap.staging)
    pool.give_back(snap.staging)
    again = Snapshot(pool)
    again.take(state)
    assert sorted(s.data_ptr() for s in again.staging) == first  # the next save copies into the same memory


def test_async_and_sync_saves_write_the_same_files_and_resume_the_same(tmp_path):
    runs = {}
    for mode in (False, True):
        m, engine, loader = make(tmp_path / str(mode), mode)
        for step in range(1, 11):
            train_step(engine, loader, step)
            m.save(step, lambda: counters(step), last=step == 10)
        runs[mode] = tmp_path / str(mode) / "checkpoints"
        m.close()
    sync, asyn = runs[False], runs[True]
    names = [p.name for p in complete_checkpoints(sync)]
    assert names == [p.name for p in complete_checkpoints(asyn)] == ["step_00000003", "step_00000006",
                                                                    "step_00000009", "step_00000010"]
    assert (asyn / "latest").read_text() == (sync / "latest").read_text() == "step_00000010\n"
    for name in names:
        files = sorted(p.name for p in (sync / name).iterdir())
        assert files == sorted(p.name for p in (asyn / name).iterdir()) and "ema.pt" in files
        for f in files:
            if f.endswith(".pt"):  # byte for byte: the same state in the same serialisation
                assert (sync / name / f).read_bytes() == (asyn / name / f).read_bytes(), (name, f)
        ak.assert_same_checkpoint(sync / name, asyn / name)
    # a resume from either restores the same counters, RNG and data position
    got = {}
    for mode, root in runs.items():
        m = CheckpointManager(make(tmp_path / "r", mode)[0].cfg, info(), root)
        model = torch.nn.Linear(3, 2)
        m.prepare_model(model)
        sched = torch.optim.lr_scheduler.LambdaLR(SkippableAdamW(model.parameters()), lambda s: 1.0)
        loader = FakeLoader()
        got[mode] = (m.load(Engine(model, None), sched, loader), loader.restored, torch.rand(3))
    assert got[True][0] == got[False][0] == counters(10)
    assert got[True][1] == got[False][1] == [{"position": 70}]
    assert torch.equal(got[True][2], got[False][2])


def test_training_goes_on_while_the_write_runs_and_one_save_at_most_is_pending(tmp_path):
    gate = Gate()
    m, engine, loader = make(tmp_path, True)
    with faults.hooked("checkpoint.async_write", gate):
        for step in (1, 2, 3):
            train_step(engine, loader, step)
            m.save(step, lambda: counters(step))
        ckpt = tmp_path / "checkpoints" / "step_00000003"
        deadline = time.monotonic() + 10
        while 3 not in gate.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert 3 in gate.started  # the writer has started and is held at its first file ...
        assert not (ckpt / "COMPLETE").exists()  # ... while save() has returned: training goes on
        expected = {"module": {k: v.clone() for k, v in engine.model.state_dict().items()}}
        for step in (4, 5):  # training goes on meanwhile, changing the saved tensors in place
            train_step(engine, loader, step)
        assert not (tmp_path / "checkpoints" / "latest").exists()
        # the save at step 6 must wait for step 3's write: it stays blocked until the gate opens
        train_step(engine, loader, 6)
        sixth = threading.Thread(target=m.save, args=(6, lambda: counters(6)))
        sixth.start()
        sixth.join(0.5)
        assert sixth.is_alive() and 6 not in gate.started  # no second save started while one is pending
        t_open = time.perf_counter()
        gate.event(3).set()
        sixth.join(30)
        assert not sixth.is_alive()
        assert (ckpt / "COMPLETE").exists() and gate.started[6] > t_open
        ak.same_state(expected, torch.load(ckpt / "mp_rank_00_model_states.pt"), "model")  # step 3's, not 5's
        # the final save waits for its write (and for the pending step-6 one) before it returns
        gate.event(6).set()
        gate.event(10).set()
        train_step(engine, loader, 10)
        m.save(10, lambda: counters(10), last=True)
        root = tmp_path / "checkpoints"
        assert [p.name for p in complete_checkpoints(root)][-2:] == ["step_00000006", "step_00000010"]
        assert (root / "latest").read_text() == "step_00000010\n"
        # a preemption save (save_now) also returns only once it is committed
        gate.event(11).set()
        m.save_now(11, lambda: counters(11))
        assert (root / "step_00000011" / "COMPLETE").exists() and m._async.pending is None
    m.close()


def test_a_failed_background_write_stops_the_run_at_the_next_save(tmp_path):
    m, engine, loader = make(tmp_path, True)
    root = tmp_path / "checkpoints"
    train_step(engine, loader, 3)
    m.save(3, lambda: counters(3))
    m.wait()
    assert (root / "latest").read_text() == "step_00000003\n"

    def disk_full(step: int, rank: int, path: str) -> None:
        if step == 6 and path.endswith("optim_states.pt"):
            raise OSError(errno.ENOSPC, "No space left on device", path)

    with faults.hooked("checkpoint.async_write", disk_full):
        train_step(engine, loader, 6)
        assert m.save(6, lambda: counters(6)) == root / "step_00000006"  # returns: the write fails later
        train_step(engine, loader, 9)
        with pytest.raises(CheckpointWriteError, match="no space left on device") as e:
            m.save(9, lambda: counters(9))
    assert f"last good checkpoint is {root / 'step_00000003'}" in str(e.value)
    assert not (root / "step_00000006").exists()  # the partial save is gone
    assert (root / "latest").read_text() == "step_00000003\n" and not (root / "step_00000009").exists()
    m.close()


@pytest.mark.distributed
def test_sigkill_during_async_writes_resumes_bit_exact(tiny_data, tmp_path):
    """2 processes, ZeRO-2: the sync reference, then an async run with slowed writes SIGKILLed at a
    random moment of a background write, twice (the second kill hits the resumed run), and the
    final resume; each kill leaves `latest` at a complete, loadable checkpoint, and the resumed
    losses, the final weights and every async-written checkpoint equal the sync reference's."""
    ref = ak.reference(tiny_data, tmp_path / "ref", tmp_path / "ref.log")
    out, log = tmp_path / "run", tmp_path / "run.log"
    for seed in (1, 2):
        res = ak.kill_during_write(tiny_data, out, log, seed=seed)
        assert res["latest"] is not None and res["latest_complete"], res
    ak.resume_and_compare(tiny_data, out, log, ref)
    # training went on while the background writes ran (rows logged between a write's start and its commit)
    assert ak.steps_during_writes(out) > 0
