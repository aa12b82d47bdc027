"""mmpretrain.faults: hook points are inert unless a hook is registered in this process by an
explicit call; no environment variable turns one on; the test-side hooks (tests/faultkit.py)
do what the crash and NaN tests need."""
from __future__ import annotations

import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import faultkit
from mmpretrain import faults

PACKAGE = Path(__file__).resolve().parents[1] / "mmpretrain"


@pytest.fixture(autouse=True)
def no_hooks():
    faults.clear()
    yield
    faults.clear()


def sample_kwargs(name: str):
    batch = {"image": torch.zeros(2, 3)}
    return {"checkpoint.rank_files_written": dict(step=6, rank=0),
            "checkpoint.async_write": dict(step=6, rank=0, path="step_00000006/rank_00000.pt"),
            "train.batch": dict(step=3, batch=batch, rank=0),
            "train.startup": dict(rank=0), "train.step_start": dict(step=3, rank=0), "train.teardown": dict(rank=0),
            "shards.open": dict(url="x.tar"), "shards.bytes_read": dict(url="x.tar", n=10),
            "shards.sample_read": dict(url="x.tar")}[name]


def test_points_are_inert_by_default_even_with_the_old_variables(monkeypatch):
    monkeypatch.setenv("MMPRETRAIN_FAULT_KILL_IN_SAVE", "6")
    monkeypatch.setenv("MMPRETRAIN_FAULT_NAN_IMAGE_STEPS", "3")
    monkeypatch.setenv(faultkit.KILL_IN_SAVE_VAR, "6")  # the test-side variables do nothing either
    monkeypatch.setenv(faultkit.NAN_IMAGE_VAR, "3")    # until a test enables the hook
    killed = []
    monkeypatch.setattr("os.kill", lambda *a: killed.append(a))
    for name in faults.POINTS:
        kwargs = sample_kwargs(name)
        assert not faults.active(name)
        assert faults.point(name, **kwargs) is None
    assert not killed
    batch = sample_kwargs("train.batch")["batch"]
    faults.point("train.batch", step=3, batch=batch, rank=0)
    assert torch.equal(batch["image"], torch.zeros(2, 3))  # not poisoned


def test_no_environment_read_on_the_production_path():
    src = (PACKAGE / "faults.py").read_text()
    assert "os" not in vars(faults) and "os.environ" not in src and "getenv" not in src
    users = [p.name for p in PACKAGE.rglob("*.py") if "MMPRETRAIN_FAULT" in p.read_text()]
    assert users == []


def test_register_hooked_and_remove():
    seen = []
    with faults.hooked("checkpoint.rank_files_written", lambda **kw: seen.append(kw)):
        assert faults.active("checkpoint.rank_files_written")
        faults.point("checkpoint.rank_files_written", step=6, rank=1)
    assert seen == [{"step": 6, "rank": 1}]
    faults.point("checkpoint.rank_files_written", step=7, rank=1)  # removed with the block
    assert len(seen) == 1 and not faults.active("checkpoint.rank_files_written")
    remove = faults.register("shards.open", lambda url: seen.append(url))
    faults.point("shards.open", url="a.tar")
    remove()
    faults.point("shards.open", url="b.tar")
    assert seen[1:] == ["a.tar"]
    with pytest.raises(KeyError, match="known points"):
        faults.register("checkpoint.typo", lambda **kw: None)


def test_faultkit_kill_in_save(monkeypatch):
    monkeypatch.setenv(faultkit.KILL_IN_SAVE_VAR, "6")
    killed = []
    monkeypatch.setattr("os.kill", lambda pid, sig: killed.append(sig))
    faultkit.kill_in_save()
    faults.point("checkpoint.rank_files_written", step=3, rank=0)
    assert killed == []
    faults.point("checkpoint.rank_files_written", step=6, rank=1)
    assert killed == [signal.SIGKILL]


def test_faultkit_needs_its_steps(monkeypatch):
    monkeypatch.delenv(faultkit.NAN_IMAGE_VAR, raising=False)
    with pytest.raises(RuntimeError, match=faultkit.NAN_IMAGE_VAR):
        faultkit.nan_image()


@pytest.mark.parametrize("typed", [False, True])
def test_faultkit_nan_image_poisons_one_image_of_rank_0(monkeypatch, typed):
    monkeypatch.setenv(faultkit.NAN_IMAGE_VAR, "3,5")
    faultkit.nan_image()

    def batch():
        images = torch.zeros(4, 3, 2, 2)
        return SimpleNamespace(inputs={"image": images}) if typed else {"image": images}

    def images(b):
        return b.inputs["image"] if typed else b["image"]

    for step, rank, poisoned in ((3, 0, True), (3, 1, False), (4, 0, False), (5, 0, True)):
        b = batch()
        faults.point("train.batch", step=step, batch=b, rank=rank)
        assert torch.isnan(images(b)[0]).all().item() is poisoned, (step, rank)
        assert torch.isfinite(images(b)[1:]).all()
