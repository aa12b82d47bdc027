"""Write the learnable tri-modal demo data set (WebDataset shards); see mmpretrain/data/demo.py.

Example: mmpretrain-make-demo-data --out data/demo --train 4000 --eval 500
(in a checkout also: python tools/make_demo_data.py ...); configs/demo.yaml trains on it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

from mmpretrain.cli import tool_epilog
from mmpretrain.data.demo import make_demo_dataset, shard_urls


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mmpretrain-make-demo-data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=tool_epilog(
                                     "--image-size, --sample-rate and --clip-seconds should match data.image_size, "
                                     "data.audio.sample_rate\nand data.audio.clip_seconds of the run."))
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--train", type=int, default=4000, help="train samples")
    ap.add_argument("--eval", type=int, default=500, help="held-out eval samples (all modalities)")
    ap.add_argument("--shard-size", type=int, default=500, help="samples per tar shard")
    ap.add_argument("--seed", type=int, default=0, help="the data set is a function of the seed (default 0)")
    ap.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    ap.add_argument("--sample-rate", type=int, default=16000, help="audio sample rate in Hz (default 16000)")
    ap.add_argument("--clip-seconds", type=float, default=1.0, help="audio clip length (default 1.0)")
    ap.add_argument("--missing-share", type=float, default=0.175,
                    help="share of train samples missing exactly one modality")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)

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
