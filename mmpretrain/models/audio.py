"""Audio encoder: log-mel spectrogram computed on the device (fp32), patched AST-style
into a transformer; returns the pooled vector and the patch tokens."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from mmpretrain.config import AudioTowerConfig
from mmpretrain.models.transformer import Encoder, class_token_index


def _hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def _mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None) -> torch.Tensor:
    """HTK triangular filters, (n_fft//2+1, n_mels); torchaudio is not a dependency."""
    f_max = f_max or sample_rate / 2
    # computed on the CPU whatever device context is active (the planner builds on `meta`, where
    # some factory functions, once another library has wrapped them, land on the CPU anyway)
    cpu = torch.device("cpu")
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64, device=cpu)
    m_pts = torch.linspace(_hz_to_mel(torch.tensor(f_min, device=cpu)), _hz_to_mel(torch.tensor(f_max, device=cpu)),
                           n_mels + 2, dtype=torch.float64, device=cpu)
    f_pts = _mel_to_hz(m_pts)
    down = (freqs[:, None] - f_pts[None, :-2]) / (f_pts[1:-1] - f_pts[:-2])[None, :]
    up = (f_pts[None, 2:] - freqs[:, None]) / (f_pts[2:] - f_pts[1:-1])[None, :]
    return torch.clamp(torch.minimum(down, up), min=0.0).float()


class LogMel(nn.Module):
    """Waveform (B, S) -> normalized log-mel (B, 1, n_mels, frames), always in fp32."""

    def __init__(self, sample_rate: int, n_fft: int, hop_length: int, n_mels: int, norm: str = "utterance") -> None:
        super().__init__()
        self.n_fft, self.hop, self.norm = n_fft, hop_length, norm
        # buffers, not parameters: ZeRO must not partition or optimize them
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        fb = mel_filterbank(n_fft, n_mels, sample_rate)  # on the CPU: placed where this module's tensors go
        self.register_buffer("fb", fb.to(self.window.device), persistent=False)

    def forward(self, wav: torch.Tensor, warp: Optional[Tuple[float, float]] = None) -> torch.Tensor:
        """warp: (low, high) frequency-warp factors drawn per clip (freq_warp), None = none."""
        # "meta" (shapes only: the capacity planner) has no autocast state to switch off
        dev = "cpu" if wav.device.type == "meta" else wav.device.type
        with torch.autocast(device_type=dev, enabled=False):
            spec = torch.stft(
                wav.float(), self.n_fft, self.hop, window=self.window.float(), center=True, return_complex=True
            )  # (B, F, T)
            power = spec.real.square() + spec.imag.square()
            if warp is not None:
                power = freq_warp(power, *warp)
            mel = torch.matmul(power.transpose(1, 2), self.fb.float()).transpose(1, 2)  # (B, M, T)
            logmel = torch.log(mel + 1e-6)
            if self.norm == "per_bin":  # each bin's mean over time out (model.audio.mel_norm)
                logmel = logmel - logmel.mean(dim=2, keepdim=True)
            # per-utterance normalization keeps scale independent of loudness
            logmel = (logmel - logmel.mean(dim=(1, 2), keepdim=True)) / (logmel.std(dim=(1, 2), keepdim=True) + 1e-5)
        return logmel[:, None]


