"""Waveform augmentation (data.audio_augment): off = bit-identical, on = changed, seeded, ranges held."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shardkit import tone_bytes, write_tar  # noqa: E402

from mmpretrain.config import AudioAugmentConfig  # noqa: E402
from mmpretrain.data import audio_augment  # noqa: E402
from mmpretrain.data.decode import decode_audio  # noqa: E402

RATE = 8000


def _aug(**kw) -> AudioAugmentConfig:
    return AudioAugmentConfig(**kw)


def _rng(i: int = 0) -> np.random.Generator:
    return np.random.default_rng([7, i])


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def _peak_hz(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[spec.argmax()])


def test_off_is_bit_identical_and_draws_nothing():
    data = tone_bytes(440, rate=16000, seconds=1.0)
    for kw in ({}, {"noise_snr_db": [0.0, 5.0], "mix_gain_db": [-20.0, -1.0]}):  # ranges alone switch nothing on
        a, b = _rng(), _rng()
        ref = decode_audio(data, RATE, 0.25, a)
        out = decode_audio(data, RATE, 0.25, b, augment=_aug(**kw))
        assert out.dtype == np.float32 and np.array_equal(ref, out)
        assert a.random() == b.random()  # the same rng state after: no extra draws
    # eval (no rng): augmentation never applies
    on = _aug(gain_db=[6.0, 6.0], noise_prob=1.0, speed=[1.1, 1.1], placement="random")
    assert np.array_equal(decode_audio(data, RATE, 0.25, None), decode_audio(data, RATE, 0.25, None, augment=on))


def test_gain_within_db_range_and_deterministic():
    data = tone_bytes(440, rate=RATE, seconds=0.5)
    ref = decode_audio(data, RATE, 0.25, _rng(0))
    gains = []
    for i in range(20):
        out = decode_audio(data, RATE, 0.25, _rng(i), augment=_aug(gain_db=[-6.0, 3.0]))
        again = decode_audio(data, RATE, 0.25, _rng(i), augment=_aug(gain_db=[-6.0, 3.0]))
        assert np.array_equal(out, again)
        gains.append(20 * np.log10(_rms(out) / _rms(ref)))  # a pure tone: RMS of any crop is the same
    assert min(gains) >= -6.0 - 0.05 and max(gains) <= 3.0 + 0.05
    assert max(gains) - min(gains) > 3.0  # actually drawn, not a constant


def test_white_noise_at_the_drawn_snr():
    data = tone_bytes(440, rate=RATE, seconds=0.5)
    clean = decode_audio(data, RATE, 0.25, _rng(0))
    snrs = []
    for i in range(12):
        out = decode_audio(data, RATE, 0.25, _rng(i), augment=_aug(noise_prob=1.0, noise_snr_db=[5.0, 15.0]))
        crop = decode_audio(data, RATE, 0.25, _rng(i))  # same rng stream: same crop as the noisy clip
        noise = out - crop
        snrs.append(10 * np.log10(_rms(crop) ** 2 / _rms(noise) ** 2))
    assert min(snrs) >= 5.0 - 0.01 and max(snrs) <= 15.0 + 0.01 and max(snrs) - min(snrs) > 2.0
    assert _rms(clean) > 0
    # noise_prob: roughly that share of clips is noisy
    noisy = sum(not np.array_equal(decode_audio(data, RATE, 0.25, _rng(i), augment=_aug(noise_prob=0.5)),
                                   decode_audio(data, RATE, 0.25, _rng(i))) for i in range(40))
    assert 8 <= noisy <= 32


def test_speed_scales_pitch_and_length():
    tone = tone_bytes(400, rate=RATE, seconds=1.0)
    for s in (0.9, 1.1):
        out = decode_audio(tone, RATE, 0.5, _rng(1), augment=_aug(speed=[s, s]))
        assert abs(_peak_hz(out, RATE) - 400 * s) < 8, (s, _peak_hz(out, RATE))
    # a short clip placed in zeros: its length shrinks by the factor
    short = tone_bytes(400, rate=RATE, seconds=0.1)
    out = decode_audio(short, RATE, 0.25, _rng(2), augment=_aug(speed=[1.25, 1.25], placement="random"))
    nz = np.flatnonzero(np.abs(out) > 1e-3)
    assert abs((nz[-1] - nz[0] + 1) - 800 / 1.25) <= 12


def test_random_placement_pads_with_zeros_at_a_random_offset():
    short = tone_bytes(300, rate=RATE, seconds=0.05)  # 400 samples in a 2000-sample window
    repeat = decode_audio(short, RATE, 0.25, _rng(0))
    assert np.count_nonzero(np.abs(repeat) > 1e-3) > 1500  # today's behaviour: repeated
    starts = set()
    for i in range(10):
        out = decode_audio(short, RATE, 0.25, _rng(i), augment=_aug(placement="random"))
        nz = np.flatnonzero(np.abs(out) > 1e-6)
        assert out.shape == (2000,) and nz[-1] - nz[0] < 400
        starts.add(int(nz[0]))
    assert len(starts) >= 5


def test_mixing_uses_the_previous_clip_of_the_batch_only():
    aug = _aug(mix_prob=1.0, mix_gain_db=[-6.0, -6.0])
    a, b = tone_bytes(300, rate=RATE, seconds=0.5), tone_bytes(1000, rate=RATE, seconds=0.5)
    audio_augment.begin_batch()
    first = decode_audio(a, RATE, 0.25, _rng(0), augment=aug)
    second = decode_audio(b, RATE, 0.25, _rng(1), augment=aug)
    assert np.array_equal(first, decode_audio(a, RATE, 0.25, _rng(0)))  # nothing before it in the batch
    clean_b = decode_audio(b, RATE, 0.25, _rng(1))
    other = second - clean_b  # = the previous (clean) clip at -6 dB relative to this clip
    assert abs(20 * np.log10(_rms(other) / _rms(clean_b)) + 6.0) < 0.05
    assert abs(_peak_hz(other, RATE) - 300) < 8
    audio_augment.begin_batch()  # a new batch: not mixed again
    assert np.array_equal(decode_audio(b, RATE, 0.25, _rng(1), augment=aug), clean_b)


def test_noise_clips_from_shards(tmp_path):
    write_tar(str(tmp_path / "noise-0.tar"), [{"__key__": "n0", "wav": tone_bytes(2000, rate=16000, seconds=0.3,
                                                                                  fmt="wav")}])
    aug = _aug(noise_prob=1.0, noise_snr_db=[0.0, 0.0], noise_urls=str(tmp_path / "noise-0.tar"))
    data = tone_bytes(300, rate=RATE, seconds=0.5)
    out = decode_audio(data, RATE, 0.25, _rng(3), augment=aug)
    noise = out - decode_audio(data, RATE, 0.25, _rng(3))
    assert abs(_peak_hz(noise, RATE) - 2000) < 8  # the noise clip's tone, resampled to 8 kHz
    assert abs(20 * np.log10(_rms(noise) / _rms(out - noise))) < 0.05  # 0 dB SNR
    write_tar(str(tmp_path / "empty-0.tar"), [{"__key__": "x", "txt": b"no audio"}])
    with pytest.raises(ValueError, match="noise_urls"):
        decode_audio(data, RATE, 0.25, _rng(3), augment=_aug(noise_prob=1.0, noise_urls=str(tmp_path / "empty-0.tar")))
