"""The one place that says what a modality is: which shard members feed it, how they decode,
which tower encodes it (by `model.<section>.kind`), whether the decoder captions it. Contrastive
pairs are derived from the registry, and `Batch` is the typed batch `collate` produces and every
later stage reads. Adding a modality is one `register(Modality(...))` (a plugin can do it, see
mmpretrain.plugins); nothing else in the package lists modality names.

Text is the one modality of kind "text": it is tokenized, not decoded, and its tower also feeds
the caption decoder. Every other modality is "media": bytes -> fixed-shape float array (or uint8
levels that the model normalises on its device: Modality.level_affine, images)."""
from __future__ import annotations

import contextlib
import importlib
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:  # the registry itself is torch-free: config checks import it, and a refusal must not pay
    import torch  # seconds of torch import; towers and front ends load on first use (see _lazy)
    import torch.nn as nn

TEXT = "text"  # the anchor modality's name: captions are text, and the decoder reads its tower

# (bytes, DataConfig, rng or None for eval) -> array of sample_shape(DataConfig): float32, or uint8
# levels where the modality has a level_affine
Decoder = Callable[[bytes, Any, Optional[np.random.Generator]], np.ndarray]
# (Config, vocab_size) -> an nn.Module meeting the tower interface (see Modality below)
TowerBuilder = Callable[[Any, int], "nn.Module"]


@dataclass(frozen=True)
class Modality:
    """What the framework needs to know about one modality.

    name: batch / loss / metric key. member_keys: default `;`-separated tar member extensions
    (a source overrides them with `<name>_keys` in its config where that key exists). decode /
    sample_shape: media only. config_section: the `model.<section>` holding its tower's config
    (its `kind` picks the builder); None = the tower takes no config. captioned: the decoder
    writes captions of it (json `caption_<name>`, else `caption`). keep_fp32: inputs stay fp32
    under bf16/fp16 (audio: the mel front end runs in fp32). aug_stream: sub-seed of its
    training augmentation (distinct per modality so one modality's draws never shift another's).

    A tower's interface: `width` (token width), `forward(x)` -> (pooled (B, W), tokens (B, N, W));
    the text tower's `forward(ids, lengths, cache=None)` -> (pooled, states)."""

    name: str
    kind: str = "media"  # media | text
    member_keys: str = ""
    decode: Optional[Decoder] = None
    sample_shape: Optional[Callable[[Any], Tuple[int, ...]]] = None
    config_section: Optional[str] = None
    captioned: bool = False
    keep_fp32: bool = False
    aug_stream: int = 0
    # (1-D float32 signal, DataConfig) -> the sample format (inference on arrays); None = cut / repeat-pad
    from_signal: Optional[Callable[[np.ndarray, Any], np.ndarray]] = None
    # the argument name transformers gives this input (mmpretrain.hf: forward(pixel_values=...))
    hf_input: str = ""
    # (DataConfig) -> (scale, shift) per channel (dim 1). Set: decode gives uint8 levels, batched as
    # uint8 (a quarter of float32's worker memory traffic, shared memory and host -> device copy), and
    # the model's input is level * scale + shift, computed on its device (to_model_input)
    level_affine: Optional[Callable[[Any], Tuple[Sequence[float], Sequence[float]]]] = None
    towers: Dict[str, TowerBuilder] = field(default_factory=dict)  # kind -> builder; "native" is the default


_REGISTRY: Dict[str, Modality] = {}


class ModalityError(ValueError):
    """A registration or a lookup that does not fit the registry."""


def register(m: Modality) -> Modality:
    """Add a modality (its order is the registration order: batches, pairs and reports follow it)."""
    if m.name in _REGISTRY:
        raise ModalityError(f"modality '{m.name}' is already registered")
    if m.kind not in ("media", "text"):
        raise ModalityError(f"modality '{m.name}': kind must be 'media' or 'text', got {m.kind!r}")
    if m.kind == "text" and m.name != TEXT:
        raise ModalityError(f"the text modality is '{TEXT}'; '{m.name}' cannot be a second one")
    if m.kind == "media" and (m.decode is None or m.sample_shape is None):
        raise ModalityError(f"media modality '{m.name}' needs decode and sample_shape")
    if not m.towers:
        raise ModalityError(f"modality '{m.name}' has no tower builder")
    taken = {s.aug_stream for s in _REGISTRY.values() if s.kind == "media"}
    if m.kind == "media" and m.aug_stream in taken:
        raise ModalityError(f"modality '{m.name}': aug_stream {m.aug_stream} is used by another modality")
    _REGISTRY[m.name] = m
    return m


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


