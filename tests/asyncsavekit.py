"""SIGKILL trials for train.async_save, shared by tests/test_async_save.py (2 trials) and
bench/async_save_kill.py (10): a 2-process ZeRO-2 tiny run whose background checkpoint writes are
slowed (tests.faultkit:slow_async_writes) is SIGKILLed at a random moment of a write; then
`latest` must name a complete checkpoint, every complete checkpoint must load, and the resumed run
must equal the synchronous reference bit for bit (losses, final weights, checkpoint files)."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

import faultkit
import trainkit as tk
from mmpretrain.checkpoint import complete_checkpoints
from mmpretrain.safe_load import safe_load

STEPS, SAVE_EVERY, NPROC = 8, 2, 2
SLOW_WRITE_S = 0.4  # per file: rank 0 writes 3 files a save, so a write lasts about 1.2 s


def overrides(data: Path, out: Path, async_save: bool) -> List[str]:
    return tk.tiny_overrides(out, data, f"train.steps={STEPS}", f"train.save_every={SAVE_EVERY}",
                             "train.keep_last=10", "train.zero_stage=2", f"train.async_save={str(async_save).lower()}")


def reference(data: Path, out: Path, log: Path) -> Path:
    """The synchronous run every trial is compared with."""
    rc = tk.run("torchrun", NPROC, overrides(data, out, False), log)
    assert rc == 0, log.read_text()[-3000:]
    return out


def _latest_step(root: Path) -> int:
    found = complete_checkpoints(root)
    return int(found[-1].name.split("_")[1]) if found else 0


def _write_steps(note: Path, skip: int = 0) -> List[int]:
    """The steps of the background file writes noted so far, but the first `skip` (earlier sessions')."""
    if not note.exists():
        return []
    return [int(line.split()[0]) for line in note.read_text().splitlines()[skip:] if line.strip()]


def _kill(p: Any) -> None:
    """SIGKILL the run, wait until its ranks are gone too (they may die a moment after the launcher,
    by PR_SET_PDEATHSIG), then remove DeepSpeed's shared-memory all-reduce buffers of this run's
    port: a killed run leaves them in /dev/shm (67 MB each)."""
    ranks = tk.descendants(p.pid)
    tk.kill_group(p)
    deadline = time.time() + 30
    while any(tk.alive(pid) for pid in ranks) and time.time() < deadline:
        time.sleep(0.05)
    args = list(p.args)
    if "--master_port" in args:
        port = args[args.index("--master_port") + 1]
        for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            f.unlink(missing_ok=True)


def check_loadable(ckpt: Path, nproc: int = NPROC) -> None:
    """Every file an exact resume of `ckpt` reads is there and loads."""
    names = ["trainer_state.json", "config.yaml", "mp_rank_00_model_states.pt"]
    names += [f"rank_{r:05d}.pt" for r in range(nproc)]
    names += [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(nproc)]
    for n in names:
        assert (ckpt / n).is_file(), f"{ckpt} is COMPLETE but lacks {n}"
        if n.endswith(".pt"):
            safe_load(ckpt / n)
    json.loads((ckpt / "trainer_state.json").read_text())


def kill_during_write(data: Path, out: Path, log: Path, seed: int, slow: float = SLOW_WRITE_S) -> Dict[str, Any]:
    """Start (or resume) the async run, wait for a background write of a save after the newest
    complete checkpoint to begin, SIGKILL every process at a random moment of it (up to just past
    its commit), and report what the disk holds."""
    rng = random.Random(seed)
    root = out / "checkpoints"
    start = _latest_step(root)
    later = list(range(start + SAVE_EVERY, STEPS + 1, SAVE_EVERY))
    if not later:
        raise ValueError(f"{out} is complete already (step {start}): nothing left to kill")
    target = rng.choice(later[1:3] if start == 0 and len(later) > 2 else later[:1])  # after a first commit
    delay = rng.uniform(0, 3 * slow + 0.5)
    note = out.parent / f"{out.name}_writes.txt"
    earlier = len(_write_steps(note))
    p = tk.start("torchrun", NPROC, [*overrides(data, out, True), faultkit.plugin("slow_async_writes")], log,
                 **{faultkit.SLOW_WRITE_VAR: str(slow), faultkit.WRITE_LOG_VAR: str(note)})
    try:
        t0 = time.time()
        while target not in _write_steps(note, earlier):
            if p.poll() is not None:
                raise AssertionError(f"run ended (exit {p.returncode}) before the write of step {target}:\n"
                                     f"{log.read_text()[-3000:]}")
            if time.time() - t0 > 240:
                raise AssertionError(f"the write of step {target} did not start in 240 s")
            time.sleep(0.02)
        time.sleep(delay)
    finally:
        _kill(p)
    latest_file = root / "latest"
    latest = latest_file.read_text().strip() if latest_file.exists() else None
    for c in complete_checkpoints(root):
        check_loadable(c)
    return {"seed": seed, "target_step": target, "delay_s": round(delay, 3), "latest": latest,
            "latest_complete": latest is not None and (root / latest / "COMPLETE").is_file(),
            "newest_complete": _latest_step(root),
            "partial": sorted(d.name for d in root.glob("step_*") if not (d / "COMPLETE").exists())}


def same_state(a: Any, b: Any, where: str, skip: Tuple[str, ...] = ()) -> None:
    """Recursive equality of loaded states (tensors: type, dtype, shape and every value); `skip`:
    suffixes of the dotted paths left out."""
    if where.endswith(skip) and skip:
        return
    if isinstance(a, torch.Tensor):
        assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: values differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys differ"
        for k in a:
            same_state(a[k], b[k], f"{where}.{k}", skip)
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same_state(x, y, f"{where}[{i}]", skip)
    elif hasattr(a, "__dict__") and not isinstance(a, type):  # e.g. DeepSpeed's loss scaler object
        assert type(a) is type(b), where
        same_state(vars(a), vars(b), where, skip)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_checkpoint(a: Path, b: Path, skip: Tuple[str, ...] = ()) -> None:
    """The same loaded state in two checkpoints of the same step (the config's hash aside: the two
    runs differ in train.async_save; and the wall-clock seconds trained)."""
    files = sorted(p.name for p in a.iterdir() if p.suffix == ".pt")
    assert files and files == sorted(p.name for p in b.iterdir() if p.suffix == ".pt"), (a, b)
    for f in files:
        same_state(safe_load(a / f), safe_load(b / f), f"{b.name}/{f}", skip)
    sa, sb = (json.loads((d / "trainer_state.json").read_text()) for d in (a, b))
    for k in ("config_hash", "train_seconds"):
        sa.pop(k), sb.pop(k)
    assert sa == sb, (sa, sb)
    assert (a / "COMPLETE").read_text() == (b / "COMPLETE").read_text()


def resume_and_compare(data: Path, out: Path, log: Path, ref: Path) -> Optional[str]:
    """Resume the async run to its end (normal speed); it must equal the reference bit for bit.
    Returns the checkpoint it resumed from (None: started over)."""
    rc = tk.run("torchrun", NPROC, overrides(data, out, True), log)
    assert rc == 0, log.read_text()[-3000:]
    text = (out / "logs" / "rank0.log").read_text()
    resumed = [ln.split("resumed from ")[1].split(" (")[0] for ln in text.splitlines() if "resumed from " in ln]
    assert tk.losses_by_step(out) == tk.losses_by_step(ref)
    tk.assert_same_weights(tk.final_weights(ref), tk.final_weights(out))
    ref_ckpts = {c.name: c for c in complete_checkpoints(ref / "checkpoints")}
    for c in complete_checkpoints(out / "checkpoints"):
        # every tensor, the RNG states included: the data loader draws its workers' seed from its own
        # generator, so a resumed session's global torch RNG follows an uninterrupted run's exactly
        assert_same_checkpoint(ref_ckpts[c.name], c)
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    return resumed[-1] if resumed else None


def steps_during_writes(out: Path) -> int:
    """Training rows logged while a background write ran (between its first file and its COMPLETE)."""
    note = out.parent / f"{out.name}_writes.txt"
    times: Dict[int, List[float]] = {}
    for line in note.read_text().splitlines():
        step, _, t, _ = line.split()
        times.setdefault(int(step), []).append(float(t))
    rows = tk.train_rows(out)
    n = 0
    for step, ts in times.items():
        done = out / "checkpoints" / f"step_{step:08d}" / "COMPLETE"
        if done.exists():
            t_done = done.stat().st_mtime
            # the session that committed it: a killed session may have written the same step earlier
            t_start = min((t for t in ts if t_done - 20 * SLOW_WRITE_S < t < t_done), default=t_done)
            n += sum(1 for r in rows if r["step"] > step and t_start < r["time"] < t_done)
    return n
