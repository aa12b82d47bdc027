"""HuggingFace audio encoders (AST, the Whisper encoder, wav2vec2, HuBERT) as audio towers, loaded
from local directories (`model.audio.kind: hf`, `model.audio.hf_path`), and their feature extractors
as the audio front end of the data pipeline (loader workers, numpy, per sample), not of the model.

Front end per family (what a sample is after decode, i.e. the tower's per-sample input shape):
  ast       ASTFeatureExtractor: kaldi log-mel fbank, normalised, padded/cut to the extractor's
            `max_length` frames (= the model's position table): (max_length, num_mel_bins).
  whisper   WhisperFeatureExtractor: log-mel (n_mels, 2 * max_source_positions), the clip padded
            with silence to the encoder's whole window (30 s, 3000 frames for real checkpoints).
  wav2vec2  Wav2Vec2FeatureExtractor: the waveform itself, zero-mean/unit-variance per clip
  hubert    (do_normalize) or as is: (samples,).
Our decode (random crop in training, resampling, repeat-padding) runs first, so augmentation
stays ours; the extractor then sees exactly one fixed-length clip at its own sampling rate.

Cost: the front end moves from the device into the loader workers. Per 10 s clip on one CPU core
(measured with the stock extractors, no torchaudio): AST ~90 ms (numpy kaldi fbank), Whisper ~50 ms,
wav2vec2 / HuBERT ~1 ms; so about 10 AST clips/s per worker: size data.num_workers for it. A
sample grows to the feature size (AST 1024x128 float32 = 512 KiB, Whisper 80x3000 = 938 KiB,
against 625 KiB for 10 s of 16 kHz waveform). Whisper always encodes its whole 30 s window whatever
`data.audio.clip_seconds` is: 10 s clips cost 3x the encoder compute of their content (the padded
positions are then dropped from the tokens and the mean)."""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from mmpretrain.config import ConfigError, audio_frontend_path

# config.json `model_type` -> family; anything else is refused
FAMILIES = {"audio-spectrogram-transformer": "ast", "whisper": "whisper", "wav2vec2": "wav2vec2", "hubert": "hubert"}
POOLINGS = ("auto", "mean", "cls")
KEY = "model.audio.hf_path"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


# ----------------------------------------------------------------------------- config files (no torch)


def _read_json(path: str) -> Dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        out = json.load(f)
    if not isinstance(out, dict):
        raise ValueError(f"{path} is not a JSON object")
    return out


def _clip_samples(data_cfg: Any) -> int:
    return int(data_cfg.audio.sample_rate * data_cfg.audio.clip_seconds)


@dataclass(frozen=True)
class _Spec:
    """What the two JSON files of a directory say, read once."""

    path: str
    family: str
    config: Dict[str, Any]
    pre: Dict[str, Any]

    @property
    def sampling_rate(self) -> int:
        return int(self.pre.get("sampling_rate", 16000))

    def window_frames(self) -> Optional[int]:
        """Frames the model takes (AST: its position table; Whisper: 2 * max_source_positions)."""
        if self.family == "ast":
            return int(self.config.get("max_length", 1024))
        if self.family == "whisper":
            return 2 * int(self.config.get("max_source_positions", 1500))
        return None

    def hop(self) -> int:
        return int(self.pre.get("hop_length", 160))  # AST: the kaldi fbank hop is fixed at 10 ms = 160


def _spec_or_message(hf_path: Any) -> Union[_Spec, str]:
    if not hf_path:
        return f"config key '{KEY}' is empty; set it to a local HuggingFace audio model directory"
    path = str(hf_path)
    if not os.path.isdir(path):
        return f"config key '{KEY}' = '{path}': no such directory"
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        return f"config key '{KEY}' = '{path}' has no config.json: not a HuggingFace model directory"
    try:
        config = _read_json(cfg_file)
    except (OSError, ValueError) as e:
        return f"config key '{KEY}' = '{path}': config.json is unreadable ({e})"
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        return (f"config key '{KEY}' = '{path}' holds a {model_type!r} model, not an audio encoder this tower "
                f"takes (model_type one of {sorted(FAMILIES)})")
    pre_file = os.path.join(path, "preprocessor_config.json")
    if not os.path.isfile(pre_file):
        return (f"config key '{KEY}' = '{path}' has no preprocessor_config.json: the model's feature extractor "
                f"(its audio front end) is needed; save it with `feature_extractor.save_pretrained('{path}')`")
    try:
        pre = _read_json(pre_file)
    except (OSError, ValueError) as e:
        return f"config key '{KEY}' = '{path}': preprocessor_config.json is unreadable ({e})"
    return _Spec(path, FAMILIES[model_type], config, pre)


