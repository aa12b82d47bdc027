"""Image and audio decoding with train/eval transforms (PIL, soundfile, numpy; torch for resizing).
Each function raises DecodeError(reason) for input it cannot use."""
from __future__ import annotations

import io
import math
import warnings
from fractions import Fraction
from typing import Any, Optional, Sequence, Tuple

import numpy as np
import soundfile as sf
from PIL import Image

from . import audio_augment, image_augment

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


class DecodeError(Exception):
    """Bad input; `reason` is the skip-counter name."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------- image


def _crop_box(w: int, h: int, rng: Optional[np.random.Generator], min_scale: float) -> Tuple[float, ...]:
    """Random-resized-crop box (area scale in [min_scale, 1], aspect in [3/4, 4/3]) or,
    without rng, the centre square."""
    if rng is not None:
        area = w * h
        for _ in range(10):
            target = area * rng.uniform(min_scale, 1.0)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = math.sqrt(target * aspect), math.sqrt(target / aspect)
            if cw <= w and ch <= h:
                x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
                return (x0, y0, x0 + cw, y0 + ch)
    side = min(w, h)  # fallback / eval: centre square (= resize shorter side + centre crop)
    x0, y0 = (w - side) / 2, (h - side) / 2
    return (x0, y0, x0 + side, y0 + side)


def decode_image(data: bytes, size: int, rng: Optional[np.random.Generator] = None, max_pixels: int = 50_000_000,
                 min_scale: float = 0.9, hflip: bool = False, mean: Optional[Sequence[float]] = None,
                 augment: Any = None) -> np.ndarray:
    """Bytes -> uint8 (3, size, size) pixel levels, channel-first; the model normalises them on its
    device (`pixel_affine`: data.image_mean / image_std). `mean` (None: CLIP's) fills affine borders and
    erased rectangles. With `rng`: random resized crop and flip, then `augment` (an ImageAugmentConfig:
    image_augment.py) if given (training); without: resize shorter side + centre crop (eval)."""
    aug = augment if rng is not None and image_augment.active(augment) else None
    mean = tuple(CLIP_MEAN if mean is None else mean)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # own limit below
            img = Image.open(io.BytesIO(data))  # lazy: header only
    except Image.DecompressionBombError as e:
        raise DecodeError("image_too_large", str(e)) from None
    except Exception as e:
        raise DecodeError("image_decode", f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if w * h > max_pixels:  # refuse before decoding any pixel
        raise DecodeError("image_too_large", f"{w}x{h} > data.max_image_pixels={max_pixels}")
    if w < 1 or h < 1:
        raise DecodeError("image_decode", f"empty image {w}x{h}")
    try:
        # JPEG: let libjpeg decode at a reduced scale that still covers the output
        need = size / math.sqrt(min_scale) if rng is not None else size
        if img.format == "JPEG":
            img.draft("RGB", (int(need * w / min(w, h)) + 1, int(need * h / min(w, h)) + 1))
            w, h = img.size
        img = _to_rgb(img)
        box = _crop_box(w, h, rng, min_scale)
        if rng is None:  # eval: PIL's resize of the (sub-pixel) centre box, the HF image processors' result
            u8 = np.asarray(img.resize((size, size), Image.BICUBIC, box=box, reducing_gap=3.0), dtype=np.uint8)
        else:  # training: the same filter, 4x faster, on the crop rounded to whole pixels
            u8 = resize_crop(img, _pixel_box(box, w, h), size)  # (size, size, 3)
        if rng is not None and hflip and rng.random() < 0.5:
            u8 = u8[:, ::-1]
        if aug is not None:
            img = image_augment.augment_pil(Image.fromarray(np.ascontiguousarray(u8)), aug, rng, mean)  # type: ignore[arg-type]
            u8 = np.asarray(img, dtype=np.uint8)
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError("image_decode", f"{type(e).__name__}: {e}") from None
    out = np.ascontiguousarray(u8.transpose(2, 0, 1))  # (3, size, size): the batch's layout
    if aug is not None:
        image_augment.erase(out, aug, rng, mean)  # type: ignore[arg-type]
    return out


def _pixel_box(box: Tuple[float, ...], w: int, h: int) -> Tuple[int, int, int, int]:
    """A crop box rounded to whole pixels inside the image, at least one pixel each way."""
    x0, y0 = min(int(round(box[0])), w - 1), min(int(round(box[1])), h - 1)
    return x0, y0, max(x0 + 1, min(w, int(round(box[2])))), max(y0 + 1, min(h, int(round(box[3]))))


def resize_crop(img: Image.Image, box: Tuple[int, int, int, int], size: int) -> np.ndarray:
    """The pixel `box` of an RGB image resized to (size, size, 3) uint8 with an antialiased bicubic
    filter, from the crop's own pixels (PIL's resize with a box also reads its neighbours at the edges).
    torch's uint8 channels-last kernel computes PIL's filter (equal to PIL's resize of the same crop
    within one level) in a quarter of PIL's time on one core: the resize was the largest cost of an image
    sample after JPEG decoding (bench/data_throughput.py). Reductions by 6x or more first average whole
    blocks (PIL's reduce, as Image.resize's reducing_gap=3 does). A torch without the uint8 kernel gets
    PIL's box resize instead."""
    import torch  # lazy: this module stays importable without torch for the data tools

    factor = int(min(box[2] - box[0], box[3] - box[1]) / size / 3.0)
    if factor >= 2:
        img = img.reduce(factor, box=box)
        box = (0, 0, *img.size)
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8))  # (H, W, 3), writable copy
    crop = pixels.permute(2, 0, 1)[None, :, box[1]:box[3], box[0]:box[2]]  # channels-last strides: no copy
    try:
        out = torch.nn.functional.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)
    except (RuntimeError, NotImplementedError):  # a torch without the uint8 kernel: PIL's own resize
        return np.asarray(img.resize((size, size), Image.BICUBIC, box=box), dtype=np.uint8)
    return out[0].permute(1, 2, 0).numpy()


