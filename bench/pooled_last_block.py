"""Step time with and without the pooled-only last block (models/transformer.py Encoder pool_index),
on the OpenCLIP A/B model of ../shared/peers/openclip (ViT 64 px / patch 8, text context 32, width 256 x
4 blocks each): forward + backward + AdamW of the image-text contrastive loss, paired rounds alternating
the two, median seconds per step and their ratio.

Example: python bench/pooled_last_block.py [--rounds 6 --steps 5 --batch 64 --threads 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mmpretrain.config import load_config  # noqa: E402
from mmpretrain.models import build_model  # noqa: E402
from mmpretrain.models.audio import AudioTransformer  # noqa: E402
from mmpretrain.models.text import TextTransformer  # noqa: E402
from mmpretrain.models.vision import VisionTransformer  # noqa: E402

OVERRIDES = ["model.embed_dim=256", "model.vision.width=256", "model.vision.depth=4", "model.vision.heads=4",
             "model.vision.patch_size=8", "model.text.width=256", "model.text.depth=4", "model.text.heads=4",
             "data.image_size=64", "data.text_max_len=32", "loss.pairs.audio_text=0", "loss.pairs.image_audio=0"]


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round and setting")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = load_config(None, OVERRIDES)
    model = build_model(cfg, 400)
    b = a.batch
    images, tokens = torch.randn(b, 3, 64, 64), torch.randint(3, 390, (b, 32))
    lengths = torch.randint(12, 33, (b,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        logits = 10 * model.encode("image", images) @ model.encode("text", tokens, lengths).T
        F.cross_entropy(logits, torch.arange(b)).backward()
        opt.step()
        opt.zero_grad()

    times = {False: [], True: []}
    for _ in range(a.rounds):
        for on in (False, True):
            for cls in (VisionTransformer, TextTransformer, AudioTransformer):
                cls.supports_pooled_only = on
            step()  # warm
            t = time.perf_counter()
            for _ in range(a.steps):
                step()
            times[on].append((time.perf_counter() - t) / a.steps)
    full, pooled = statistics.median(times[False]), statistics.median(times[True])
    print(f"s/step, batch {b}, {a.threads} threads, median of {a.rounds} paired rounds:")
    print(f"  full last block    {full:.3f}  ({', '.join(f'{x:.3f}' for x in times[False])})")
    print(f"  pooled last block  {pooled:.3f}  ({', '.join(f'{x:.3f}' for x in times[True])})")
    print(f"  speed-up {full / pooled:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
