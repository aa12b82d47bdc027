"""Real 2-process runs: ZeRO 1/2/3 train with a falling loss, a SIGKILLed run resumes
bit-exactly, a kill mid-save keeps the previous checkpoint, preemption saves and exits
for requeue, world-size and ZeRO-stage changes resume."""
from __future__ import annotations

import random
import signal
import subprocess
from pathlib import Path

import pytest
import torch

import faultkit
import trainkit as tk
from mmpretrain.checkpoint import complete_checkpoints, consolidated_state_dict
from mmpretrain.preemption import PREEMPTED_MARKER, REQUEUE_EXIT_CODE

pytestmark = pytest.mark.distributed
STEPS = ("train.steps=8", "train.save_every=3")
# the ZeRO-1 reference also saves on a clock that fires every step (each rank's clock differs: the
# ranks must still agree): test_time_based_saves_are_agreed_across_ranks reads its checkpoints
TIMED = ("train.save_every_minutes=0.0005", "train.keep_last=10")
_REFS: dict = {}


def reference(stage: int, data: Path, root: Path) -> Path:
    """An uninterrupted 8-step run per ZeRO stage, shared by the tests of this module."""
    if stage not in _REFS:
        out = root / f"ref_z{stage}"
        over = tk.tiny_overrides(out, data, *STEPS, f"train.zero_stage={stage}", *(TIMED if stage == 1 else ()))
        rc = tk.run("torchrun", 2, over, root / f"ref_z{stage}.log")
        assert rc == 0, (root / f"ref_z{stage}.log").read_text()[-3000:]
        _REFS[stage] = out
    return _REFS[stage]


def assert_loss_falls(losses: dict, stage: int) -> None:
    assert sorted(losses) == list(range(1, 9))
    first, last = sum(losses[s] for s in (1, 2)) / 2, sum(losses[s] for s in (6, 7, 8)) / 3
    assert last < first - 0.1, f"ZeRO-{stage} loss did not fall: {losses}"


@pytest.fixture(scope="module")
def refroot(tmp_path_factory):
    _REFS.clear()
    return tmp_path_factory.mktemp("refs")


# ZeRO-2 gets its SIGKILL in the middle of a save below (test_kill_during_save_keeps_previous_checkpoint,
# the harder moment) and its preemption resume after that: both are checked bit-exact against the same reference
@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stage_trains_and_sigkill_resume_is_bit_exact(stage, tiny_data, refroot, tmp_path):
    ref = reference(stage, tiny_data, refroot)
    ref_losses = tk.losses_by_step(ref)
    assert_loss_falls(ref_losses, stage)

    out, log = tmp_path / "run", tmp_path / "run.log"
    over = tk.tiny_overrides(out, tiny_data, *STEPS, f"train.zero_stage={stage}")
    kill_at = random.Random(stage).randint(4, 7)  # an arbitrary step after the first save
    p = tk.start("torchrun", 2, over, log)
    tk.wait_for_step(p, out, kill_at)
    tk.kill_group(p, signal.SIGKILL)
    killed_at = max(tk.losses_by_step(out))
    assert killed_at < 8 and complete_checkpoints(out / "checkpoints"), "kill came too late to test resume"
    assert tk.run("torchrun", 2, over, log) == 0, log.read_text()[-3000:]
    assert "resumed from" in (out / "logs" / "rank0.log").read_text()
    assert tk.losses_by_step(out) == ref_losses  # per-step losses, data order included
    tk.assert_same_weights(tk.final_weights(ref), tk.final_weights(out))


def test_kill_during_save_keeps_previous_checkpoint(tiny_data, refroot, tmp_path):
    ref = reference(2, tiny_data, refroot)
    assert_loss_falls(tk.losses_by_step(ref), 2)
    out, log = tmp_path / "run", tmp_path / "run.log"
    over = tk.tiny_overrides(out, tiny_data, *STEPS, "train.zero_stage=2")
    rc = tk.run("torchrun", 2, [*over, faultkit.plugin("kill_in_save")], log, **{faultkit.KILL_IN_SAVE_VAR: "6"})
    assert rc != 0
    ckpts = out / "checkpoints"
    assert (ckpts / "step_00000006").is_dir() and not (ckpts / "step_00000006" / "COMPLETE").exists()
    assert [c.name for c in complete_checkpoints(ckpts)] == ["step_00000003"]
    assert (ckpts / "latest").read_text().strip() == "step_00000003"
    assert tk.run("torchrun", 2, over, log) == 0, log.read_text()[-3000:]
    assert "resumed from %s" % (ckpts / "step_00000003") in (out / "logs" / "rank0.log").read_text()
    assert tk.losses_by_step(out) == tk.losses_by_step(ref)
    tk.assert_same_weights(tk.final_weights(ref), tk.final_weights(out))


def _rank_pid(p: subprocess.Popen, rank: int) -> int:
    out = subprocess.run(["pgrep", "-f", f"mmpretrain.train --local_rank={rank}"], capture_output=True, text=True)
    pids = [int(x) for x in out.stdout.split()]
    assert pids, "rank process not found"
    return pids[0]