@contextlib.contextmanager
def registered(m: Modality) -> Iterator[Modality]:
    """Register `m` for the duration of a block (tests)."""
    register(m)
    try:
        yield m
    finally:
        unregister(m.name)


def get(name: str) -> Modality:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModalityError(f"unknown modality '{name}'; registered: {names()}") from None


def by_hf_input(arg: str) -> str:
    """The modality whose transformers argument name is `arg` (pixel_values -> image, ...)."""
    for m in _REGISTRY.values():
        if m.hf_input == arg:
            return m.name
    raise ModalityError(f"no registered modality takes transformers' '{arg}'; registered: "
                        f"{ {m.name: m.hf_input for m in _REGISTRY.values()} }")


def all_modalities() -> List[Modality]:
    return list(_REGISTRY.values())


def names() -> List[str]:
    return list(_REGISTRY)


def media() -> List[Modality]:
    return [m for m in _REGISTRY.values() if m.kind == "media"]


def media_names() -> List[str]:
    return [m.name for m in media()]


def captioned() -> List[str]:
    return [m.name for m in _REGISTRY.values() if m.captioned]


@dataclass(frozen=True)
class Pair:
    name: str
    a: str
    b: str


def pairs() -> List[Pair]:
    """Every modality with text (`<m>_text`), then every media pair in registration order."""
    out = [Pair(f"{m}_{TEXT}", m, TEXT) for m in media_names()]
    out += [Pair(f"{a}_{b}", a, b) for a, b in itertools.combinations(media_names(), 2)]
    return out


def pair_names() -> List[str]:
    return [p.name for p in pairs()]


def _all_pair_weights(cfg: Any) -> Dict[str, float]:
    given = dict(cfg.loss.pairs)
    return {p: float(given.get(p, 1.0)) for p in pair_names()}


def tower_section(cfg: Any, m: Modality) -> Any:
    """`cfg.model.<m.config_section>`, or None (no section, or the config lacks it)."""
    return getattr(cfg.model, m.config_section, None) if m.config_section else None


def tower_enabled(cfg: Any, m: Modality) -> bool:
    """`model.<section>.enabled` (true when the section or the key is absent)."""
    section = tower_section(cfg, m)
    return bool(getattr(section, "enabled", True)) if section is not None else True


def active(cfg: Any) -> List[Modality]:
    """The modalities this run builds a tower for, in registry order: text (the anchor) always;
    another when its tower is enabled and a contrastive pair of weight > 0 with another enabled
    modality, or the caption decoder (captioned, loss.caption_weight > 0), uses it. An image-text
    run (loss.pairs: {audio_text: 0, image_audio: 0}, no audio captions) builds no audio tower."""
    on = {m.name for m in _REGISTRY.values() if m.kind == "text" or tower_enabled(cfg, m)}
    weights = _all_pair_weights(cfg)
    used = {TEXT}
    for p in pairs():
        if weights[p.name] > 0 and p.a in on and p.b in on:
            used |= {p.a, p.b}
    if cfg.loss.caption_weight > 0 and cfg.model.text.decoder_depth > 0:
        used |= {m.name for m in _REGISTRY.values() if m.captioned and m.name in on}
    return [m for m in _REGISTRY.values() if m.name in used]


def active_names(cfg: Any) -> List[str]:
    return [m.name for m in active(cfg)]


def active_pairs(cfg: Any) -> List[Pair]:
    """The pairs between built towers (their scales exist; evaluation retrieves along them)."""
    on = set(active_names(cfg))
    return [p for p in pairs() if p.a in on and p.b in on]


def pair_weights(cfg: Any) -> Dict[str, float]:
    """`loss.pairs` resolved over the pairs between built towers: weight 1 unless the config
    says otherwise."""
    weights = _all_pair_weights(cfg)
    return {p.name: weights[p.name] for p in active_pairs(cfg)}


def tower_kind(cfg: Any, m: Modality) -> str:
    section = getattr(cfg.model, m.config_section) if m.config_section else None
    return getattr(section, "kind", "native") if section is not None else "native"


def build_tower(cfg: Any, m: Modality, vocab_size: int) -> nn.Module:
    kind = tower_kind(cfg, m)
    if kind not in m.towers:
        raise ModalityError(f"config key 'model.{m.config_section}.kind' = {kind!r}: no such tower for "
                            f"'{m.name}'; choose one of {sorted(m.towers)}")
    return m.towers[kind](cfg, vocab_size)


