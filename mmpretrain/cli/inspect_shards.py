"""Summarize WebDataset shards: samples per modality, audio durations, image sizes, decode errors.

Example: mmpretrain-inspect-shards 'data/train-{000..009}.tar' [--write-sizes sizes.json]
(in a checkout also: python tools/inspect_shards.py ...)
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from collections import Counter
from typing import Dict, List, Optional

import numpy as np
import soundfile as sf
from PIL import Image

from mmpretrain import modalities as M
from mmpretrain.cli import tool_epilog
from mmpretrain.config import SourceConfig
from mmpretrain.data.samples import parse_source
from mmpretrain.data.shards import ShardError, expand_urls, read_shard, shard_name, shard_sizes


def inspect(urls: str, limit: Optional[int] = None, max_pixels: int = 50_000_000) -> Dict:
    """Read every sample (headers of media only: no pixel or audio decoding)."""
    spec = parse_source(SourceConfig(urls=urls), 0)
    counts: Counter = Counter()
    errors: Counter = Counter()
    sizes: Dict[str, int] = {}
    durations: List[float] = []
    dims: List[tuple] = []
    damaged: Dict[str, Dict[str, object]] = {}
    for url in expand_urls(urls):
        n = 0
        try:  # the reader and the sizes training uses: its positions and skip reasons are ours
            size = shard_sizes([url], required=False)[0]
        except ShardError:
            size = None
        for raw in read_shard(url, 0, size):
            n += 1
            counts["samples"] += 1
            if raw.error:
                errors[raw.error] += 1
                d = damaged.setdefault(shard_name(url), {"detail": raw.detail})
                d[raw.error] = int(d.get(raw.error, 0)) + 1  # type: ignore[call-overload]
                continue
            f = raw.files
            found = {name: next((f[e] for e in keys if e in f), None) for name, keys in spec.media_keys.items()}
            found[M.TEXT] = _text(f, errors)
            kinds = "+".join(k for k, v in found.items() if v)
            img, aud = found.get("image"), found.get("audio")  # the header checks below know these two
            counts[kinds or "empty"] += 1
            if img is not None:
                try:
                    with Image.open(io.BytesIO(img)) as im:
                        dims.append(im.size)
                        if im.size[0] * im.size[1] > max_pixels:
                            errors["image_too_large"] += 1
                        else:
                            im.verify()
                except Image.DecompressionBombError:  # PIL's own ceiling: the header says too many pixels
                    errors["image_too_large"] += 1
                except Exception:
                    errors["image_decode"] += 1
            if aud is not None:
                try:
                    info = sf.info(io.BytesIO(aud))
                    durations.append(info.frames / info.samplerate)
                except Exception:
                    errors["audio_decode"] += 1
            if limit and counts["samples"] >= limit:
                break
        sizes[shard_name(url)] = n
    report = {"shards": len(sizes), "counts": dict(counts), "errors": dict(errors), "sizes": sizes,
              "damaged_shards": damaged}
    if durations:
        d = np.array(durations)
        report["audio_seconds"] = {"min": float(d.min()), "mean": float(d.mean()), "max": float(d.max())}
    if dims:
        w, h = np.array([x[0] for x in dims]), np.array([x[1] for x in dims])
        report["image_size"] = {"min": [int(w.min()), int(h.min())], "mean": [float(w.mean()), float(h.mean())],
                                "max": [int(w.max()), int(h.max())]}
    return report


def _text(f: Dict[str, bytes], errors: Counter) -> Optional[str]:
    try:
        if "txt" in f:
            return f["txt"].decode("utf-8").strip() or None
        if "json" in f:
            meta = json.loads(f["json"].decode("utf-8"))
            cap = meta.get("caption") if isinstance(meta, dict) else None
            return cap if isinstance(cap, str) and cap.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        errors["text_decode"] += 1
    return None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mmpretrain-inspect-shards", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=tool_epilog(
                                     "Training counts damaged samples the same way: data.max_error_rate and "
                                     "data.min_samples_for_error_rate\nsay how many it tolerates; --write-sizes "
                                     "makes the sizes.json that data.train[].sizes names."))
    ap.add_argument("urls", nargs="?", help="shard urls (brace expansion, '::' separated groups, pipe:)")
    ap.add_argument("--data", help="the shard urls as a flag, the spelling the other tools use")
    ap.add_argument("--limit", type=int, default=None, help="stop after this many samples")
    ap.add_argument("--write-sizes", default=None, help="write shard -> sample count json here")
    ap.add_argument("--json", action="store_true", help="print the report as json")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if (args.urls is None) == (args.data is None):
        ap.error("give the shard urls once: as the positional argument or as --data")
    rep = inspect(args.urls or args.data, args.limit)
    if args.write_sizes:
        with open(args.write_sizes, "w") as f:
            json.dump(rep["sizes"], f, indent=1)
    if args.json:
        print(json.dumps(rep, indent=1))
        return 0
    print(f"shards: {rep['shards']}  samples: {rep['counts'].get('samples', 0)}")
    for k, v in sorted(rep["counts"].items()):
        if k != "samples":
            print(f"  {k:<20} {v}")
    if "audio_seconds" in rep:
        a = rep["audio_seconds"]
        print(f"audio seconds: min {a['min']:.2f}  mean {a['mean']:.2f}  max {a['max']:.2f}")
    if "image_size" in rep:
        s = rep["image_size"]
        print(f"image size: min {s['min']}  mean [{s['mean'][0]:.0f}, {s['mean'][1]:.0f}]  max {s['max']}")
    for name, d in sorted(rep["damaged_shards"].items()):
        print(f"damaged shard {name}: " + ", ".join(f"{k}={v}" for k, v in d.items() if k != "detail")
              + f" ({d['detail']})")
    print("errors: " + (", ".join(f"{k}={v}" for k, v in sorted(rep["errors"].items())) or "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
