"""Data pipeline throughput per worker: raw tar read, decode only (PIL + soundfile on the same
bytes) and the full loader, for image-text, audio-text and image-text-audio shards.

The last column is issue 15's P2 figure (tri-modal row): the loader with N workers against N times
one process's decode-only rate; "decode xN procs" is N processes decoding at once, what N cores
actually give on this machine.

Example: python bench/data_throughput.py [--samples 256 --image-size 224 --workers 2 --rounds 5]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from mmpretrain.config import Config, SourceConfig  # noqa: E402
from mmpretrain.data import build_tokenizer, build_train_loader  # noqa: E402
from mmpretrain.data.shards import expand_urls, read_shard  # noqa: E402


def _jpeg(rng: np.random.Generator, size: int = 384) -> bytes:
    # smooth gradient + noise: compresses like a photo, not like a flat colour
    y, x = np.mgrid[0:size, 0:int(size * 1.33)]
    base = np.stack([x * 0.5, y * 0.6, (x + y) * 0.3], -1) % 255
    img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _flac(rng: np.random.Generator, seconds: float = 10.0, rate: int = 44100) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.05 * rng.normal(size=t.shape)
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), rate, format="FLAC")
    return buf.getvalue()


def make_set(root: str, kind: str, n: int, per_shard: int = 64) -> str:
    rng = np.random.default_rng(0)
    img, aud = _jpeg(rng), _flac(rng)  # same media bytes reused: generation time stays small
    sizes: Dict[str, int] = {}
    for s in range(-(-n // per_shard)):
        name = f"{kind}-{s:04d}.tar"
        count = min(per_shard, n - s * per_shard)
        with tarfile.open(os.path.join(root, name), "w") as tf:
            for j in range(count):
                files = {"txt": f"sample {s} {j} a synthetic caption".encode()}
                if "i" in kind:
                    files["jpg"] = img
                if "a" in kind:
                    files["flac"] = aud
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{s:04d}_{j:05d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        sizes[name] = count
    with open(os.path.join(root, "sizes.json"), "w") as f:
        json.dump(sizes, f)
    return os.path.join(root, f"{kind}-{{0000..{len(sizes) - 1:04d}}}.tar")


def bench_raw(url: str) -> float:
    t, n = time.perf_counter(), 0
    for u in expand_urls(url):
        for _ in read_shard(u):
            n += 1
    return n / (time.perf_counter() - t)


def bench_decode(url: str) -> float:
    samples = [r for u in expand_urls(url) for r in read_shard(u)]
    t = time.perf_counter()
    for r in samples:
        if "jpg" in r.files:
            Image.open(io.BytesIO(r.files["jpg"])).convert("RGB").load()
        if "flac" in r.files:
            sf.read(io.BytesIO(r.files["flac"]), dtype="float32")
    return len(samples) / (time.perf_counter() - t)


def bench_pipeline(url: str, args, workers: int) -> float:
    cfg = Config()
    cfg.data.train = [SourceConfig(name="bench", urls=url)]
    cfg.data.num_workers = workers
    cfg.data.image_size = args.image_size
    cfg.data.audio.sample_rate, cfg.data.audio.clip_seconds = 16000, args.clip_seconds
    cfg.data.shuffle_buffer = 64
    cfg.train.micro_batch_size = args.batch
    loader = build_train_loader(cfg, 0, 1, build_tokenizer("bytes"))
    next(loader)  # start-up (worker fork, first window) not timed
    n_batches = max(2, args.samples // args.batch)
    t = time.perf_counter()
    for _ in range(n_batches):
        next(loader)
    rate = n_batches * args.batch / (time.perf_counter() - t)
    loader.close()
    return rate


def bench_decode_parallel(url: str, processes: int) -> float:
    """Summed decode-only rate of `processes` processes decoding at once: what that many cores give
    on this machine (two vCPUs of a VM often give less than twice one)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue, barrier = ctx.Queue(), ctx.Barrier(processes)
    procs = [ctx.Process(target=_decode_worker, args=(url, queue, barrier)) for _ in range(processes)]
    for p in procs:
        p.start()
    rates = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


def _decode_worker(url: str, queue, barrier) -> None:
    barrier.wait()
    queue.put(bench_decode(url))


def _median(xs: List[float]) -> float:
    return float(np.median(xs))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--clip-seconds", type=float, default=5.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="also time the loader with this many workers")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate the measurements this many times and print medians (a shared VM's "
                         "speed drifts between readings; the ratio is taken within each round)")
    ap.add_argument("--kinds", default="image-text,audio-text,image-text-audio")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    kinds = {"image-text": "it", "audio-text": "at", "image-text-audio": "ita"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.kinds.split(","):
            url = make_set(tmp, kinds[label], args.samples)
            reads: Dict[str, List[float]] = {k: [] for k in ("raw", "dec", "decn", "pipe1", "pipen", "ratio")}
            for r in range(args.rounds):
                reads["raw"].append(bench_raw(url))
                reads["dec"].append(bench_decode(url))
                reads["pipe1"].append(bench_pipeline(url, args, 0))
                if args.workers:
                    reads["pipen"].append(bench_pipeline(url, args, args.workers))
                    reads["decn"].append(bench_decode_parallel(url, args.workers))
                    reads["ratio"].append(reads["pipen"][-1] / (args.workers * reads["dec"][-1]))
                if args.rounds > 1:
                    print(f"{label} round {r + 1}: decode {reads['dec'][-1]:.0f}, pipeline x{args.workers} "
                          f"{reads['pipen'][-1] if args.workers else float('nan'):.0f}, ratio "
                          f"{reads['ratio'][-1] if args.workers else float('nan'):.2f}", flush=True)
            rows.append((label, {k: _median(v) if v else float("nan") for k, v in reads.items()}))
    w = args.workers
    print(f"samples/s ({args.samples} samples; jpeg 510x384 -> {args.image_size}px; flac 10 s 44.1 kHz -> "
          f"{args.clip_seconds:g} s 16 kHz; cpu cores {os.cpu_count()}; median of {args.rounds} round(s))")
    head = (f"{'data':<18}{'raw tar read':>14}{'decode only':>13}{f'decode x{w} procs':>17}{'pipeline/worker':>17}"
            f"{f'pipeline x{w}':>14}{f'x{w} / ({w} x decode)':>20}")
    print(head)
    print("-" * len(head))
    for label, m in rows:
        print(f"{label:<18}{m['raw']:>14.0f}{m['dec']:>13.0f}{m['decn']:>17.0f}{m['pipe1']:>17.0f}{m['pipen']:>14.0f}"
              f"{m['ratio']:>20.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
