"""Training-only waveform augmentation (data.audio_augment): speed, placement of short clips,
gain, mixing with the previous clip of the batch, additive noise. Every draw comes from the
sample's seeded rng and a switched-off step draws nothing, so exact resume holds and a config
with everything off gives bit-identical clips."""
from __future__ import annotations

import functools
from typing import Any, List, Optional, Tuple

import numpy as np

# the clean clip of the previous augmented sample in this process, for mixing; cleared at every batch
# start (begin_batch), so a batch's clips depend on that batch's samples only: a resumed loader (which
# restarts at a batch boundary) mixes the same pairs as an uninterrupted one
_partner: List[Optional[np.ndarray]] = [None]


def begin_batch() -> None:
    """Called by the loader before each batch: the first clip of a batch is never mixed."""
    _partner[0] = None


def active(aug: Any) -> bool:
    """Whether any step of `aug` (an AudioAugmentConfig or None) changes a clip."""
    return aug is not None and (aug.placement != "repeat" or list(aug.gain_db) != [0.0, 0.0] or aug.noise_prob > 0
                                or list(aug.speed) != [1.0, 1.0] or aug.mix_prob > 0)


def draw_speed(aug: Any, rng: np.random.Generator) -> float:
    """The speed factor (> 1: faster and higher); 1.0 without a draw when off."""
    lo, hi = float(aug.speed[0]), float(aug.speed[1])
    return 1.0 if lo == hi == 1.0 else float(rng.uniform(lo, hi))


def place(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """A clip shorter than n at a random offset in n zeros (placement=random); longer ones are cut
    at a random start (the file read already cropped around the clip)."""
    if x.shape[-1] >= n:
        start = int(rng.integers(0, x.shape[-1] - n + 1))
        return x[start:start + n]
    out = np.zeros(n, dtype=np.float32)
    start = int(rng.integers(0, n - x.shape[-1] + 1))
    out[start:start + x.shape[-1]] = x
    return out


def _power(x: np.ndarray) -> float:
    return float(np.mean(np.square(x, dtype=np.float64)))


def augment_clip(x: np.ndarray, aug: Any, rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    """Gain, then mixing, then noise on a fitted clip (N,) -> float32 (N,)."""
    x = np.asarray(x, dtype=np.float32)
    if aug.mix_prob > 0:
        partner, _partner[0] = _partner[0], x.copy()  # the next clip mixes this one, before its own gain
    lo, hi = float(aug.gain_db[0]), float(aug.gain_db[1])
    if (lo, hi) != (0.0, 0.0):
        x = x * np.float32(10.0 ** (rng.uniform(lo, hi) / 20.0))
    if aug.mix_prob > 0:
        u, g = rng.random(), rng.uniform(float(aug.mix_gain_db[0]), float(aug.mix_gain_db[1]))
        if partner is not None and u < aug.mix_prob and _power(partner) > 0 and partner.shape == x.shape:
            # the other clip at g dB below this one's level (RMS): a quieter second speaker / source
            scale = np.sqrt(_power(x) / _power(partner)) * 10.0 ** (g / 20.0)
            x = x + partner * np.float32(scale)
    if aug.noise_prob > 0:
        u, snr = rng.random(), rng.uniform(float(aug.noise_snr_db[0]), float(aug.noise_snr_db[1]))
        p = _power(x)
        if u < aug.noise_prob and p > 0:
            noise = _noise(aug, rng, x.shape[-1], sample_rate)
            x = x + noise * np.float32(np.sqrt(p / (10.0 ** (snr / 10.0)) / max(_power(noise), 1e-20)))
    return np.ascontiguousarray(x, dtype=np.float32)


def _noise(aug: Any, rng: np.random.Generator, n: int, sample_rate: int) -> np.ndarray:
    """n samples of white noise, or of a random noise clip at a random offset (noise_urls)."""
    if not aug.noise_urls:
        return rng.standard_normal(n).astype(np.float32)
    bank = noise_bank(str(aug.noise_urls), int(sample_rate))
    clip = bank[int(rng.integers(len(bank)))]
    if clip.shape[-1] < n:
        clip = np.tile(clip, -(-n // clip.shape[-1]))
    start = int(rng.integers(0, clip.shape[-1] - n + 1))
    return clip[start:start + n]


@functools.lru_cache(maxsize=4)
def noise_bank(urls: str, sample_rate: int) -> Tuple[np.ndarray, ...]:
    """Every audio member of the shards at `urls` (brace-expanded), whole, mono, at sample_rate;
    read once per process (each loader worker keeps its own copy: keep noise sets small)."""
    import io

    import soundfile as sf

    from .decode import resample
    from .shards import expand_urls, read_shard

    clips = []
    for url in expand_urls(urls):
        for raw in read_shard(url):
            for ext, data in sorted(raw.files.items()):
                if ext not in ("flac", "wav", "ogg", "mp3"):
                    continue
                try:
                    x, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
                except Exception:  # noqa: BLE001 - a bad noise member is left out, never fatal
                    continue
                x = resample(x.mean(axis=1), rate, sample_rate)
                if x.shape[-1] and np.isfinite(x).all() and _power(x) > 0:
                    clips.append(np.ascontiguousarray(x, dtype=np.float32))
    if not clips:
        raise ValueError(f"config key 'data.audio_augment.noise_urls' = {urls!r}: no readable, non-silent audio member")
    return tuple(clips)