def freq_warp(power: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Vocal-tract-length perturbation of a power spectrogram (B, F, T): clip b's bin k takes the value at
    k / a_b (linear interpolation), a_b uniform in [low, high] from torch's generator of the tensor's
    device (seeded and checkpointed like the dropout streams). a > 1 moves formants up; bins read
    past the top take the top bin."""
    b, f, _ = power.shape
    a = low + (high - low) * torch.rand(b, 1, device=power.device, dtype=power.dtype)
    src = (torch.arange(f, device=power.device, dtype=power.dtype)[None, :] / a).clamp(max=f - 1)  # (B, F)
    lo = src.floor().long()
    hi = (lo + 1).clamp(max=f - 1)
    w = (src - lo.to(power.dtype))[..., None]
    take = lambda idx: power.gather(1, idx[..., None].expand(-1, -1, power.shape[2]))  # noqa: E731
    return take(lo) * (1 - w) + take(hi) * w


def spec_augment(spec: torch.Tensor, time_masks: int, time_width: int, freq_masks: int, freq_width: int) -> torch.Tensor:
    """SpecAugment on a normalised log-mel (B, 1, M, T): per clip, `time_masks` bands of 0..time_width
    frames and `freq_masks` bands of 0..freq_width mel bins set to 0 (the clip's mean). Draws from
    torch's generator of the tensor's device, so torch seeding and the checkpointed RNG state make
    it reproducible."""
    b, _, m, t = spec.shape
    keep = torch.ones(b, 1, m, t, dtype=torch.bool, device=spec.device)
    for n, width, axis, size in ((freq_masks, freq_width, 2, m), (time_masks, time_width, 3, t)):
        if n <= 0 or width <= 0:
            continue
        w = torch.randint(0, min(width, size) + 1, (b, n), device=spec.device)
        start = (torch.rand(b, n, device=spec.device) * (size - w + 1)).floor().long()  # band inside [0, size)
        pos = torch.arange(size, device=spec.device)
        hit = ((pos >= start[..., None]) & (pos < (start + w)[..., None])).any(1)  # (B, size)
        keep = keep & ~(hit[:, None, :, None] if axis == 2 else hit[:, None, None, :])
    return spec.masked_fill(~keep, 0.0)


class AudioTransformer(nn.Module):
    supports_pooled_only = True  # forward(..., pooled_only=True): the class token alone, tokens None

    def __init__(self, cfg: AudioTowerConfig, sample_rate: int, num_samples: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.width = cfg.width
        self.mel = LogMel(sample_rate, cfg.n_fft, cfg.hop_length, cfg.n_mels, getattr(cfg, "mel_norm", "utterance"))
        frames = num_samples // cfg.hop_length + 1
        self.frames = frames - frames % cfg.patch_size  # crop to whole patches
        self.patch = nn.Conv2d(1, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        n = (cfg.n_mels // cfg.patch_size) * (self.frames // cfg.patch_size)
        scale = cfg.width ** -0.5  # CLIP's class and position embeddings
        self.cls = nn.Parameter(torch.randn(1, 1, cfg.width) * scale)
        self.pos = nn.Parameter(torch.randn(1, n + 1, cfg.width) * scale)
        self.ln_pre = nn.LayerNorm(cfg.width)
        self.encoder = Encoder(cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio, dropout,
                               drop_path=getattr(cfg, "drop_path", 0.0))  # model.<tower>.drop_path
        self.ln_post = nn.LayerNorm(cfg.width)
        sa = getattr(cfg, "spec_augment", None)  # model.audio.spec_augment; None: a config saved before the key
        self.spec_augment = (sa.time_masks, sa.time_width, sa.freq_masks, sa.freq_width) if sa is not None else (0, 0, 0, 0)
        fw = tuple(getattr(cfg, "freq_warp", (1.0, 1.0)))  # model.audio.freq_warp; absent in older configs
        self.warp_range = None if fw == (1.0, 1.0) else (float(fw[0]), float(fw[1]))

    def forward(self, wav: torch.Tensor, pooled_only: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """pooled (B, W), tokens (B, N, W); pooled_only: the class token alone (tokens None)."""
        spec = self.mel(wav, self.warp_range if self.training else None)[..., : self.frames]  # (B, 1, M, T)
        if self.training and any(self.spec_augment):
            spec = spec_augment(spec, *self.spec_augment)
        x = self.patch(spec.to(self.patch.weight.dtype)).flatten(2).transpose(1, 2)  # (B, N, W)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        idx = class_token_index(x) if pooled_only else None
        x = self.ln_post(self.encoder(self.ln_pre(x), pool_index=idx))
        return (x[:, 0], None) if idx is not None else (x[:, 0], x[:, 1:])