def _spec(hf_path: Any) -> _Spec:
    s = _spec_or_message(hf_path)
    if isinstance(s, str):
        raise ConfigError(s)
    return s


def _data_message(s: _Spec, data_cfg: Any) -> Optional[str]:
    """Mismatches between the directory and `data.audio` (or within the directory)."""
    pre_file = os.path.join(s.path, "preprocessor_config.json")
    if int(data_cfg.audio.sample_rate) != s.sampling_rate:
        return (f"config key 'data.audio.sample_rate' = {data_cfg.audio.sample_rate} but the feature extractor of "
                f"{KEY} = '{s.path}' expects sampling_rate = {s.sampling_rate} ({pre_file}); set "
                f"data.audio.sample_rate: {s.sampling_rate}")
    if s.family == "ast":
        for ours, theirs in (("max_length", "max_length"), ("num_mel_bins", "num_mel_bins")):
            a, b = s.pre.get(theirs), s.config.get(ours)
            if a is not None and b is not None and int(a) != int(b):
                return (f"{KEY} = '{s.path}': preprocessor_config.json {theirs} = {a} but config.json {ours} = {b}; "
                        f"the extractor's features would not fit the model")
    if s.family == "whisper":
        a, b = s.pre.get("feature_size"), s.config.get("num_mel_bins")
        if a is not None and b is not None and int(a) != int(b):
            return (f"{KEY} = '{s.path}': preprocessor_config.json feature_size = {a} but config.json "
                    f"num_mel_bins = {b}")
    window = s.window_frames()
    if window is not None:
        n = _clip_samples(data_cfg)
        frames = _valid_frames(s, n)
        if frames > window:
            secs = window * s.hop() / s.sampling_rate
            return (f"config key 'data.audio.clip_seconds' = {data_cfg.audio.clip_seconds} is longer than the "
                    f"{secs:g} s ({window} frames) the {s.family} model at {KEY} = '{s.path}' takes; the rest would "
                    f"be decoded and cut off: set data.audio.clip_seconds <= {secs:g}")
    return None


def _pooling_message(s: _Spec, pooling: str) -> Optional[str]:
    if pooling not in POOLINGS:
        return f"config key 'model.audio.pooling' = {pooling!r} is not allowed; choose one of {list(POOLINGS)}"
    if pooling == "cls" and s.family != "ast":
        return (f"config key 'model.audio.pooling' = 'cls': the {s.family} model at {KEY} = '{s.path}' has no "
                "CLS token; use mean (or auto)")
    return None


def check_hf_audio(hf_path: Any, data_cfg: Any, init: str = "auto") -> Optional[str]:
    """A one-line message for a directory that cannot serve as the audio tower with this data
    config (missing, no config.json, not an audio encoder, no preprocessor_config.json, weights
    missing where `init` needs them, sample rate / window mismatch); None when fine. JSON only:
    no torch, no transformers, so it can run before any process group starts."""
    s = _spec_or_message(hf_path)
    if isinstance(s, str):
        return s
    if str(init) in ("auto", "hf") and not any(os.path.isfile(os.path.join(s.path, f)) for f in WEIGHT_FILES):
        return (f"config key '{KEY}' = '{s.path}' has no weights ({' / '.join(WEIGHT_FILES[::2])}) and "
                f"model.audio.init = {init!r} loads them; use init: random for the architecture alone")
    return _data_message(s, data_cfg)


