"""SpecAugment in the native audio tower's front end (model.audio.spec_augment): training mode only,
widths respected, seeded by torch's RNG, eval output unchanged."""
import torch

from mmpretrain.config import AudioTowerConfig, SpecAugmentConfig
from mmpretrain.models.audio import AudioTransformer, spec_augment

RATE, SAMPLES = 8000, 4000


def _tower(**sa) -> AudioTransformer:
    cfg = AudioTowerConfig(width=32, depth=1, heads=2, n_mels=32, hop_length=80, patch_size=8,
                           spec_augment=SpecAugmentConfig(**sa))
    torch.manual_seed(0)
    return AudioTransformer(cfg, RATE, SAMPLES)


def test_bands_within_widths_and_counts():
    torch.manual_seed(1)
    spec = torch.randn(16, 1, 32, 48) + 5.0  # nothing is 0 before masking
    out = spec_augment(spec, time_masks=2, time_width=6, freq_masks=1, freq_width=4)
    zero = out == 0
    assert torch.equal(out[~zero], spec[~zero])
    for b in range(16):
        z = zero[b, 0]
        full_rows = z.all(1)  # masked mel bins (whole rows)
        full_cols = z.all(0)  # masked frames (whole columns)
        assert torch.equal(z, full_rows[:, None] | full_cols[None, :])  # only whole bands
        assert full_rows.sum() <= 4 and (~full_cols).any()
        # time: at most 2 bands of <= 6 frames: <= 12 frames, each run <= 12 (two bands may touch)
        assert full_cols.sum() <= 12
    assert zero.any(), "some masks must be drawn over 16 clips"
    rows = zero[:, 0].all(2).sum(1)
    assert rows.max() > 0 and rows.max() <= 4


def test_same_seed_same_masks():
    spec = torch.randn(4, 1, 32, 48)
    torch.manual_seed(5)
    a = spec_augment(spec, 2, 8, 2, 8)
    torch.manual_seed(5)
    b = spec_augment(spec, 2, 8, 2, 8)
    c = spec_augment(spec, 2, 8, 2, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_training_mode_only_and_off_by_default():
    wav = torch.randn(3, SAMPLES)
    plain, masked = _tower(), _tower(time_masks=2, time_width=10, freq_masks=2, freq_width=8)
    assert torch.equal(plain.pos, masked.pos)  # same weights: the config adds no parameters
    plain.eval(), masked.eval()
    with torch.no_grad():
        ref = plain(wav)[0]
        assert torch.equal(masked(wav)[0], ref)  # eval: unchanged
    plain.train(), masked.train()
    with torch.no_grad():
        torch.manual_seed(3)
        p_train = plain(wav)[0]
        torch.manual_seed(3)
        m_train = masked(wav)[0]
        torch.manual_seed(3)
        m_again = masked(wav)[0]
    assert torch.equal(p_train, ref)  # off (the default): training mode changes nothing either
    assert not torch.allclose(m_train, ref) and torch.equal(m_train, m_again)


# ---- vocal-tract-length perturbation (model.audio.freq_warp)
def test_freq_warp_moves_a_tone_by_the_factor():
    from mmpretrain.models.audio import freq_warp

    f_bins, k = 201, 40
    power = torch.zeros(3, f_bins, 5)
    power[:, k] = 1.0
    for a in (0.8, 1.0, 1.2):
        torch.manual_seed(0)
        out = freq_warp(power, a, a)
        peak = (out[0, :, 0] * torch.arange(f_bins)).sum() / out[0, :, 0].sum()  # centre of the peak
        assert abs(float(peak) - k * a) < 0.5, a
    assert torch.equal(freq_warp(power, 1.0, 1.0), power)


def test_freq_warp_only_in_training_and_seeded():
    cfg = AudioTowerConfig(width=32, depth=1, heads=2, n_mels=32, hop_length=80, patch_size=8, freq_warp=[0.85, 1.15])
    torch.manual_seed(0)
    warped = AudioTransformer(cfg, RATE, SAMPLES)
    plain = _tower()
    plain.load_state_dict(warped.state_dict())
    wav = torch.randn(4, SAMPLES)
    warped.eval(), plain.eval()
    assert torch.equal(warped(wav)[0], plain(wav)[0])  # eval: no warp
    warped.train(), plain.train()
    torch.manual_seed(3)
    a = warped(wav)[0]
    torch.manual_seed(3)
    b = warped(wav)[0]
    assert torch.equal(a, b)  # the same seed, the same factors
    assert not torch.allclose(a, plain(wav)[0], atol=1e-4)  # training: warped
    spectra = warped.mel(wav, (1.2, 1.2)), warped.mel(wav)
    assert not torch.allclose(*spectra, atol=1e-3)


# ---- model.audio.mel_norm
def test_per_bin_norm_takes_out_a_fixed_filter():
    """A fixed filter (pre-emphasis: a spectral tilt, as a different microphone or vocal tract would
    give) shifts each log-mel bin by about a constant: per_bin takes it out, utterance does not."""
    from mmpretrain.models.audio import LogMel

    torch.manual_seed(0)
    t = torch.arange(SAMPLES) / RATE
    wav = (torch.sin(2 * torch.pi * 300 * t) * torch.sin(2 * torch.pi * 3 * t) + 0.3 * torch.randn(SAMPLES))[None]
    tilted = torch.cat([wav[:, :1], wav[:, 1:] - 0.9 * wav[:, :-1]], 1)
    for norm, changes in (("utterance", True), ("per_bin", False)):
        mel = LogMel(RATE, 256, 80, 32, norm=norm)
        a, b = mel(wav), mel(tilted)
        diff = float((a - b)[..., 4:-4].abs().mean())  # edges: the filter's and the padding's start-up
        assert (diff > 0.3) if changes else (diff < 0.1), (norm, diff)
        if norm == "per_bin":
            assert float(a.mean(3).abs().max()) < 1e-4  # every bin's mean over time is 0
