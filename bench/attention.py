"""Attention throughput (TFLOP/s, forward and forward+backward) per backend on a GPU.
Without a GPU it says so and exits 0 (the Triton interpreter is not a benchmark).
Usage: python bench/attention.py [--batch 8 --heads 16 --dim 64 --lens 512 1024 2048 4096]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _time_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--lens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--mask", action="store_true", help="random key padding mask (~10%% padded)")
    a = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU available: attention benchmark skipped (nothing to measure on CPU)")
        return 0
    from mmpretrain.ops import attention as A

    dtype = getattr(torch, a.dtype)
    backends = ["sdpa", "triton"] + (["flash"] if A._has_flash() else [])
    print(f"{torch.cuda.get_device_name()}  B={a.batch} H={a.heads} D={a.dim} {a.dtype} causal={a.causal} mask={a.mask}")
    print(f"{'T':>6} | " + " | ".join(f"{b + ' fwd':>11} {b + ' f+b':>11}" for b in backends) + "   (TFLOP/s)")
    for T in a.lens:
        q, k, v = (torch.randn(a.batch, a.heads, T, a.dim, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        kpm = (torch.rand(a.batch, T, device="cuda") > 0.1) if a.mask else None
        flops = 4 * a.batch * a.heads * T * T * a.dim * (0.5 if a.causal else 1.0)  # two matmuls
        cells = []
        for b in backends:
            try:
                fwd = lambda: A.attention(q, k, v, causal=a.causal, key_padding_mask=kpm, backend=b)  # noqa: E731
                do = torch.randn_like(q)
                both = lambda: torch.autograd.grad(fwd(), (q, k, v), do)  # noqa: E731
                tf, tb = _time_ms(fwd), _time_ms(both)
                cells.append(f"{flops / tf / 1e9:11.1f} {3.5 * flops / tb / 1e9:11.1f}")  # bwd ~2.5x fwd
            except Exception as e:  # a backend may not support this case (e.g. flash + causal + mask)
                cells.append(f"{type(e).__name__:>23}")
        print(f"{T:>6} | " + " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