def _valid_frames(s: _Spec, n_samples: int) -> int:
    """Feature frames that carry the clip (the rest of the model's window is padding)."""
    if s.family == "ast":  # kaldi fbank, snip_edges: 25 ms windows, 10 ms hop
        return 1 + (n_samples - 400) // 160 if n_samples >= 400 else 0
    if s.family == "whisper":  # centred STFT, the last frame dropped: frame i starts the i-th hop
        return -(-n_samples // s.hop())
    return 0


# ----------------------------------------------------------------------------- the front end (data pipeline)


class AudioFrontend:
    """The model's feature extractor applied to one decoded clip: float32 (samples,) at
    `data.audio.sample_rate` -> float32 `sample_shape`. Picklable (loader workers)."""

    def __init__(self, hf_path: str, data_cfg: Any) -> None:
        s = _spec(hf_path)
        msg = _data_message(s, data_cfg)
        if msg:
            raise ConfigError(msg)
        from transformers import AutoFeatureExtractor

        self.hf_path, self.family = s.path, s.family
        self.sample_rate = int(data_cfg.audio.sample_rate)
        self.num_samples = _clip_samples(data_cfg)
        self.extractor = AutoFeatureExtractor.from_pretrained(s.path, local_files_only=True)
        if int(self.extractor.sampling_rate) != self.sample_rate:  # the JSON said otherwise: a subclass default
            raise ConfigError(f"config key 'data.audio.sample_rate' = {self.sample_rate} but the feature extractor "
                             f"of {KEY} = '{s.path}' expects sampling_rate = {self.extractor.sampling_rate}")
        self.kwargs: Dict[str, Any] = {}
        self.key = "input_values"
        if s.family == "whisper":
            # The encoder refuses any input but exactly 2 * max_source_positions frames (its
            # positional table is that long and never sliced: 3000 frames = 30 s for real
            # checkpoints). The extractor pads to its own n_samples (chunk_length), which a
            # re-configured checkpoint may disagree with, so the window is asked for explicitly:
            # pad (with silence, before the STFT, as Whisper was trained) or cut to what the model takes.
            self.key = "input_features"
            frames = s.window_frames()
            self.kwargs = dict(padding="max_length", max_length=frames * int(self.extractor.hop_length),
                               truncation=True)
            self.sample_shape: Tuple[int, ...] = (int(self.extractor.feature_size), frames)
        elif s.family == "ast":
            # ASTFeatureExtractor pads (zeros) / cuts to its max_length frames: the model's position table
            self.sample_shape = (int(self.extractor.max_length), int(self.extractor.num_mel_bins))
        else:
            self.sample_shape = (self.num_samples,)

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        out = self.extractor(np.asarray(wave, dtype=np.float32), sampling_rate=self.sample_rate,
                             return_tensors="np", **self.kwargs)
        x = np.ascontiguousarray(np.asarray(out[self.key])[0], dtype=np.float32)
        if x.shape != self.sample_shape:  # e.g. a waveform of another length than data.audio.clip_seconds
            raise ValueError(f"the feature extractor of '{self.hf_path}' gave shape {x.shape}, expected "
                             f"{self.sample_shape} (one clip of {self.num_samples} samples)")
        return x


def hf_audio_frontend(hf_path: str, data_cfg: Any) -> AudioFrontend:
    """The front end of `hf_path` for this data config; ValueError naming the key for bad input."""
    return AudioFrontend(hf_path, data_cfg)


@functools.lru_cache(maxsize=8)
def _cached_frontend(hf_path: str, sample_rate: int, clip_seconds: float) -> AudioFrontend:
    class _D:  # the two keys the front end reads
        class audio:
            pass

    _D.audio.sample_rate, _D.audio.clip_seconds = sample_rate, clip_seconds
    return AudioFrontend(hf_path, _D)


class HFAudioDecoder:
    """A modality decoder `(bytes, data_cfg, rng) -> float32 sample_shape`: our decode_audio
    (crop / resample / pad; augmentation in training) and then the model's front end. Holds a
    path (or a built front end), so it pickles into spawned workers; each process builds the
    extractor once."""

    def __init__(self, source: Union[str, AudioFrontend]) -> None:
        self.frontend = source if isinstance(source, AudioFrontend) else None
        self.hf_path = source.hf_path if isinstance(source, AudioFrontend) else str(source)

    def frontend_for(self, data_cfg: Any) -> AudioFrontend:
        fe = self.frontend
        if fe is not None and fe.sample_rate == int(data_cfg.audio.sample_rate) \
                and fe.num_samples == _clip_samples(data_cfg):
            return fe
        return _cached_frontend(self.hf_path, int(data_cfg.audio.sample_rate), float(data_cfg.audio.clip_seconds))

    def __call__(self, data: bytes, data_cfg: Any, rng: Optional[np.random.Generator]) -> np.ndarray:
        from mmpretrain.data.decode import decode_audio

        wave = decode_audio(data, data_cfg.audio.sample_rate, data_cfg.audio.clip_seconds, rng,
                            augment=getattr(data_cfg, "audio_augment", None))  # None: a config saved before the key
        return self.frontend_for(data_cfg)(wave)


def hf_audio_decode(source: Union[str, AudioFrontend]) -> HFAudioDecoder:
    """The decoder to register for the audio modality when `model.audio.kind` is hf."""
    return HFAudioDecoder(source)


@functools.lru_cache(maxsize=32)
def _sample_shape(hf_path: str, sample_rate: int, clip_seconds: float) -> Tuple[int, ...]:
    s = _spec(hf_path)
    if s.family == "ast":
        return (int(s.pre.get("max_length", s.config.get("max_length", 1024))),
                int(s.pre.get("num_mel_bins", s.config.get("num_mel_bins", 128))))
    if s.family == "whisper":
        return (int(s.pre.get("feature_size", s.config.get("num_mel_bins", 80))), s.window_frames())
    return (int(sample_rate * clip_seconds),)


def hf_audio_sample_shape(data_cfg: Any, hf_path: str) -> Tuple[int, ...]:
    """The per-sample array shape the front end gives (from the JSON files; cached, no torch):
    AST (max_length, num_mel_bins), Whisper (num_mel_bins, 2 * max_source_positions),
    wav2vec2 / HuBERT (samples,)."""
    return _sample_shape(str(hf_path), int(data_cfg.audio.sample_rate), float(data_cfg.audio.clip_seconds))


# ----------------------------------------------------------------------------- the tower (device)


def _training_safe(config: Any, family: str) -> None:
    """Turn off what a pretrained config may switch on in train mode that breaks distributed
    training here: layerdrop (ranks would run different layers: ZeRO-3 gathers would mismatch
    and hang, ZeRO-2 would see unused parameters) and wav2vec2/HuBERT SpecAugment (drawn from
    numpy's global RNG, which our exact resume does not restore; our augmentation is the crop)."""
    for key in ("layerdrop", "encoder_layerdrop", "decoder_layerdrop"):
        if hasattr(config, key):
            setattr(config, key, 0.0)
    if family in ("wav2vec2", "hubert"):
        config.apply_spec_augment = False
        config.mask_time_prob = 0.0
        config.mask_feature_prob = 0.0


class HFAudioTower(nn.Module):
    """A transformers audio encoder behind the tower interface: `width`; forward(features
    (B, *sample_shape)) -> (pooled (B, W), tokens (B, N, W)). Tokens are the positions that carry
    the clip (AST: patch tokens whose time span starts inside it, without CLS/distillation;
    Whisper: encoder positions of the clip, not of the padded rest of the 30 s window;
    wav2vec2/HuBERT: every frame). Pooled: their mean, or AST's pooler_output (mean of the CLS and
    distillation tokens) with pooling cls."""

    keeps_own_init = True  # pretrained or from_config: MultimodalModel does not re-initialise it

    def __init__(self, model: nn.Module, family: str, width: int, pooling: str, hf_path: str,
                 valid_index: Optional[torch.Tensor] = None, n_valid: Optional[int] = None) -> None:
        super().__init__()
        self.model, self.family, self.width, self.pooling, self.hf_path = model, family, width, pooling, hf_path
        self.n_valid = n_valid
        if valid_index is not None:  # not persistent: derived from the config, not state
            self.register_buffer("valid_index", valid_index, persistent=False)
        else:
            self.valid_index = None

    def layers(self) -> nn.ModuleList:
        """The transformer blocks, input side first (for unlock_last_n_layers)."""
        for path in ("layers", "encoder.layers", "encoder.layer"):  # the spelling varies by model and version
            m: Any = self.model
            for part in path.split("."):
                m = getattr(m, part, None)
            if isinstance(m, nn.ModuleList):
                return m
        raise AttributeError(f"no transformer block list found in {type(self.model).__name__}")

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self._dtype())  # the audio modality keeps its inputs fp32; the tower may be bf16
        if self.family == "ast":
            out = self.model(input_values=x)  # x: (B, frames, mels)
            tokens = out.last_hidden_state[:, 2:]  # (B, F*T, W), CLS and distillation dropped
            if self.valid_index is not None:
                tokens = tokens.index_select(1, self.valid_index)
            pooled = out.pooler_output if self.pooling == "cls" else tokens.mean(1)
            return pooled, tokens
        if self.family == "whisper":
            h = self.model(input_features=x).last_hidden_state  # x: (B, mels, frames) -> (B, frames/2, W)
            tokens = h[:, : self.n_valid] if self.n_valid is not None else h
            return tokens.mean(1), tokens
        tokens = self.model(input_values=x).last_hidden_state  # x: (B, samples) -> (B, samples/320, W)
        return tokens.mean(1), tokens


