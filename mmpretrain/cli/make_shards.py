"""Build WebDataset shards from a folder tree (files sharing a stem form a sample) or a
JSONL/CSV manifest (image, audio, caption, optional label / caption_image / caption_audio / key).
Audio is resampled to the canonical rate and written as mono FLAC; writes sizes.json.

Example: mmpretrain-make-shards --input data/raw --out data/shards --max-size 256 --max-count 5000
(in a checkout also: python tools/make_shards.py ...)
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tarfile
from multiprocessing import Pool
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import soundfile as sf
from tqdm import tqdm

from mmpretrain.cli import tool_epilog
from mmpretrain.data.decode import resample

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
AUDIO_EXTS = ("flac", "wav", "mp3", "ogg")
Item = Dict[str, Optional[str]]  # key, image, audio (paths), caption, label, caption_image, caption_audio, json


def from_folder(root: str) -> List[Item]:
    """Group files by path-without-extension; .txt is the caption, .json is passed through."""
    groups: Dict[str, Dict[str, str]] = {}
    for d, _, files in os.walk(root):
        for fn in files:
            stem, ext = os.path.splitext(fn)
            rel = os.path.relpath(os.path.join(d, stem), root)
            groups.setdefault(rel, {})[ext.lower().lstrip(".")] = os.path.join(d, fn)
    items = []
    for rel in sorted(groups):
        g = groups[rel]
        item: Item = {"key": rel.replace(os.sep, "__").replace(".", "_"),
                      "image": next((g[e] for e in IMAGE_EXTS if e in g), None),
                      "audio": next((g[e] for e in AUDIO_EXTS if e in g), None),
                      "caption": None, "json": g.get("json")}
        if "txt" in g:
            with open(g["txt"], encoding="utf-8", errors="replace") as f:
                item["caption"] = f.read().strip()
        if item["image"] or item["audio"] or item["caption"] or item["json"]:
            items.append(item)
    return items


def from_manifest(path: str) -> List[Item]:
    """JSONL (one object a line) or CSV with a header; relative paths are relative to the manifest."""
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()] if path.endswith((".jsonl", ".json")) \
            else list(csv.DictReader(f))
    items = []
    for i, r in enumerate(rows):
        item: Item = {"key": str(r.get("key") or f"{i:09d}"), "json": None}
        for k in ("image", "audio"):
            v = r.get(k) or None
            item[k] = os.path.join(base, v) if v and not os.path.isabs(v) else v
        for k in ("caption", "caption_image", "caption_audio", "label"):
            v = r.get(k)
            item[k] = None if v in (None, "") else str(v)
        items.append(item)
    return items


def encode_sample(args: Tuple[Item, int]) -> Tuple[str, Dict[str, bytes], str]:
    """Item -> (key, ext -> bytes, error or ''). Runs in a pool."""
    item, rate = args
    out: Dict[str, bytes] = {}
    try:
        if item.get("image"):
            ext = os.path.splitext(item["image"])[1].lower().lstrip(".")
            with open(item["image"], "rb") as f:
                out["jpg" if ext == "jpeg" else ext] = f.read()
        if item.get("audio"):
            out["flac"] = _audio_flac(item["audio"], rate)
        meta = {}
        if item.get("json"):
            with open(item["json"], encoding="utf-8") as f:
                meta = json.load(f)
        for k in ("caption", "caption_image", "caption_audio"):
            if item.get(k):
                meta[k] = item[k]
        if item.get("label") is not None:
            meta["label"] = int(item["label"])
        if set(meta) - {"caption"}:
            out["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
        elif meta.get("caption"):
            out["txt"] = meta["caption"].encode("utf-8")
    except Exception as e:
        return item["key"], {}, f"{type(e).__name__}: {e}"
    return item["key"], out, ""


def _audio_flac(path: str, rate: int) -> bytes:
    x, sr = sf.read(path, dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    if rate and sr != rate:
        x, sr = resample(x, sr, rate), rate
    buf = io.BytesIO()
    sf.write(buf, np.clip(x, -1.0, 1.0), sr, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


class ShardWriter:
    """Rolls over to a new tar when the next sample would pass max_bytes or max_count."""

    def __init__(self, out: str, prefix: str, max_bytes: Optional[int], max_count: Optional[int]):
        self.out, self.prefix, self.max_bytes, self.max_count = out, prefix, max_bytes, max_count
        self.sizes: Dict[str, int] = {}
        self.tf: Optional[tarfile.TarFile] = None
        self.name, self.count, self.bytes = "", 0, 0

    def write(self, key: str, files: Dict[str, bytes]) -> None:
        size = sum(512 + len(v) + 511 for v in files.values())
        if self.tf is None or (self.count and ((self.max_count and self.count >= self.max_count) or
                                               (self.max_bytes and self.bytes + size > self.max_bytes))):
            self._next()
        for ext, data in sorted(files.items()):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self.tf.addfile(info, io.BytesIO(data))  # type: ignore[union-attr]
        self.count, self.bytes = self.count + 1, self.bytes + size
        self.sizes[self.name] = self.count

    def _next(self) -> None:
        self.close()
        self.name = f"{self.prefix}-{len(self.sizes):06d}.tar"
        self.tf = tarfile.open(os.path.join(self.out, self.name), "w", format=tarfile.USTAR_FORMAT)
        self.count, self.bytes = 0, 0

    def close(self) -> None:
        if self.tf is not None:
            self.tf.close()
            self.tf = None


def build_parser() -> argparse.ArgumentParser:
    # the whole docstring: its first line alone stopped mid-sentence
    ap = argparse.ArgumentParser(prog="mmpretrain-make-shards", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=tool_epilog(
                                     "Train on the shards with data.train=[{urls: 'OUT/PREFIX-{000000..NNNNNN}.tar'}] "
                                     "(sizes.json is found\nbeside them); data.audio.sample_rate should match "
                                     "--sample-rate."))
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="folder tree; files sharing a stem are one sample")
    src.add_argument("--manifest", help="JSONL or CSV manifest")
    ap.add_argument("--out", required=True, help="output directory (shards and sizes.json)")
    ap.add_argument("--prefix", default="shard", help="shard file names: PREFIX-000000.tar, ... (default shard)")
    ap.add_argument("--max-size", type=float, default=None, help="MB per shard")
    ap.add_argument("--max-count", type=int, default=None, help="samples per shard (default 1000 when neither is given)")
    ap.add_argument("--sample-rate", type=int, default=16000, help="canonical audio rate (0 = keep)")
    ap.add_argument("--workers", type=int, default=1, help="encoding processes (default 1)")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.max_size and not args.max_count:
        args.max_count = 1000
    items = from_folder(args.input) if args.input else from_manifest(args.manifest)
    os.makedirs(args.out, exist_ok=True)
    writer = ShardWriter(args.out, args.prefix, int(args.max_size * 2**20) if args.max_size else None, args.max_count)
    failed = []
    jobs = ((it, args.sample_rate) for it in items)
    pool = Pool(args.workers) if args.workers > 1 else None
    results: Iterator = pool.imap(encode_sample, jobs, chunksize=8) if pool else map(encode_sample, jobs)
    for key, files, err in tqdm(results, total=len(items), desc="samples", unit="sample"):
        if err or not files:
            failed.append((key, err or "no usable file"))
            continue
        writer.write(key, files)
    writer.close()
    if pool:
        pool.close()
    with open(os.path.join(args.out, "sizes.json"), "w") as f:
        json.dump(writer.sizes, f, indent=1)
    print(f"wrote {sum(writer.sizes.values())} samples in {len(writer.sizes)} shards to {args.out}; "
          f"{len(failed)} failed")
    for key, err in failed[:20]:
        print(f"  failed {key}: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