def test_preemption_signal_saves_exits_for_requeue_and_resumes(tiny_data, refroot, tmp_path):
    ref = reference(2, tiny_data, refroot)
    out, log = tmp_path / "run", tmp_path / "run.log"
    over = tk.tiny_overrides(out, tiny_data, *STEPS, "train.zero_stage=2")
    p = tk.start("deepspeed", 2, over, log)  # the deepspeed launcher passes a rank's exit code on
    tk.wait_for_step(p, out, 4)
    import os

    os.kill(tk.rank_pid(p, 1), signal.SIGUSR1)  # one rank only (of this launcher): the ranks must agree
    assert p.wait(120) == REQUEUE_EXIT_CODE, log.read_text()[-3000:]
    step, sig, rank = (kv.split("=")[1] for kv in (out / PREEMPTED_MARKER).read_text().split())
    assert (sig, rank) == ("SIGUSR1", "1")  # rank 0 writes it; the signal and its rank are agreed on
    saved = complete_checkpoints(out / "checkpoints")[-1]
    assert saved.name == f"step_{int(step):08d}" and int(step) < 8
    assert tk.run("deepspeed", 2, over, log) == 0, log.read_text()[-3000:]
    assert not (out / PREEMPTED_MARKER).exists()
    assert f"resumed from {saved}" in (out / "logs" / "rank0.log").read_text()
    assert tk.losses_by_step(out) == tk.losses_by_step(ref)
    tk.assert_same_weights(tk.final_weights(ref), tk.final_weights(out))


def test_world_size_change_resumes_through_universal_checkpoint(tiny_data, refroot, tmp_path):
    ref = reference(2, tiny_data, refroot)
    src = ref / "checkpoints" / "step_00000006"
    out, log = tmp_path / "one", tmp_path / "one.log"
    # 2 processes -> 1: load step 6 and save it again at once (train.steps=6): same weights
    over = tk.tiny_overrides(out, tiny_data, "train.steps=6", "train.zero_stage=2", f"train.resume={src}")
    assert tk.run("single", 1, over, log) == 0, log.read_text()[-3000:]
    assert (ref / "checkpoints" / "step_00000006_universal" / "COMPLETE").exists()
    tk.assert_same_weights(consolidated_state_dict(src), tk.final_weights(out))
    # and it trains on from there with the restored optimizer and schedule
    over = tk.tiny_overrides(out, tiny_data, "train.steps=8", "train.zero_stage=2")
    assert tk.run("single", 1, over, log) == 0, log.read_text()[-3000:]
    rows = tk.train_rows(out)
    assert [r["step"] for r in rows] == [7, 8]
    ref_rows = {r["step"]: r for r in tk.train_rows(ref)}
    assert rows[0]["lr"] == pytest.approx(ref_rows[7]["lr"])  # schedule position kept
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    # a requeue re-running the first command (train.resume=<ref step 6>) continues from this run's own newest
    over = tk.tiny_overrides(out, tiny_data, "train.steps=8", "train.zero_stage=2", f"train.resume={src}")
    assert tk.run("single", 1, over, log) == 0, log.read_text()[-3000:]
    assert "this run already continued from it" in (out / "logs" / "rank0.log").read_text()
    assert [r["step"] for r in tk.train_rows(out)] == [7, 8]  # nothing trained again


def test_zero_stage_change_is_a_weights_only_restart(tiny_data, refroot, tmp_path):
    ref = reference(2, tiny_data, refroot)
    src = ref / "checkpoints" / "step_00000006"
    out, log = tmp_path / "z3", tmp_path / "z3.log"
    # one more step (7) at a vanishing lr: the weights are the checkpoint's, step count and schedule carry on
    over = tk.tiny_overrides(out, tiny_data, "train.steps=7", "train.zero_stage=3", "optim.lr=1e-12",
                             f"train.resume={src}")
    assert tk.run("torchrun", 2, over, log) == 0, log.read_text()[-3000:]
    assert "restarting from its weights only" in (out / "logs" / "rank0.log").read_text()
    rows = tk.train_rows(out)
    assert [r["step"] for r in rows] == [7]
    from mmpretrain.config import load_config
    from mmpretrain.engine import lr_lambda

    cfg = load_config(str(tk.TINY_CONFIG), over)
    f = lr_lambda(cfg)
    assert f(7) != f(1)  # a restarted schedule would be back in warmup
    assert rows[0]["lr"] == pytest.approx(1e-12 * f(7))  # the schedule went on from step 6
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step_00000007"]
    a, b = consolidated_state_dict(src), tk.final_weights(out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-8, rtol=0)


def test_time_based_saves_are_agreed_across_ranks(tiny_data, refroot):
    """save_every_minutes: each rank's clock differs; the ranks must still save together (the
    ZeRO-1 reference run saves on a clock that fires every step)."""
    out = reference(1, tiny_data, refroot)
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == [f"step_{s:08d}" for s in range(1, 9)]
