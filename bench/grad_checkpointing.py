"""Activation checkpointing (issue 15): peak memory and time of one forward + backward of a
ViT-B/16-sized native image tower (width 768, depth 12, 12 heads, patch 16, 224 px) at batch 16 on
CPU, with and without `model.vision.grad_checkpointing`. Each case runs in a fresh process; peak =
peak RSS during the timed pass minus the RSS before it (weights and their gradients excluded:
the gradients are allocated by a warm-up pass first).

    python bench/grad_checkpointing.py                      # ViT-B/16, 224 px, batch 16
    python bench/grad_checkpointing.py --width 384 --depth 6 --batch 8
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loss_memory import _reset_peak, _status_kb  # noqa: E402  (the memory bench's /proc readers)


def run_case(args: argparse.Namespace, checkpointing: bool) -> dict:
    import torch

    from mmpretrain.config import load_config
    from mmpretrain.models.transformer import set_grad_checkpointing
    from mmpretrain.models.vision import VisionTransformer

    cfg = load_config(os.path.join(REPO, "configs", "tiny_test.yaml"), [
        f"model.vision.width={args.width}", f"model.vision.depth={args.depth}", f"model.vision.heads={args.heads}",
        f"model.vision.patch_size={args.patch}", "model.vision.stem=patch", f"data.image_size={args.image_size}"])
    torch.manual_seed(0)
    tower = VisionTransformer(cfg.model.vision, args.image_size, 0.0).train()
    set_grad_checkpointing(tower, checkpointing)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)

    def step() -> float:
        t0 = time.perf_counter()
        pooled, tokens = tower(x)
        (pooled.square().mean() + tokens.square().mean()).backward()
        return time.perf_counter() - t0

    step()  # warm-up: gradients allocated
    rss0 = _status_kb("VmRSS")
    _reset_peak()
    took = step()
    return {"checkpointing": checkpointing, "peak_mib": (_status_kb("VmHWM") - rss0) / 1024, "seconds": took,
            "params_m": sum(p.numel() for p in tower.parameters()) / 1e6}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--case", choices=("on", "off"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(args, args.case == "on")))
        return 0
    rows = []
    for case in ("off", "on"):
        cmd = [sys.executable, __file__, "--case", case] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                                                             if k != "case"]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    off, on = rows
    print(f"native image tower width {args.width} depth {args.depth} heads {args.heads} patch {args.patch}, "
          f"{args.image_size} px, batch {args.batch}, CPU fp32, {off['params_m']:.1f} M parameters")
    print(f"{'checkpointing':14s} {'peak MiB':>9s} {'fwd+bwd s':>10s}")
    for r in rows:
        print(f"{'on' if r['checkpointing'] else 'off':14s} {r['peak_mib']:9.0f} {r['seconds']:10.2f}")
    print(f"peak with / without: {on['peak_mib'] / off['peak_mib']:.2f}x, time {on['seconds'] / off['seconds']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
