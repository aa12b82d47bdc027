"""Write the learnable tri-modal demo data set (WebDataset shards); see mmpretrain/data/demo.py.

Example: python tools/make_demo_data.py --out data/demo --train 4000 --eval 500
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from mmpretrain.data.demo import make_demo_dataset, shard_urls  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--train", type=int, default=4000, help="train samples")
    ap.add_argument("--eval", type=int, default=500, help="held-out eval samples (all modalities)")
    ap.add_argument("--shard-size", type=int, default=500, help="samples per tar shard")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--sample-rate", type=int, default=16000)
    ap.add_argument("--clip-seconds", type=float, default=1.0)
    ap.add_argument("--missing-share", type=float, default=0.175,
                    help="share of train samples missing exactly one modality")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    info = make_demo_dataset(args.out, train=args.train, eval=args.eval, shard_size=args.shard_size,
                             seed=args.seed, image_size=args.image_size, sample_rate=args.sample_rate,
                             clip_seconds=args.clip_seconds, missing_share=args.missing_share)
    dt = time.perf_counter() - t0
    for split in ("train", "eval"):
        print(f"{split}: {sum(info[split].values())} samples in {len(info[split])} shards: {shard_urls(args.out, split)}")
    print(f"classes: {len(info['classes'])} ({os.path.join(args.out, 'classes.json')}); took {dt:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