def pixel_affine(mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(scale, shift) per channel with level * scale + shift = (level / 255 - mean) / std: how the model
    turns decode_image's 8-bit levels into its input (None: CLIP's statistics)."""
    m = np.asarray(CLIP_MEAN if mean is None else mean, dtype=np.float64)
    s = np.asarray(CLIP_STD if std is None else std, dtype=np.float64)
    return tuple(float(v) for v in 1.0 / (255.0 * s)), tuple(float(v) for v in -m / s)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float32)
        img = Image.fromarray(np.clip(a / max(a.max(), 1.0) * 255, 0, 255).astype(np.uint8))
    if img.mode in ("P", "LA", "PA") or "A" in img.mode or "transparency" in img.info:
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))  # alpha over white
        return Image.alpha_composite(bg, img).convert("RGB")
    return img.convert("RGB")


# ----------------------------------------------------------------------------- audio


def resample(x: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Band-limited resampling along the last axis: libsoxr (python-soxr, librosa's default; at
    44.1 -> 16 kHz ~10x faster than scipy's polyphase filter, which was a third of a tri-modal
    sample's decode time), scipy's resample_poly where soxr is not installed."""
    if src_rate == dst_rate:
        return x
    try:
        import soxr
    except ImportError:
        soxr = None
    if soxr is not None:
        y = soxr.resample(np.ascontiguousarray(np.moveaxis(x, -1, 0), dtype=np.float32), src_rate, dst_rate,
                          quality="HQ")
        return np.ascontiguousarray(np.moveaxis(y, 0, -1), dtype=np.float32)
    try:
        # lazy (~1 s of CPU): imported only by a process that resamples, once; clips already at
        # data.audio.sample_rate never load it (the loader used to import it up front in every rank)
        from scipy.signal import resample_poly

        frac = Fraction(dst_rate, src_rate).limit_denominator(1000)
        return resample_poly(x, frac.numerator, frac.denominator, axis=-1).astype(np.float32)
    except ImportError:  # pragma: no cover - scipy is a dependency
        n_out = int(round(x.shape[-1] * dst_rate / src_rate))
        t = np.arange(n_out) * (src_rate / dst_rate)
        return np.interp(t, np.arange(x.shape[-1]), x).astype(np.float32)


def fit_length(x: np.ndarray, n: int) -> np.ndarray:
    """Repeat-pad short clips, cut long ones, to exactly n samples."""
    if x.shape[-1] >= n:
        return x[:n]
    reps = -(-n // x.shape[-1])
    return np.tile(x, reps)[:n]


def decode_audio(data: bytes, sample_rate: int, clip_seconds: float,
                 rng: Optional[np.random.Generator] = None, augment: Any = None) -> np.ndarray:
    """Bytes (wav/flac/ogg/mp3) -> float32 mono (N,) at `sample_rate`, N = rate*clip_seconds.
    Training (`rng`): random crop, then `augment` (an AudioAugmentConfig: audio_augment.py) if given;
    eval: centre crop. Only the crop is read from the file."""
    n_out = int(sample_rate * clip_seconds)
    aug = augment if rng is not None and audio_augment.active(augment) else None
    speed = audio_augment.draw_speed(aug, rng) if aug is not None else 1.0  # type: ignore[arg-type]
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            src_rate, frames = f.samplerate, f.frames
            need = int(math.ceil(clip_seconds * src_rate * speed)) + 1  # sped up: more source to fill the clip
            if frames <= 0:
                raise DecodeError("audio_decode", "no audio frames")
            start = 0
            if frames > need:
                start = int(rng.integers(0, frames - need + 1)) if rng is not None else (frames - need) // 2
            try:
                if start:
                    f.seek(start)
                x = f.read(min(need, frames), dtype="float32", always_2d=True)
            except Exception:  # some formats cannot seek: read all, then slice
                f.seek(0)
                x = f.read(dtype="float32", always_2d=True)[start:start + need]
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError("audio_decode", f"{type(e).__name__}: {e}") from None
    if x.shape[0] == 0:
        raise DecodeError("audio_decode", "no audio frames")
    x = x[:, 0] if x.shape[1] == 1 else x.mean(axis=1)  # mono: a view, no averaging pass
    if not np.isfinite(x).all():  # one pass in the usual case; nan_to_num makes four
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    # speed perturbation: resampled to rate / speed and read at rate, so tempo and pitch scale by speed
    x = resample(x, src_rate, sample_rate if speed == 1.0 else int(round(sample_rate / speed)))
    if x.shape[-1] == 0:
        raise DecodeError("audio_decode", "clip too short to resample")
    if aug is None:
        return np.ascontiguousarray(fit_length(x, n_out), dtype=np.float32)
    x = audio_augment.place(x, n_out, rng) if aug.placement == "random" else fit_length(x, n_out)  # type: ignore[arg-type]
    return audio_augment.augment_clip(x, aug, rng, sample_rate)  # type: ignore[arg-type]
