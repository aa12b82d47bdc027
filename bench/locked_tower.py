"""Step time, peak memory and optimizer state of a locked vs an unlocked HF image tower (issue 14).

A ViT built from a config (no download; --width / --depth / --image-size) is the image tower of the
tiny test model (native audio and text towers); one process, CPU, AdamW as the trainer builds it
(engine.param_groups: frozen parameters hold no optimizer state). Each case runs in a fresh
subprocess; peak memory = peak RSS during the timed steps minus the RSS before them.

    python bench/locked_tower.py                    # ViT width 256, depth 6, 64 px, batch 32
    python bench/locked_tower.py --width 384 --depth 8 --steps 10
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loss_memory import _status_kb  # noqa: E402  (the /proc/self/status reader of the memory bench)


def make_vit(out: str, width: int, depth: int, image_size: int) -> None:
    from transformers import AutoModel, ViTConfig, ViTImageProcessor

    cfg = ViTConfig(image_size=image_size, patch_size=8, hidden_size=width, num_hidden_layers=depth,
                    num_attention_heads=max(1, width // 64), intermediate_size=4 * width,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    AutoModel.from_config(cfg, add_pooling_layer=False).save_pretrained(out)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(out)


def run_case(vit: str, lock: bool, args: argparse.Namespace) -> dict:
    import torch

    from mmpretrain.config import load_config
    from mmpretrain.data.tokenizer import ByteTokenizer
    from mmpretrain.engine import SkippableAdamW, TrainModule, param_groups
    from mmpretrain.modalities import Batch
    from mmpretrain.models import build_model

    torch.manual_seed(0)
    cfg = load_config(os.path.join(REPO, "configs", "tiny_test.yaml"), [
        "model.vision.kind=hf", f"model.vision.hf_path={vit}", f"model.vision.lock={str(lock).lower()}",
        f"data.image_size={args.image_size}", "model.text.decoder_depth=0", "loss.caption_weight=0"])
    tok = ByteTokenizer()
    module = TrainModule(build_model(cfg, tok.vocab_size), cfg)
    opt = SkippableAdamW(param_groups(module, cfg.optim.weight_decay), lr=cfg.optim.lr)
    n, s = args.batch, args.image_size
    ns = int(cfg.data.audio.sample_rate * cfg.data.audio.clip_seconds)
    text, lens = tok.encode_batch([f"caption {i}" for i in range(n)], cfg.data.text_max_len)
    ones = torch.ones(n, dtype=torch.bool)
    batch = Batch([str(i) for i in range(n)], ["b"] * n, [0] * n,
                  {"image": torch.randn(n, 3, s, s), "audio": torch.randn(n, ns), "text": text},
                  {"image": ones, "audio": ones, "text": ones}, lens, {}, {}, torch.arange(n))

    def step() -> None:
        loss, _ = module(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state allocated, kernels chosen
    rss0 = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
    except OSError:
        pass
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    state_bytes = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                      if torch.is_tensor(v))
    tower = module.model.towers["image"]
    return {"lock": lock, "step_s_median": sorted(times)[len(times) // 2],
            "peak_rss_delta_mib": (_status_kb("VmHWM") - rss0) / 1024,
            "optimizer_state_mib": state_bytes / 2**20,
            "image_tower_params_m": sum(p.numel() for p in tower.parameters()) / 1e6,
            "trainable_params_m": sum(p.numel() for p in module.parameters() if p.requires_grad) / 1e6}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--case", choices=("locked", "unlocked"), help=argparse.SUPPRESS)
    p.add_argument("--vit", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.case:  # one case, in its own process
        print(json.dumps(run_case(args.vit, args.case == "locked", args)))
        return 0
    from mmpretrain.models.hf import quiet

    with tempfile.TemporaryDirectory() as d, quiet():
        make_vit(d, args.width, args.depth, args.image_size)
        rows = []
        for case in ("unlocked", "locked"):
            cmd = [sys.executable, __file__, "--case", case, "--vit", d, "--width", str(args.width), "--depth",
                   str(args.depth), "--image-size", str(args.image_size), "--batch", str(args.batch),
                   "--steps", str(args.steps)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(f"ViT width {args.width} depth {args.depth}, {args.image_size} px, batch {args.batch}, CPU, "
          f"median of {args.steps} steps")
    print(f"{'image tower':12s} {'step s':>8s} {'peak RSS MiB':>13s} {'opt state MiB':>14s} {'trainable M':>12s}")
    for r in rows:
        print(f"{'locked' if r['lock'] else 'unlocked':12s} {r['step_s_median']:8.3f} {r['peak_rss_delta_mib']:13.1f} "
              f"{r['optimizer_state_mib']:14.2f} {r['trainable_params_m']:12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