def _ast_valid_index(config: Any, valid_frames: int) -> Optional[torch.Tensor]:
    """Patch-token indices (row-major over (freq, time) patches, as ASTEmbeddings flattens) whose
    time span starts inside the clip; None when every patch does."""
    f_out = (config.num_mel_bins - config.patch_size) // config.frequency_stride + 1
    t_out = (config.max_length - config.patch_size) // config.time_stride + 1
    t_valid = min(t_out, max(1, -(-valid_frames // config.time_stride)))
    if t_valid == t_out:
        return None
    return torch.tensor([f * t_out + t for f in range(f_out) for t in range(t_valid)], dtype=torch.long)


def _load_pretrained(path: str, config: Any) -> nn.Module:
    """AutoModel weights in fp32 (whatever the checkpoint's dtype: the engine casts for bf16/fp16).
    transformers' load report is silenced (it lists heads and SpecAugment parameters the encoder
    does not use); a weight of the encoder itself missing or of another shape is refused instead."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = AutoModel.from_pretrained(path, config=config, local_files_only=True, dtype=torch.float32,
                                                output_loading_info=True)
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys", []))
    mismatched = [str(k[0]) if isinstance(k, (tuple, list)) else str(k) for k in info.get("mismatched_keys", [])]
    if missing or mismatched:
        raise ConfigError(f"config key '{KEY}' = '{path}': the weights do not fit its config.json "
                         f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, wrong shape {mismatched[:5]})")
    return model


def build_hf_audio_tower(cfg: Any, vocab_size: int = 0) -> HFAudioTower:
    """The tower builder for `model.audio.kind: hf` (signature of modalities.TowerBuilder).
    Reads model.audio.hf_path, .init (auto|hf = the directory's weights; random = the same
    architecture freshly initialised; a path to our own checkpoint/export = random here, the caller
    loads those weights over it), .pooling (auto = cls for AST, mean otherwise), and data.audio."""
    sec = cfg.model.audio
    hf_path = getattr(sec, "hf_path", None)
    init = str(getattr(sec, "init", "auto") or "auto")
    pooling = str(getattr(sec, "pooling", "auto") or "auto")
    msg = check_hf_audio(hf_path, cfg.data, init) or _pooling_message(_spec(hf_path), pooling)
    if msg:
        raise ConfigError(msg)
    s = _spec(hf_path)
    if pooling == "auto":
        pooling = "cls" if s.family == "ast" else "mean"

    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(s.path, local_files_only=True)
    _training_safe(config, s.family)
    with torch.random.fork_rng(devices=[]):  # as models.hf.build_hf_model: later native draws stay put
        if init in ("auto", "hf"):
            model = _load_pretrained(s.path, config)
        else:
            model = AutoModel.from_config(config, dtype=torch.float32)
    if s.family == "whisper":
        # a WhisperModel (also from a WhisperForConditionalGeneration dir): keep the encoder only
        model = model.get_encoder()
    width = int(config.d_model if s.family == "whisper" else config.hidden_size)
    n = _clip_samples(cfg.data)
    valid_index, n_valid = None, None
    if s.family == "ast":
        valid_index = _ast_valid_index(config, _valid_frames(s, n))
    elif s.family == "whisper":
        n_valid = min(config.max_source_positions, -(-_valid_frames(s, n) // 2))  # conv2 has stride 2
    return HFAudioTower(model, s.family, width, pooling, s.path, valid_index, n_valid)


# ----------------------------------------------------------------------------- wiring (registry, preflight)
# The modality decoder sees only the data config, so the front end is named there:
# `data.audio.feature_extractor` (a directory with preprocessor_config.json; None = the raw waveform,
# the native tower's input), resolved from model.audio.hf_path for kind hf as data.image_mean /
# image_std are from the image processor. A run's saved config then decodes the same way in
# evaluation and inference.

FRONTEND_KEY = "data.audio.feature_extractor"
frontend_path = audio_frontend_path  # in the torch-free schema module: preflight reads it without torch


def audio_decode(data: bytes, data_cfg: Any, rng: Optional[np.random.Generator]) -> np.ndarray:
    """The audio modality's decoder for either tower kind: the waveform (samples,), then the HF
    front end when `data.audio.feature_extractor` names one."""
    from mmpretrain.data.decode import decode_audio

    wave = decode_audio(data, data_cfg.audio.sample_rate, data_cfg.audio.clip_seconds, rng,
                        augment=getattr(data_cfg, "audio_augment", None))  # None: a config saved before the key
    path = frontend_path(data_cfg)
    if path is None:
        return wave
    return _cached_frontend(str(path), int(data_cfg.audio.sample_rate), float(data_cfg.audio.clip_seconds))(wave)


def audio_sample_shape(data_cfg: Any) -> Tuple[int, ...]:
    """The audio modality's per-sample shape for either tower kind."""
    path = frontend_path(data_cfg)
    return hf_audio_sample_shape(data_cfg, path) if path is not None else (_clip_samples(data_cfg),)


def audio_from_waveform(wave: np.ndarray, data_cfg: Any) -> np.ndarray:
    """A waveform already at data.audio.sample_rate (inference on arrays) -> the model's input:
    repeat-padded / cut to the clip, then the front end if any (so a wav2vec2 tower gets its
    normalisation here too, not a raw signal)."""
    from mmpretrain.data.decode import fit_length

    x = fit_length(np.asarray(wave, dtype=np.float32).reshape(-1), _clip_samples(data_cfg))
    path = frontend_path(data_cfg)
    if path is None:
        return x
    return _cached_frontend(str(path), int(data_cfg.audio.sample_rate), float(data_cfg.audio.clip_seconds))(x)


def resolve_audio_frontend(cfg: Any) -> None:
    """data.audio.feature_extractor left unset takes model.audio.hf_path for kind hf (preflight,
    next to resolve_image_stats; for_rebuild points it at the export's copy as it does hf_path)."""
    t = cfg.model.audio
    if getattr(t, "kind", "native") == "hf" and hasattr(cfg.data.audio, "feature_extractor") \
            and not cfg.data.audio.feature_extractor:
        cfg.data.audio.feature_extractor = t.hf_path


def follow_tower_copy(cfg: Any) -> None:
    """for_rebuild moved model.audio.hf_path to a saved copy: a front end set for it moves too."""
    t = cfg.model.audio
    if getattr(t, "kind", "native") == "hf" and frontend_path(cfg.data) is not None:
        cfg.data.audio.feature_extractor = t.hf_path


def check_audio_tower(cfg: Any) -> None:
    """Preflight for the audio section: ConfigError naming the key for a bad HF audio directory
    (see check_hf_audio), a bad pooling, or a front end set for a tower that takes waveforms."""
    t = cfg.model.audio
    kind = getattr(t, "kind", "native")
    front = frontend_path(cfg.data)
    if kind != "hf":
        if front is not None:
            raise ConfigError(f"config key '{FRONTEND_KEY}' = '{front}' feeds features to an HF audio tower; "
                              f"model.audio.kind = {kind!r} takes the waveform: unset it")
        return
    init = str(getattr(t, "init", "auto") or "auto")
    msg = check_hf_audio(t.hf_path, cfg.data, init if init in ("auto", "hf") else "random")
    if msg is None:
        msg = _pooling_message(_spec(t.hf_path), str(getattr(t, "pooling", "auto") or "auto"))
    if msg is None and front is not None and os.path.abspath(str(front)) != os.path.abspath(str(t.hf_path)):
        s = _spec_or_message(front)  # another directory: it must hold the same front end
        if isinstance(s, str):
            msg = s.replace(f"config key '{KEY}'", f"config key '{FRONTEND_KEY}'")
        elif s.family != _spec(t.hf_path).family:
            msg = (f"config key '{FRONTEND_KEY}' = '{front}' is the front end of a {s.family} model, but "
                   f"{KEY} = '{t.hf_path}' is a {_spec(t.hf_path).family} model")
        else:
            msg = _data_message(s, cfg.data)
    if msg:
        raise ConfigError(msg)
