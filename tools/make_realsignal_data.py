"""Write the real-signal benchmark: handwritten digits, the digit spoken by unseen voices, captions.

Images are scikit-learn's bundled handwritten digits (1797 scans of 8x8 pixels, real hands, no
download), upscaled to PNG. Audio is the digit's word spoken by espeak-ng (Debian's `espeak-ng`;
installed with apt-get when missing and running as root): every clip draws a voice = accent x
voice variant, and a pitch and speed. The voice variants are split in two: **the test split's
variants never occur in training**, and its images are scans never seen in training either.
Captions come from several templates per modality (json lists `caption`, `caption_image`,
`caption_audio`; the loader samples one per step), and `label` is the digit (class-level hits).

Example: python tools/make_realsignal_data.py --out data/realsignal
         -> data/realsignal/{train,eval}/*.tar, classes.json, voices.json
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import soundfile as sf
from PIL import Image

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ACCENTS = ["en", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029", "en-us-nyc"]
TEXT = ["the digit {w}", "the number {w}", "{w}", "number {n}", "the digit {n}, {w}"]
IMAGE_TEXT = ["a handwritten {w}", "a handwritten digit {n}", "an image of the digit {w}",
              "a scan of a hand-written {n}", "the number {w}, written by hand"]
AUDIO_TEXT = ["someone says {w}", "a voice saying {w}", "the spoken word {w}", "a recording of the number {w}",
              "a speaker pronounces {n}"]


def ensure_espeak() -> str:
    """The espeak-ng binary; installs Debian's package when missing and possible, else says how."""
    exe = shutil.which("espeak-ng")
    if exe:
        return exe
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "espeak-ng"]
        if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
            subprocess.run(cmd, env=env, capture_output=True)
        exe = shutil.which("espeak-ng")
    if not exe:
        raise SystemExit("error: espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    return exe


def voice_variants(exe: str) -> List[str]:
    out = subprocess.run([exe, "--voices=variant"], capture_output=True, text=True, check=True).stdout
    names = sorted({line.split()[4].split("/", 1)[1] for line in out.splitlines()[1:] if len(line.split()) >= 5})
    if len(names) < 8:
        raise SystemExit(f"error: espeak-ng lists only {len(names)} voice variants; need at least 8")
    return names


def split_voices(variants: Sequence[str], test_share: float, seed: int) -> Tuple[List[str], List[str]]:
    """Disjoint train / test voice variants (a seeded shuffle)."""
    order = list(np.random.default_rng(seed).permutation(sorted(variants)))
    n_test = max(1, int(round(len(order) * test_share)))
    return sorted(order[n_test:]), sorted(order[:n_test])


def speak(exe: str, word: str, voice: str, pitch: int, speed: int, rate: int) -> np.ndarray:
    """float32 mono at `rate`, leading / trailing silence cut."""
    wav = subprocess.run([exe, "-v", voice, "-p", str(pitch), "-s", str(speed), "--stdout", word],
                         capture_output=True, check=True).stdout
    x, src = sf.read(io.BytesIO(wav), dtype="float32")
    if x.ndim > 1:
        x = x.mean(axis=1)
    loud = np.flatnonzero(np.abs(x) > 0.02 * max(float(np.abs(x).max()), 1e-6))
    if loud.size:
        x = x[max(0, loud[0] - src // 50):loud[-1] + src // 50]
    if src != rate:
        import soxr

        x = soxr.resample(x, src, rate).astype(np.float32)
    return x


def clip_pool(exe: str, voices: Sequence[str], per_digit: int, rate: int, seed: int) -> List[Tuple[int, str, bytes]]:
    """per_digit clips of every digit: (digit, voice, flac bytes), each with its own voice, pitch, speed."""
    rng = np.random.default_rng(seed)
    jobs = []
    for d in range(10):
        for _ in range(per_digit):
            voice = f"{ACCENTS[rng.integers(len(ACCENTS))]}+{voices[rng.integers(len(voices))]}"
            jobs.append((d, voice, int(rng.integers(20, 81)), int(rng.integers(130, 211))))

    def one(job):
        d, voice, pitch, speed = job
        x = speak(exe, WORDS[d], voice, pitch, speed, rate)
        buf = io.BytesIO()
        sf.write(buf, x, rate, format="FLAC")
        return d, f"{voice} p{pitch} s{speed}", buf.getvalue()

    with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:  # espeak-ng runs in its own processes
        return list(pool.map(one, jobs))


def digit_images(size: int, test_per_digit: int, seed: int) -> Tuple[List[Tuple[int, bytes]], List[Tuple[int, bytes]]]:
    """scikit-learn's handwritten digits as PNG (size x size), split into disjoint train / test scans."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    train, test = [], []
    for d in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == d))
        for j, i in enumerate(idx):
            px = (digits.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
            img = Image.fromarray(255 - px, "L").resize((size, size), Image.BICUBIC).convert("RGB")  # dark ink on white
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            (test if j < test_per_digit else train).append((d, buf.getvalue()))
    return train, test


def _captions(d: int, templates: Sequence[str]) -> List[str]:
    return [t.format(w=WORDS[d], n=d) for t in templates]


def _write_shards(out: Path, split: str, samples: List[Dict[str, bytes]], shard_size: int) -> Dict[str, int]:
    split_dir = out / split
    split_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for s in range(0, len(samples), shard_size):
        name = f"{split}-{s // shard_size:06d}.tar"
        with tarfile.open(split_dir / name, "w") as tf:
            for sample in samples[s:s + shard_size]:
                key = sample.pop("__key__")
                for ext, data in sample.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime = len(data), 0
                    tf.addfile(info, io.BytesIO(data))
        sizes[name] = len(samples[s:s + shard_size])
    (split_dir / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n")
    return sizes


def make_realsignal(out: str, train: int = 6000, train_clips: int = 400, test_clips: int = 50,
                    test_images: int = 50, test_voice_share: float = 0.25, image_size: int = 32,
                    sample_rate: int = 16000, missing_share: float = 0.1, shard_size: int = 1000,
                    seed: int = 0) -> Dict[str, object]:
    exe = ensure_espeak()
    train_voices, test_voices = split_voices(voice_variants(exe), test_voice_share, seed)
    img_train, img_test = digit_images(image_size, test_images, seed)
    clips_train = clip_pool(exe, train_voices, train_clips, sample_rate, seed + 1)
    clips_test = clip_pool(exe, test_voices, test_clips, sample_rate, seed + 2)
    by_digit = lambda items: {d: [it for it in items if it[0] == d] for d in range(10)}  # noqa: E731
    itr, atr = by_digit(img_train), by_digit(clips_train)
    rng = np.random.default_rng(seed + 3)

    def sample(key: str, d: int, png: Optional[bytes], clip: Optional[Tuple[int, str, bytes]],
               fixed_text: bool) -> Dict[str, bytes]:
        meta = {"label": d, "caption": _captions(d, TEXT), "caption_image": _captions(d, IMAGE_TEXT),
                "caption_audio": _captions(d, AUDIO_TEXT)}
        if fixed_text:  # eval: one caption per sample
            meta = {k: (v[0] if isinstance(v, list) else v) for k, v in meta.items()}
        s: Dict[str, bytes] = {"__key__": key, "json": b""}  # json first in the tar, filled in below
        if png is not None:
            s["png"] = png
        if clip is not None:
            s["flac"] = clip[2]
            meta["voice"] = clip[1]
        s["json"] = json.dumps(meta, sort_keys=True).encode()
        return s

    train_samples = []
    for i in range(train):
        d = int(rng.integers(10))
        img = itr[d][rng.integers(len(itr[d]))][1]
        clip = atr[d][rng.integers(len(atr[d]))]
        drop = rng.random() < missing_share
        which = int(rng.integers(2)) if drop else -1  # one modality missing: the image or the audio
        train_samples.append(sample(f"tr{i:06d}", d, None if which == 0 else img, None if which == 1 else clip,
                                    fixed_text=False))
    ite, ate = by_digit(img_test), by_digit(clips_test)
    eval_samples = []
    for d in range(10):  # each held-out scan once, with a held-out voice's clip of the same digit
        for j, (_, png) in enumerate(ite[d]):
            eval_samples.append(sample(f"ev{d}{j:04d}", d, png, ate[d][j % len(ate[d])], fixed_text=True))
    rng.shuffle(eval_samples)
    root = Path(out)
    info = {"train": _write_shards(root, "train", train_samples, shard_size),
            "eval": _write_shards(root, "eval", eval_samples, shard_size)}
    (root / "classes.json").write_text(json.dumps(WORDS, indent=1) + "\n")
    (root / "voices.json").write_text(json.dumps({"train": train_voices, "test": test_voices, "accents": ACCENTS},
                                                 indent=1) + "\n")
    return info


def shard_pattern(out: str, split: str) -> str:
    sizes = json.loads((Path(out) / split / "sizes.json").read_text())
    return os.path.join(out, split, f"{split}-{{000000..{len(sizes) - 1:06d}}}.tar")


def main(argv: Optional[List[str]] = None) -> int:
    # the whole docstring (its first line alone dropped the rest)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--train", type=int, default=6000, help="train samples (scans and clips recur, paired afresh)")
    ap.add_argument("--train-clips", type=int, default=400, help="spoken clips per digit from the train voices")
    ap.add_argument("--test-clips", type=int, default=50, help="spoken clips per digit from the test voices")
    ap.add_argument("--test-images", type=int, default=50, help="held-out scans per digit")
    ap.add_argument("--test-voice-share", type=float, default=0.25, help="share of voice variants held out")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--sample-rate", type=int, default=16000)
    ap.add_argument("--missing-share", type=float, default=0.1, help="train samples missing the image or the audio")
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    info = make_realsignal(a.out, a.train, a.train_clips, a.test_clips, a.test_images, a.test_voice_share,
                           a.image_size, a.sample_rate, a.missing_share, a.shard_size, a.seed)
    for split in ("train", "eval"):
        print(f"{split}: {sum(info[split].values())} samples: {shard_pattern(a.out, split)}")
    voices = json.loads((Path(a.out) / "voices.json").read_text())
    print(f"voice variants: {len(voices['train'])} train, {len(voices['test'])} test (disjoint); "
          f"took {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
