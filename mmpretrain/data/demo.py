"""Learnable tri-modal demo data set: coloured shapes, matching sounds and captions.

Colour <-> image colour and audio pitch; shape <-> image shape and audio timbre/rhythm.
Written as WebDataset tar shards, deterministic given the seed, no network.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Set

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw
from webdataset import TarWriter

SHAPES: List[str] = ["circle", "square", "triangle", "cross"]
COLOURS: List[str] = ["red", "green", "blue", "yellow"]
NUM_CLASSES = len(SHAPES) * len(COLOURS)
MODALITIES = ("image", "audio", "text")

RGB: Dict[str, tuple] = {"red": (220, 40, 40), "green": (40, 200, 50), "blue": (50, 80, 235), "yellow": (230, 215, 40)}
# ratio 1.5 between neighbours: fundamentals stay apart by far more than the +-2 % detune
PITCH_HZ: Dict[str, float] = {"red": 262.0, "green": 392.0, "blue": 587.0, "yellow": 880.0}
PITCH_WORD: Dict[str, str] = {"red": "low", "green": "medium", "blue": "high", "yellow": "very high"}
WAVE: Dict[str, str] = {"circle": "sine", "square": "square", "triangle": "sawtooth", "cross": "pulsed"}
WAVE_WORDS: Dict[str, str] = {
    "circle": "a smooth sine tone",
    "square": "a buzzy square-wave tone",
    "triangle": "a bright sawtooth tone",
    "cross": "pulsed beeps",
}
CAPTION_TEMPLATES: List[str] = [
    "a {colour} {shape}",
    "a picture of a {colour} {shape}",
    "{colour} {shape} shape",
    "the {shape} is {colour}",
    "a photo of a {colour} {shape}",
    "a {colour}-coloured {shape}",
    "an image showing a {colour} {shape}",
    "a {colour} {shape} on a dark background",
    "there is a {colour} {shape}",
    "a {shape} coloured {colour}",
]
_SPLIT_CODE = {"train": 0, "eval": 1}  # separate seed streams per split


def label_of(shape: str, colour: str) -> int:
    """Class id: shape-major, colour-minor."""
    return SHAPES.index(shape) * len(COLOURS) + COLOURS.index(colour)


def attributes_of(label: int) -> tuple:
    """(shape, colour) of a class id."""
    return SHAPES[label // len(COLOURS)], COLOURS[label % len(COLOURS)]


def class_names() -> List[str]:
    """Zero-shot prompts in label order: 'a {colour} {shape}'."""
    return [f"a {c} {s}" for s in SHAPES for c in COLOURS]


def image_caption(shape: str, colour: str) -> str:
    return f"a {colour} {shape}"


def audio_caption(shape: str, colour: str) -> str:
    return f"{WAVE_WORDS[shape]} at {PITCH_WORD[colour]} pitch"


# ----------------------------------------------------------------------------- image


def _shape_polygon(shape: str, cx: float, cy: float, r: float, theta: float) -> list:
    if shape == "square":
        pts = [(math.cos(theta + k * math.pi / 2), math.sin(theta + k * math.pi / 2)) for k in range(4)]
    elif shape == "triangle":
        pts = [(math.cos(theta + k * 2 * math.pi / 3), math.sin(theta + k * 2 * math.pi / 3)) for k in range(3)]
    elif shape == "cross":
        w = 0.33  # arm half-width relative to the arm length
        base = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]
        c, s = math.cos(theta), math.sin(theta)
        pts = [(x * c - y * s, x * s + y * c) for x, y in base]
    else:
        raise ValueError(f"not a polygon shape: {shape!r}")
    return [(cx + r * x, cy + r * y) for x, y in pts]


def render_image(shape: str, colour: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """(size, size, 3) uint8: the shape in its (jittered) colour on a noisy dark gradient."""
    # background: gradient between two random dark colours along a random direction
    c0, c1 = rng.uniform(0, 70, 3), rng.uniform(0, 70, 3)
    ang = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    t = (xx * math.cos(ang) + yy * math.sin(ang))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]

    # large shapes near upright: a tiny model must learn shape within a CPU demo's minutes
    r = rng.uniform(0.26, 0.4) * size  # circumradius
    cx, cy = rng.uniform(r + 1, size - r - 1, 2)
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        rc = 0.85 * r  # so circles are not much bigger than the polygons
        draw.ellipse([cx - rc, cy - rc, cx + rc, cy + rc], fill=255)
    else:
        upright = {"square": math.pi / 4, "triangle": -math.pi / 2, "cross": 0.0}[shape]
        theta = upright + rng.uniform(-0.3, 0.3)  # +-17 degrees
        draw.polygon(_shape_polygon(shape, cx, cy, r, theta), fill=255)
    fg = np.clip(np.asarray(RGB[colour], np.float32) + rng.uniform(-25, 25, 3), 0, 255)
    m = np.asarray(mask, np.float32)[..., None] / 255.0
    img = img * (1 - m) + fg[None, None, :] * m
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- audio


def synth_audio(shape: str, colour: str, rng: np.random.Generator, sample_rate: int = 16000,
                clip_seconds: float = 1.0) -> np.ndarray:
    """(n,) float32 in [-1, 1]: colour sets the pitch, shape the waveform (pulsed = gated sine)."""
    n = max(int(round(sample_rate * clip_seconds)), 1)
    t = np.arange(n, dtype=np.float64) / sample_rate
    f = PITCH_HZ[colour] * rng.uniform(0.98, 1.02)
    ph = f * t + rng.uniform(0, 1)  # phase in cycles
    kind = WAVE[shape]
    if kind == "sine":
        x = np.sin(2 * np.pi * ph)
    elif kind == "square":
        x = 0.6 * np.sign(np.sin(2 * np.pi * ph))  # ~ same loudness as the sine
    elif kind == "sawtooth":
        x = 0.8 * (2 * (ph % 1.0) - 1)
    else:  # pulsed beeps: 4-6 Hz on/off gate, 50 % duty
        gate = ((t * rng.uniform(4, 6) + rng.uniform(0, 1)) % 1.0) < 0.5
        x = np.sin(2 * np.pi * ph) * gate
    # random onset / offset with 10 ms fades, random amplitude, light noise
    on = int(rng.uniform(0, 0.15) * n)
    off = int(rng.uniform(0.85, 1.0) * n)
    env = np.zeros(n)
    env[on:off] = 1.0
    fade = min(int(0.01 * sample_rate), max((off - on) // 2, 1))
    env[on:on + fade] *= np.linspace(0, 1, fade, endpoint=False)[: len(env[on:on + fade])]
    env[off - fade:off] *= np.linspace(1, 0, fade)[: len(env[off - fade:off])]
    x = rng.uniform(0.3, 0.7) * x * env + rng.normal(0, rng.uniform(0.005, 0.02), n)
    return np.clip(x, -1, 1).astype(np.float32)


# ----------------------------------------------------------------------------- samples


def _encode_image(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
    else:
        Image.fromarray(img).save(buf, format="PNG", compress_level=1)  # level 1: fast, still lossless
    return buf.getvalue()


def _encode_audio(x: np.ndarray, fmt: str, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sample_rate, format="FLAC" if fmt == "flac" else "WAV", subtype="PCM_16")
    return buf.getvalue()


def make_sample(key: str, label: int, rng: np.random.Generator, drop: Optional[str] = None,
                image_size: int = 64, sample_rate: int = 16000, clip_seconds: float = 1.0,
                jpeg_share: float = 0.2, wav_share: float = 0.2) -> Dict[str, bytes]:
    """One WebDataset sample (extension -> bytes); `drop` in {None, 'image', 'audio', 'text'}."""
    shape, colour = attributes_of(label)
    img_fmt = "jpg" if rng.uniform() < jpeg_share else "png"
    aud_fmt = "wav" if rng.uniform() < wav_share else "flac"
    caption = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format(colour=colour, shape=shape)
    # always draw both modalities so the random stream (hence every other sample) does not depend on `drop`
    img = render_image(shape, colour, rng, image_size)
    wav = synth_audio(shape, colour, rng, sample_rate, clip_seconds)
    present = [m for m in MODALITIES if m != drop]
    meta = {"label": label, "shape": shape, "colour": colour, "modalities": present,
            "caption_image": image_caption(shape, colour), "caption_audio": audio_caption(shape, colour)}
    sample: Dict[str, bytes] = {"__key__": key, "cls": str(label).encode()}
    if drop != "image":
        sample[img_fmt] = _encode_image(img, img_fmt)
    if drop != "audio":
        sample[aud_fmt] = _encode_audio(wav, aud_fmt, sample_rate)
    if drop != "text":
        meta["caption"] = caption
        sample["txt"] = caption.encode()
    sample["json"] = json.dumps(meta, sort_keys=True).encode()
    return sample


def write_split(out_dir: Path, split: str, n: int, shard_size: int, seed: int,
                missing_share: float = 0.0, seen_hashes: Optional[Set[bytes]] = None, **sample_kw) -> Dict[str, int]:
    """Write `n` samples of `split` to `out_dir/split/split-%06d.tar`; returns shard name -> count.

    `seen_hashes`: digests of image/audio bytes already written elsewhere (e.g. the train split);
    any repeat raises, and the new digests are added to the set.
    """
    if n < 1 or shard_size < 1:
        raise ValueError(f"need n >= 1 and shard_size >= 1, got n={n}, shard_size={shard_size}")
    split_dir = Path(out_dir) / split
    split_dir.mkdir(parents=True, exist_ok=True)
    for old in split_dir.glob(f"{split}-*.tar"):  # a re-run with fewer shards must not leave stale ones
        old.unlink()
    code = _SPLIT_CODE.get(split, 2 + sum(split.encode()))
    srng = np.random.default_rng([seed, code])
    labels = srng.permutation(np.arange(n) % NUM_CLASSES)  # balanced classes, random order
    drops: List[Optional[str]] = [None] * n
    n_missing = int(round(missing_share * n))
    for i in srng.permutation(n)[:n_missing]:  # exact count, random which samples / which modality
        drops[int(i)] = MODALITIES[int(srng.integers(3))]

    sizes: Dict[str, int] = {}
    for s0 in range(0, n, shard_size):
        name = f"{split}-{s0 // shard_size:06d}.tar"
        with TarWriter(str(split_dir / name), encoder=False, mtime=0.0) as tw:  # fixed mtime: byte-reproducible
            for i in range(s0, min(n, s0 + shard_size)):
                rng = np.random.default_rng([seed, code, 1, i])
                sample = make_sample(f"{split}_{i:06d}", int(labels[i]), rng, drops[i], **sample_kw)
                if seen_hashes is not None:
                    for ext in ("png", "jpg", "flac", "wav"):
                        if ext in sample:
                            h = hashlib.sha1(sample[ext]).digest()
                            if h in seen_hashes:
                                raise RuntimeError(f"{split} sample {sample['__key__']}.{ext} repeats bytes seen before")
                            seen_hashes.add(h)
                tw.write(sample)
        sizes[name] = min(n, s0 + shard_size) - s0
    (split_dir / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n")
    return sizes


def make_demo_dataset(out: str, train: int = 4000, eval: int = 500, shard_size: int = 500, seed: int = 0,
                      image_size: int = 64, sample_rate: int = 16000, clip_seconds: float = 1.0,
                      missing_share: float = 0.175, jpeg_share: float = 0.2, wav_share: float = 0.2) -> dict:
    """Write train (some samples missing one modality) and complete eval splits plus classes.json.

    Returns {"train": sizes, "eval": sizes, "classes": [...]} where sizes maps shard name -> count.
    """
    if not 0.0 <= missing_share <= 1.0:
        raise ValueError(f"missing_share must be in [0, 1], got {missing_share}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    kw = dict(image_size=image_size, sample_rate=sample_rate, clip_seconds=clip_seconds,
              jpeg_share=jpeg_share, wav_share=wav_share)
    seen: Set[bytes] = set()  # proves train and eval share no image/audio bytes
    train_sizes = write_split(out_dir, "train", train, shard_size, seed, missing_share, seen, **kw)
    eval_sizes = write_split(out_dir, "eval", eval, shard_size, seed, 0.0, seen, **kw)
    classes = class_names()
    (out_dir / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
    return {"train": train_sizes, "eval": eval_sizes, "classes": classes}


def shard_urls(out: str, split: str) -> str:
    """Brace pattern of a split's shards, e.g. 'DIR/train/train-{000000..000007}.tar'."""
    sizes = json.loads((Path(out) / split / "sizes.json").read_text())
    names = sorted(sizes)
    if len(names) == 1:
        return str(Path(out) / split / names[0])
    first, last = names[0][len(split) + 1:-4], names[-1][len(split) + 1:-4]
    return str(Path(out) / split / f"{split}-{{{first}..{last}}}.tar")
