"""Peak memory and time of the naive vs tiled contrastive loss (forward + backward) on CPU.

Each case runs in a fresh subprocess; peak memory = peak RSS during the step minus the RSS
just before it (the kernel's peak counter is reset via /proc/self/clear_refs where possible).
Usage: python bench/loss_memory.py [--sizes 1024 2048 ...] [--dim 256] [--check 16384]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAIVE_LIMIT_GB = 16.0


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _inputs(n: int, dim: int, dtype, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, dim, generator=g, dtype=dtype)
    k = torch.randn(n, dim, generator=g, dtype=dtype)
    q.div_(q.norm(dim=1, keepdim=True))  # in place: keep set-up temporaries small
    k.div_(k.norm(dim=1, keepdim=True))
    col_valid = torch.rand(n, generator=g) > 0.05
    targets = torch.where(col_valid, torch.arange(n), torch.full((n,), -1))
    scale = torch.tensor(1 / 0.07, dtype=dtype)
    return q.requires_grad_(), k.requires_grad_(), scale.requires_grad_(), targets, col_valid


def child(impl: str, n: int, dim: int, tile: int) -> dict:
    import torch

    from mmpretrain.ops.contrastive import contrastive_rows

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    q, k, scale, targets, col_valid = _inputs(n, dim, torch.float32)

    def step():
        loss = contrastive_rows(q, k, scale, targets, col_valid, impl=impl, tile_size=tile or None).sum()
        loss.backward()
        q.grad = k.grad = scale.grad = None

    exact = _reset_peak()
    base = _status_kb("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    step()
    t1 = time.perf_counter() - t0
    peak = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    step()  # second (warm) run for the time
    return {"peak_mb": (peak - base) / 1024, "time_s": min(t1, time.perf_counter() - t0)}


def check_grads(n: int, dim: int, tile: int) -> dict:
    """Tiled vs naive at size n: float64 (naive run in row blocks, which is exact because the
    loss is row-separable) and float32 (naive on the full logits)."""
    import torch

    from mmpretrain.ops.contrastive import contrastive_rows_naive, contrastive_rows_tiled

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    def grads(fn, dtype, rows=None):
        q, k, scale, targets, col_valid = _inputs(n, dim, dtype, seed=1)
        g = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=dtype)
        losses = []
        for r0 in range(0, n, rows or n):
            sl = slice(r0, r0 + (rows or n))
            loss = fn(q[sl], k, scale, targets[sl], col_valid)
            loss.backward(g[sl])
            losses.append(loss.detach())
        return [torch.cat(losses), q.grad, k.grad, scale.grad]

    def rel(a, b):
        return max(((x.double() - y.double()).norm() / y.double().norm()).item() for x, y in zip(a, b))

    tiled = lambda *a: contrastive_rows_tiled(*a, tile_size=tile or None)  # noqa: E731
    out = {"fp64_rel_err": rel(grads(tiled, torch.float64), grads(contrastive_rows_naive, torch.float64, rows=2048))}
    out["fp32_rel_err"] = rel(grads(tiled, torch.float32), grads(contrastive_rows_naive, torch.float32))
    return out


def _run_child(args: list) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"rc {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--tile", type=int, default=None, help="tiled loss column tile (default: the library's, "
                                                           "ops.contrastive.tile_columns)")
    ap.add_argument("--check", type=int, default=16384, help="size for the gradient check (0 = skip)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        if a.child[0] == "check":
            print(json.dumps(check_grads(int(a.child[1]), int(a.child[2]), int(a.child[3]))))
        else:
            print(json.dumps(child(a.child[0], int(a.child[1]), int(a.child[2]), int(a.child[3]))))
        return

    tile = a.tile or 0  # 0: the library's choice (ops.contrastive.tile_columns)
    print(f"contrastive loss fwd+bwd, CPU fp32, D={a.dim}, n=N, tile={tile or 'auto'}, "
          f"threads={os.environ.get('OMP_NUM_THREADS', '1')}")
    print(f"{'N':>6} | {'naive MB':>9} {'naive s':>8} | {'tiled MB':>9} {'tiled s':>8} | {'mem ratio':>9}")
    for n in a.sizes:
        row = {}
        est_gb = 4.5 * n * n * 4 / 2**30  # measured: ~4 live (n, N) fp32 tensors in naive fwd+bwd
        for impl in ("naive", "torch_tiled"):
            if impl == "naive" and est_gb > NAIVE_LIMIT_GB:
                row[impl] = {"skip": f"skip (~{est_gb:.0f}GB)"}
                continue
            row[impl] = _run_child([impl, n, a.dim, tile])

        def cells(r):
            if "skip" in r or "error" in r:
                return f"{r.get('skip', 'ERR'):>18}"
            return f"{r['peak_mb']:9.1f} {r['time_s']:8.3f}"

        nv, tv = row["naive"], row["torch_tiled"]
        ratio = f"{nv['peak_mb'] / max(tv['peak_mb'], 1e-3):9.1f}" if "peak_mb" in nv and "peak_mb" in tv else f"{'-':>9}"
        print(f"{n:>6} | {cells(nv)} | {cells(tv)} | {ratio}", flush=True)
        for r in (nv, tv):
            if "error" in r:
                print("   error:", r["error"])
    if a.check:
        res = _run_child(["check", a.check, a.dim, tile])
        print(f"gradient check at N={a.check} (loss, dq, dk, dscale; max relative error vs naive): {res}")


if __name__ == "__main__":
    main()
