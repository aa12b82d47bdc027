"""train.async_save: how long the training loop stalls per checkpoint save, synchronous vs
asynchronous, for a ~300M-parameter model (a ViT-L-sized image tower, width 1024, depth 24) under
ZeRO-2 with 2 CPU processes (torchrun, gloo), the real trainer and checkpoint path. Each mode is
one run of `--steps` steps saving every `--save-every`; a run.plugins hook of this file times every
CheckpointManager.save call on each rank (a save blocks the loop until the slowest rank returns,
so a step's stall is the maximum over ranks). Printed per mode: each periodic save's stall, their
median, the final save (which waits for its write in both modes), and the mean step time (the
background writer shares the CPU with training, so async steps may be slower: the "effective"
figure adds that slowdown, summed over the run, to the stalls).

    nice -n 10 python bench/async_save.py                      # ~300M params: ~24 GB of RAM
    nice -n 10 python bench/async_save.py --depth 4            # ~50M params: ~5 GB (README figures)
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict

REPO = Path(__file__).resolve().parents[1]
SAVE_LOG_VAR = "BENCH_ASYNC_SAVE_LOG"


def time_saves() -> None:
    """run.plugins hook (bench.async_save:time_saves): every CheckpointManager.save that saved (or
    was the final one) appends {"step", "stall_s", "last"} to $BENCH_ASYNC_SAVE_LOG.rank<r>."""
    from mmpretrain import distributed as D
    from mmpretrain.checkpoint import CheckpointManager

    path, orig = os.environ[SAVE_LOG_VAR], CheckpointManager.save

    def save(self, step, progress, last=False):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = orig(self, step, progress, last)
        took = time.perf_counter() - t0
        if out is not None or last:
            with open(f"{path}.rank{D.rank()}", "a") as f:
                f.write(json.dumps({"step": step, "stall_s": took, "last": last}) + "\n")
        return out

    CheckpointManager.save = save


def mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def estimate(width: int, depth: int, nproc: int) -> Dict[str, float]:
    """Parameters of the image tower (12 w^2 per block) and the RAM of the whole job, from peak RSS
    measured at 50M parameters: ~30 bytes a parameter per rank (fp32 weights, gradients and ZeRO's
    reduce bucket, its share of the master copy and Adam moments, memory glibc keeps) + 0.5 GiB;
    async adds one snapshot of the files (the module file on rank 0, 12 bytes a parameter of
    optimizer state over all ranks)."""
    params = 12 * width * width * depth
    sync = nproc * (30 * params / 2**30 + 0.5)
    return {"params_m": params / 1e6, "sync_gib": sync, "async_gib": sync + 16 * params / 2**30}


def run_mode(mode: str, args: argparse.Namespace, data: Path) -> Dict[str, Any]:
    sys.path.insert(0, str(REPO / "tests"))
    import trainkit as tk

    out = Path(args.out) / mode
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    log_base = out / "saves.jsonl"
    over = tk.tiny_overrides(
        out / "run", data, f"model.vision.width={args.width}", f"model.vision.depth={args.depth}",
        f"model.vision.heads={args.heads}", "model.vision.stem=patch", f"train.steps={args.steps}",
        f"train.save_every={args.save_every}", "train.keep_last=1", "train.log_every=1",
        f"train.micro_batch_size={args.batch}", f"train.async_save={str(mode == 'async').lower()}",
        "train.dist_timeout_minutes=30", "run.plugins=[bench.async_save:time_saves]")
    t0 = time.time()
    rc = tk.run("torchrun", args.nproc, over, out / "train.log", timeout=args.timeout, **{SAVE_LOG_VAR: str(log_base)})
    if rc != 0:
        raise SystemExit(f"{mode} run failed (exit {rc}); log: {out / 'train.log'}\n"
                         f"{(out / 'train.log').read_text()[-3000:]}")
    per_step: Dict[int, Dict[str, Any]] = {}
    for r in range(args.nproc):
        for line in Path(f"{log_base}.rank{r}").read_text().splitlines():
            rec = json.loads(line)
            cur = per_step.setdefault(rec["step"], {"stall_s": 0.0, "last": rec["last"]})
            cur["stall_s"] = max(cur["stall_s"], rec["stall_s"])  # the loop waits for the slowest rank
    rows = tk.train_rows(out / "run")
    periodic = [v["stall_s"] for s, v in sorted(per_step.items()) if not v["last"]]
    final = [v["stall_s"] for v in per_step.values() if v["last"]]
    ckpt_gib = sum(f.stat().st_size for f in (out / "run" / "checkpoints").rglob("*") if f.is_file()) / 2**30
    return {"mode": mode, "periodic_stalls_s": periodic, "final_s": final[0] if final else None,
            "step_times_s": [r["step_time"] for r in rows], "wall_s": time.time() - t0, "ckpt_gib": ckpt_gib}


def main() -> int:
    # SIGTERM / SIGHUP (a `timeout`, a closed terminal) unwind like Ctrl-C: trainkit.run then kills the
    # training job's process group instead of leaving its ranks running
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(143))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--depth", type=int, default=24)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--steps", type=int, default=13)
    p.add_argument("--save-every", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", default="/tmp/mmpretrain_bench_async_save")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--force", action="store_true", help="run even when the estimate exceeds the available RAM")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))
    import trainkit as tk

    est = estimate(args.width, args.depth, args.nproc)
    avail = mem_available_gib()
    print(f"image tower ~{est['params_m']:.0f}M parameters, ZeRO-2, {args.nproc} processes (CPU, gloo); "
          f"estimated RAM: sync {est['sync_gib']:.1f} GiB, async {est['async_gib']:.1f} GiB; available {avail:.1f} GiB",
          flush=True)
    if est["async_gib"] > 0.9 * avail and not args.force:
        print("not enough free memory for this size: lower --depth/--width (or --force)", file=sys.stderr)
        return 2
    data = tk.make_tiny_data(Path(args.out) / "data")
    res = {m: run_mode(m, args, data) for m in ("sync", "async")}
    print(f"\ncheckpoint size: {res['sync']['ckpt_gib']:.2f} GiB per save (all ranks' files)")
    print(f"{'mode':6} {'stall per periodic save (s)':40} {'median':>7} {'final':>7} {'step (s)':>9}")
    for m, r in res.items():
        stalls = " ".join(f"{s:.2f}" for s in r["periodic_stalls_s"])
        print(f"{m:6} {stalls:40} {statistics.median(r['periodic_stalls_s']):7.2f} {r['final_s']:7.2f} "
              f"{statistics.mean(r['step_times_s']):9.2f}")
    s, a = (statistics.median(res[m]["periodic_stalls_s"]) for m in ("sync", "async"))
    n = len(res["async"]["periodic_stalls_s"])
    extra = sum(res["async"]["step_times_s"]) - sum(res["sync"]["step_times_s"])  # the writer's share of the CPU
    eff = (sum(res["async"]["periodic_stalls_s"]) + max(extra, 0.0)) / n
    print(f"\nstall per save: sync {s:.2f} s, async {a:.2f} s: ratio {a / s:.3f} (target <= 0.25)")
    print(f"effective cost per save (async stalls + slower steps while writing, over {n} saves): {eff:.2f} s, "
          f"ratio {eff / statistics.mean(res['sync']['periodic_stalls_s']):.3f}")
    print(json.dumps({"params_m": round(est["params_m"], 1), "results": res}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