def validate_config(cfg: Any) -> Optional[str]:
    """The registry-dependent checks of a config; a message naming the key, or None."""
    unknown = sorted(set(cfg.loss.pairs) - set(pair_names()))
    if unknown:
        return f"config key 'loss.pairs' has unknown pairs {unknown}; allowed: {pair_names()}"
    for m in all_modalities():
        kind = tower_kind(cfg, m)
        if kind not in m.towers:
            return (f"config key 'model.{m.config_section}.kind' = {kind!r} is not allowed; choose one of "
                    f"{sorted(m.towers)}")
    for m in all_modalities():
        if not tower_enabled(cfg, m) and m.kind == "text":
            return f"config key 'model.{m.config_section}.enabled' = false: the text tower is the anchor of every pair"
        if tower_enabled(cfg, m):
            continue
        for p in pairs():
            w = cfg.loss.pairs.get(p.name)
            if m.name in (p.a, p.b) and w is not None and float(w) > 0:
                return (f"config key 'loss.pairs.{p.name}' = {w} uses modality '{m.name}', whose tower is off "
                        f"(model.{m.config_section}.enabled: false)")
    for i, src in enumerate(cfg.data.train):
        bad = sorted({r.strip() for r in src.required.split(";") if r.strip()} - set(names()))
        if bad:
            return f"config key 'data.train[{i}].required' names unknown modalities {bad}; allowed: {names()}"
    return None


# ----------------------------------------------------------------------------- the batch


