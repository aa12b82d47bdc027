"""Towers only where they are used (issue 15): step time of a training step on a LAION + AudioCaps
style mix (image-text rows : audio-text rows = 3 : 1) with present-rows-only towers against the
forward before it (every tower on every row, masks after), and an image-text-only run's audio
share (parameters and FLOPs: 0 when the audio tower is left out).

One process, CPU, fp32, AdamW; the captioning demo model (configs/demo_caption.yaml: three
towers and the caption decoder) or --config.

    python bench/optional_towers.py                  # batch 32, 6 timed steps per case
    python bench/optional_towers.py --batch 64 --steps 10 --config configs/demo.yaml
"""
from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def mixed_batch(cfg, n: int, audio_share: float):
    """n rows: the first n * (1 - audio_share) image-text, the rest audio-text."""
    import torch

    from mmpretrain.data.tokenizer import ByteTokenizer
    from mmpretrain.modalities import Batch

    tok = ByteTokenizer()
    s, ns = cfg.data.image_size, int(cfg.data.audio.sample_rate * cfg.data.audio.clip_seconds)
    text, lens = tok.encode_batch([f"a caption of sample {i}" for i in range(n)], cfg.data.text_max_len)
    n_img = int(round(n * (1 - audio_share)))
    img = torch.zeros(n, dtype=torch.bool)
    img[:n_img] = True
    return Batch([str(i) for i in range(n)], ["mix"] * n, [0] * n,
                 {"image": torch.randn(n, 3, s, s) * img[:, None, None, None],
                  "audio": torch.randn(n, ns) * (~img)[:, None], "text": text},
                 {"image": img, "audio": ~img, "text": torch.ones(n, dtype=torch.bool)}, lens,
                 {"image": text.clone(), "audio": text.clone()}, {"image": lens.clone(), "audio": lens.clone()},
                 torch.arange(n))


def all_rows_forward(model, batch):
    """The forward before issue 15: every tower on every row, every caption row of every captioned
    modality through the decoder (tests/test_optional_towers.py checks it gives the same loss)."""
    import torch

    from mmpretrain import modalities as M
    from mmpretrain.models.model import CaptionOutput, ModelOutput

    emb, tok = {}, {}
    for name in model.towers:
        lengths = batch.text_len if name == M.TEXT else None
        emb[name], tok[name] = model.encode(name, batch.inputs[name], lengths, return_tokens=True)
    pairs = model.pair_names
    if model.decoder is None:
        return ModelOutput(emb, tok, {p: model.scale(p) for p in pairs},
                           {p: model.logit_bias[p].squeeze(0) for p in pairs}, None)
    mods = model.decoder.modalities
    toks = torch.cat([batch.captions[m] for m in mods], 0)
    lens = torch.cat([batch.caption_len[m] for m in mods], 0)
    present = torch.cat([batch.masks[m].bool() for m in mods], 0)
    _, states = model.caption_text(toks, lens)
    ctx, ctx_mask = model.decoder.stacked_context({m: tok[m] for m in mods})
    owner = torch.arange(len(mods)).repeat_interleave(len(batch))
    caption = CaptionOutput(mods, model.decoder(states[:, :-1], ctx, ctx_mask), toks, lens, present & (lens > 1), owner)
    return ModelOutput(emb, tok, {p: model.scale(p) for p in pairs}, {p: model.logit_bias[p].squeeze(0) for p in pairs},
                       caption)


def time_steps(cfg, batch, steps: int, old: bool) -> float:
    import torch

    from mmpretrain.engine import SkippableAdamW, TrainModule, param_groups
    from mmpretrain.models import build_model

    torch.manual_seed(0)
    model = build_model(cfg, 259)
    if old:
        model.forward = lambda b, captions=True: all_rows_forward(model, b)
    module = TrainModule(model, cfg)
    opt = SkippableAdamW(param_groups(module, cfg.optim.weight_decay), lr=cfg.optim.lr)
    times = []
    for i in range(steps + 1):  # the first is warm-up
        t0 = time.perf_counter()
        loss, _ = module(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def flops_by_tower(cfg, batch) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from mmpretrain.engine import TrainModule
    from mmpretrain.models import build_model

    model = build_model(cfg, 259)
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = TrainModule(model, cfg)(batch)
        loss.backward()
    # the total only: FlopCounterMode's per-module attribution double-counts around backward
    params = sum(p.numel() for n, p in model.named_parameters() if "audio" in n)
    return {"total": counter.get_total_flops(), "audio_params": params}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--config", default=os.path.join(REPO, "configs", "demo_caption.yaml"))
    args = p.parse_args()
    import torch

    from mmpretrain.config import load_config

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = load_config(args.config, ["model.attention_backend=sdpa"])
    batch = mixed_batch(cfg, args.batch, 0.25)
    new = time_steps(cfg, batch, args.steps, old=False)
    old = time_steps(cfg, batch, args.steps, old=True)
    print(f"{args.config}: batch {args.batch}, image-text : audio-text = 3 : 1, CPU, median of {args.steps} steps")
    print(f"  every tower on every row (before): {old:.3f} s/step")
    print(f"  present rows only:                 {new:.3f} s/step  ({new / old:.2f}x)")
    laion = load_config(args.config, ["model.attention_backend=sdpa", "model.audio.enabled=false"])
    full = flops_by_tower(cfg, mixed_batch(cfg, args.batch, 0.0))
    off = flops_by_tower(laion, mixed_batch(laion, args.batch, 0.0))
    print(f"image-text only, batch {args.batch} (no audio in the data):")
    print(f"  audio tower kept (one row x 0 per step): {full['audio_params']:,} audio parameters, "
          f"{full['total'] / 1e9:.3f} GFLOP per step")
    print(f"  model.audio.enabled=false:               {off['audio_params']:,} audio parameters, "
          f"{off['total'] / 1e9:.3f} GFLOP per step (audio: {(full['total'] - off['total']) / 1e9:.3f} GFLOP less)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