@dataclass
class Batch:
    """One batch, as `collate` makes it. Absent modalities are zeros with a False mask.

    inputs[m]: media (B, *sample_shape): float32, or uint8 levels for a modality with a level_affine
    (images; the model normalises them, to_model_input); text: token ids (B, L). masks[m]: (B,) bool for every
    registered modality. text_len: (B,) tokens BOS..EOS (0 = no text). captions[m] / caption_len[m]:
    the caption of captioned modality m (json `caption_<m>`, else the text)."""

    keys: List[str]
    sources: List[str]
    epochs: List[int]
    inputs: Dict[str, torch.Tensor]
    masks: Dict[str, torch.Tensor]
    text_len: torch.Tensor
    captions: Dict[str, torch.Tensor]
    caption_len: Dict[str, torch.Tensor]
    labels: torch.Tensor
    groups: Optional[torch.Tensor] = None  # (B,) hashed json group (eval.probe_group_key), -1 = none

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device, dtype: Optional[torch.dtype] = None) -> "Batch":
        """Tensors to `device`; media inputs to the compute `dtype` (float32 when None) unless the
        modality keeps fp32 or the input is 8-bit levels (the model maps those: to_model_input)."""
        import torch

        dtype = dtype or torch.float32

        def mv(name: str, t: torch.Tensor) -> torch.Tensor:
            t = t.to(device, non_blocking=True)
            m = _REGISTRY.get(name)
            if m is not None and m.kind == "media" and not m.keep_fp32 and t.dtype != torch.uint8:
                t = t.to(dtype)
            return t

        return Batch(list(self.keys), list(self.sources), list(self.epochs),
                     {k: mv(k, v) for k, v in self.inputs.items()},
                     {k: v.to(device) for k, v in self.masks.items()}, self.text_len.to(device),
                     {k: v.to(device) for k, v in self.captions.items()},
                     {k: v.to(device) for k, v in self.caption_len.items()}, self.labels.to(device),
                     None if self.groups is None else self.groups.to(device))

    def select(self, index: Sequence[int]) -> "Batch":
        """The rows `index` (a list of row numbers), in that order."""
        import torch

        idx = torch.as_tensor(list(index), dtype=torch.long)

        def pick(d: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
            return {k: v[idx.to(v.device)] for k, v in d.items()}

        rows = idx.tolist()
        return Batch([self.keys[i] for i in rows], [self.sources[i] for i in rows], [self.epochs[i] for i in rows],
                     pick(self.inputs), pick(self.masks), self.text_len[idx.to(self.text_len.device)],
                     pick(self.captions), pick(self.caption_len), self.labels[idx.to(self.labels.device)],
                     None if self.groups is None else self.groups[idx.to(self.groups.device)])


def to_model_input(m: Modality, x: torch.Tensor, data_cfg: Any, dtype: Optional[torch.dtype] = None,
                   cache: Optional[Dict[Any, Any]] = None) -> torch.Tensor:
    """A batch input (B, C, ...) as its tower takes it: 8-bit levels of a modality with a level_affine become
    level * scale + shift in float32, then `dtype` (float32 when None); any other input is returned
    as it is (float inputs are model input already). `cache` keeps the (scale, shift) tensors per
    device, so a step makes no host -> device copy for them."""
    import torch

    if x.dtype != torch.uint8 or m.level_affine is None:
        return x
    key = (m.name, x.device)
    if cache is None or key not in cache:
        scale, shift = m.level_affine(data_cfg)
        pair = (torch.tensor(scale, dtype=torch.float32, device=x.device),
                torch.tensor(shift, dtype=torch.float32, device=x.device))
        if cache is None:
            cache = {}
        cache[key] = pair
    scale_t, shift_t = cache[key]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = torch.addcmul(shift_t.view(shape), x.float(), scale_t.view(shape))
    return y if dtype in (None, torch.float32) else y.to(dtype)


# ----------------------------------------------------------------------------- the built-in modalities


def _audio_samples(d: Any) -> int:
    return int(d.audio.sample_rate * d.audio.clip_seconds)


def _lazy(module: str, attr: str) -> Callable[..., Any]:
    """`module.attr`, imported at the first call: tower and front-end modules import torch."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), attr)(*args, **kwargs)

    call.__name__ = call.__qualname__ = attr
    return call


_decode_image = _lazy("mmpretrain.data.decode", "decode_image")
_pixel_affine = _lazy("mmpretrain.data.decode", "pixel_affine")
_VisionTransformer = _lazy("mmpretrain.models.vision", "VisionTransformer")
_AudioTransformer = _lazy("mmpretrain.models.audio", "AudioTransformer")
_TextTransformer = _lazy("mmpretrain.models.text", "TextTransformer")
_HFImageTower = _lazy("mmpretrain.models.hf", "HFImageTower")
_HFTextTower = _lazy("mmpretrain.models.hf", "HFTextTower")
_HF_AUDIO = "mmpretrain.models.hf_audio"


def tower_dropout(cfg: Any, section: str) -> float:
    """model.<section>.dropout, or model.dropout when the tower leaves it unset (None)."""
    own = getattr(getattr(cfg.model, section, None), "dropout", None)
    return float(cfg.model.dropout if own is None else own)


register(Modality(
    name="image", member_keys="jpg;jpeg;png;webp", captioned=True, aug_stream=1, config_section="vision",
    hf_input="pixel_values",
    decode=lambda b, d, rng: _decode_image(b, d.image_size, rng, max_pixels=d.max_image_pixels,
                                         min_scale=d.crop_min_scale, hflip=d.hflip, mean=d.image_mean,
                                         augment=getattr(d, "image_augment", None)),
    sample_shape=lambda d: (3, d.image_size, d.image_size),
    level_affine=lambda d: _pixel_affine(d.image_mean, d.image_std),  # uint8 pixels, normalised on the device
    towers={"native": lambda cfg, vocab: _VisionTransformer(cfg.model.vision, cfg.data.image_size,
                                                                   tower_dropout(cfg, "vision")),
            "hf": lambda cfg, vocab: _HFImageTower(cfg.model.vision)},  # a local transformers vision model
))
register(Modality(
    name="audio", member_keys="flac;wav;mp3;ogg", captioned=True, keep_fp32=True, aug_stream=2,
    config_section="audio", hf_input="input_values",
    # the waveform, then data.audio.feature_extractor's front end when set (HF audio towers)
    decode=_lazy(_HF_AUDIO, "audio_decode"),
    sample_shape=_lazy(_HF_AUDIO, "audio_sample_shape"),
    from_signal=_lazy(_HF_AUDIO, "audio_from_waveform"),
    towers={"native": lambda cfg, vocab: _AudioTransformer(cfg.model.audio, cfg.data.audio.sample_rate,
                                                          _audio_samples(cfg.data), tower_dropout(cfg, "audio")),
            "hf": _lazy(_HF_AUDIO, "build_hf_audio_tower")},  # AST, Whisper encoder, wav2vec2, HuBERT from a local dir
))
register(Modality(
    name=TEXT, kind="text", member_keys="txt;json:caption", config_section="text", hf_input="input_ids",
    towers={"native": lambda cfg, vocab: _TextTransformer(cfg.model.text, vocab, cfg.data.text_max_len,
                                                         tower_dropout(cfg, "text")),
            "hf": lambda cfg, vocab: _HFTextTower(cfg.model.text)},  # a local transformers encoder + its tokenizer
))
