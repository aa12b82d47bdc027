"""Towers from local HuggingFace (transformers) directories, kind "hf" of the tower seam: any
encoder `AutoModel` for text (BERT, RoBERTa, XLM-R, CLIP text, ...) with its `AutoTokenizer`,
and `AutoModel` vision models (ViT, CLIP vision, DINOv2, SigLIP vision) with their image
processor's statistics. Nothing is downloaded (`local_files_only`). Our projections stay ours.

Also: the checks of such a directory (`check_tower`, run by preflight before any process group),
the image statistics the data pipeline uses (`resolve_image_stats`), and the copies of each
tower's config / tokenizer / processor an export or a run directory carries (`save_tower_assets`)
so that a model rebuilds without the original directory (`for_rebuild`)."""
from __future__ import annotations

import contextlib
import copy
import inspect
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn

from mmpretrain.config import Config, ConfigError

ASSETS_DIR = "hf_towers"  # in an export and a run directory: <modality>/ per HF tower
PROCESSOR_FILE = "preprocessor_config.json"
CAUSAL_TEXT = ("clip_text_model", "clip")  # text families whose pooled state is the EOS token's
# role of a config, from attributes every family of that role has (model types are too many to list)
_VISION_ATTRS = ("image_size", "num_channels")
_AUDIO_ATTRS = ("num_mel_bins", "conv_dim", "feature_size", "max_source_positions")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """transformers' load reports and progress bars off (they go to stderr of every rank)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def _role(config: Any) -> Optional[str]:
    if all(hasattr(config, a) for a in _VISION_ATTRS):
        return "vision"
    if any(hasattr(config, a) for a in _AUDIO_ATTRS):
        return "acoustic"
    if hasattr(config, "vocab_size") and hasattr(config, "hidden_size") and not getattr(config, "is_encoder_decoder", False):
        return "language"
    return None


_SUB_CONFIG = {"language": "text_config", "vision": "vision_config"}


def load_config(key: str, path: str, role: str) -> Any:
    """The model config of `path` for a tower of `role` ('language' | 'vision'); a composite config
    (e.g. a whole CLIP with text_config / vision_config) yields its sub-config of that role.
    ConfigError naming `key` and the path when it is missing or of another role."""
    if not os.path.isdir(path):
        raise ConfigError(f"config key '{key}' = {path!r}: no such directory (a local transformers model "
                          "directory is needed; nothing is downloaded)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"config key '{key}' = {path!r} has no config.json (not a transformers model directory)")
    from transformers import AutoConfig

    try:
        with quiet():
            config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read it is this key's problem
        raise ConfigError(f"config key '{key}' = {path!r}: config.json cannot be loaded: "
                          f"{' '.join(f'{type(e).__name__}: {e}'.split())[:300]}") from None
    sub = getattr(config, _SUB_CONFIG.get(role, ""), None)
    if sub is not None:
        config = sub
    found = _role(config)
    if found != role:
        raise ConfigError(f"config key '{key}' = {path!r} holds model type {config.model_type!r}, a "
                          f"{found or 'non-encoder'} model, not a {role} model")
    return config


def _model_class(config: Any) -> Any:
    from transformers import AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        return MODEL_MAPPING[type(config)]
    except KeyError:
        return AutoModel


def build_hf_model(key: str, t: Any, role: str, overrides: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, Any]:
    """(model, config) from section `t` (hf_path, init): pretrained weights for init auto/hf, the
    architecture only (from_config, random) otherwise; `overrides` set config attributes."""
    config = copy.deepcopy(load_config(key, t.hf_path, role))
    for k, v in (overrides or {}).items():
        setattr(config, k, v)
    cls = _model_class(config)
    kwargs = {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(cls.__init__).parameters else {}
    # forked RNG: whatever transformers draws (a random init it then overwrites, or not, and
    # differently under zero.Init) must not shift the draws of the native modules built after it
    with quiet(), torch.random.fork_rng(devices=[]):
        if t.init in ("auto", "hf"):
            model = cls.from_pretrained(t.hf_path, config=config, local_files_only=True, **kwargs)
        else:  # random, or a path to our own export (loaded over it by MultimodalModel)
            model = cls._from_config(config, **kwargs) if hasattr(cls, "_from_config") else cls(config, **kwargs)
    return model.float(), config


def _freeze_unused(model: nn.Module) -> None:
    """Parameters no forward of ours reads (masked-image-modelling tokens) get no gradient: frozen, so
    ZeRO holds no optimizer state for them."""
    for name, p in model.named_parameters():
        if name.endswith("embeddings.mask_token"):
            p.requires_grad_(False)


# ----------------------------------------------------------------------------- text


def text_pooling(t: Any, config: Any) -> str:
    if t.pooling != "auto":
        return t.pooling
    return "eos" if config.model_type in CAUSAL_TEXT else "cls"


class HFTextTower(nn.Module):
    """An HF encoder over our token ids (its tokenizer's, with its special tokens: see
    data.hf_tokenizer); attention_mask from `lengths`. pooled: cls (first state), mean (over the
    text) or eos (the last token's state, CLIP's choice). Has no DecodeCache: the caption decoder
    reads the model's separate native causal module (MultimodalModel.caption_text)."""

    keeps_own_init = True  # MultimodalModel does not re-initialise it

    def __init__(self, t: Any, key: str = "model.text.hf_path") -> None:
        super().__init__()
        self.model, config = build_hf_model(key, t, "language")
        _freeze_unused(self.model)
        self.width = int(config.hidden_size)
        self.pooling = text_pooling(t, config)
        self.model_type = config.model_type
        self.context_len = int(getattr(config, "max_position_embeddings", 0) or 0)

    def forward(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                cache: Any = None) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        if cache is not None:
            raise ValueError("an HF text tower has no decode cache; captioning reads MultimodalModel.caption_text")
        if lengths is None:
            mask = torch.ones_like(tokens, dtype=torch.bool)
        else:
            mask = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]
        mask[:, 0] = True  # absent text (length 0): one visible key, so no row of attention is all masked
        states = self.model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state  # (B, L, W)
        if lengths is None:
            return None, states
        if self.pooling == "cls":
            pooled = states[:, 0]
        elif self.pooling == "mean":
            m = mask.to(states.dtype)[..., None]
            pooled = (states * m).sum(1) / m.sum(1)
        else:  # eos: the last token of the text
            pooled = states[torch.arange(states.shape[0], device=states.device), (lengths - 1).clamp(min=0)]
        return pooled, states


# ----------------------------------------------------------------------------- image


def image_pooling(t: Any, config: Any, key: str = "model.vision.pooling") -> str:
    """cls | mean | head (SigLIP's attention-pooling head, its own pooled output)."""
    siglip = "siglip" in config.model_type
    if t.pooling == "auto":
        return "head" if siglip and getattr(config, "vision_use_head", True) else ("mean" if siglip else "cls")
    if t.pooling == "cls" and siglip:
        raise ConfigError(f"config key '{key}' = 'cls': model type {config.model_type!r} at {t.hf_path!r} has no "
                          "class token; use mean or auto (its attention-pooling head)")
    return t.pooling


class HFImageTower(nn.Module):
    """An HF vision model: pooled (cls: the class token's final state, post-layernorm as the family
    defines it; mean: mean patch token; head: SigLIP's pooling head) and the patch tokens."""

    keeps_own_init = True

    def __init__(self, t: Any, key: str = "model.vision.hf_path") -> None:
        super().__init__()
        config = load_config(key, t.hf_path, "vision")
        self.pooling = image_pooling(t, config)
        # SigLIP's head is used only for its own pooling: without it, no parameter goes untrained
        overrides = {"vision_use_head": False} if hasattr(config, "vision_use_head") and self.pooling != "head" else {}
        self.model, config = build_hf_model(key, t, "vision", overrides)
        _freeze_unused(self.model)
        self.width = int(config.hidden_size)
        self.model_type = config.model_type
        # tokens before the patches: class token (+ DINOv2 registers); SigLIP has none
        self.prefix = 0 if "siglip" in config.model_type else 1 + int(getattr(config, "num_register_tokens", 0) or 0)

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out = self.model(pixel_values=images)
        x = out.last_hidden_state  # (B, prefix + N, W)
        tokens = x[:, self.prefix:]
        if self.pooling == "head" or (self.pooling == "cls" and out.pooler_output is not None
                                      and self.model_type.startswith("clip")):
            pooled = out.pooler_output  # CLIP: post_layernorm(class token); SigLIP: its head
        elif self.pooling == "cls":
            pooled = x[:, 0]
        else:
            pooled = tokens.mean(1)
        return pooled, tokens


# ----------------------------------------------------------------------------- checks and statistics


def processor_dict(key: str, path: str) -> Dict[str, Any]:
    """preprocessor_config.json of `path` as transformers reads it; ConfigError when absent."""
    if not os.path.isfile(os.path.join(path, PROCESSOR_FILE)):
        raise ConfigError(f"config key '{key}' = {path!r} has no {PROCESSOR_FILE} (the image processor whose "
                          "mean / std / size the data pipeline applies)")
    from transformers import ImageProcessingMixin

    with quiet():
        d, _ = ImageProcessingMixin.get_image_processor_dict(path, local_files_only=True)
    return d


def processor_size(d: Dict[str, Any]) -> Optional[int]:
    """The square input size a processor produces (its crop when it crops), None when not square."""
    size = d.get("crop_size") if d.get("do_center_crop") and d.get("crop_size") else d.get("size")
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        if "height" in size and size.get("height") == size.get("width"):
            return int(size["height"])
        if set(size) == {"shortest_edge"}:
            return int(size["shortest_edge"])
    return None


def check_tower(cfg: Config, section: str, role: Optional[str]) -> None:
    """Everything an HF tower of `model.<section>` (role 'language' | 'vision'; None: nothing) needs,
    read from its directory (preflight; which checks `init` paths itself)."""
    t = getattr(cfg.model, section)
    key = f"model.{section}.hf_path"
    if t.kind != "hf":
        return
    if role == "language":
        config = load_config(key, t.hf_path, role)
        from mmpretrain.data.hf_tokenizer import HFTowerTokenizer

        tok = HFTowerTokenizer(t.hf_path, key)  # ConfigError: files missing, pad / bos / eos missing
        if tok.vocab_size > config.vocab_size:
            raise ConfigError(f"config key '{key}' = {t.hf_path!r}: its tokenizer has {tok.vocab_size} tokens, more "
                              f"than the model's vocab_size {config.vocab_size}")
        # RoBERTa-likes number positions from pad_token_id + 1
        limit = (getattr(config, "max_position_embeddings", 0) or 0) - (2 if "roberta" in config.model_type else 0)
        if limit > 0 and cfg.data.text_max_len > limit:
            raise ConfigError(f"config key 'data.text_max_len' = {cfg.data.text_max_len} exceeds the {limit} positions "
                              f"of the text model at '{key}' = {t.hf_path!r}")
        text_pooling(t, config)
    elif role == "vision":
        config = load_config(key, t.hf_path, role)
        image_pooling(t, config, f"model.{section}.pooling")
        size = processor_size(processor_dict(key, t.hf_path))
        if size is not None and size != cfg.data.image_size:
            raise ConfigError(f"config key 'data.image_size' = {cfg.data.image_size} disagrees with the image "
                              f"processor's size {size} at '{key}' = {t.hf_path!r}")
        if getattr(config, "image_size", None) not in (None, cfg.data.image_size) and "dinov2" not in config.model_type:
            raise ConfigError(f"config key 'data.image_size' = {cfg.data.image_size} disagrees with the model's "
                              f"image_size {config.image_size} at '{key}' = {t.hf_path!r}")


def resolve_image_stats(cfg: Config) -> None:
    """data.image_mean / image_std left unset take the image processor's for an HF image tower
    (an explicit value is kept); the resolved config is what the run saves, so checkpoints and
    exports normalise the same way without the directory."""
    t = cfg.model.vision
    if t.kind != "hf" or (cfg.data.image_mean is not None and cfg.data.image_std is not None):
        return
    d = processor_dict("model.vision.hf_path", t.hf_path)
    if d.get("do_normalize", True) is False:
        mean, std = [0.0] * 3, [1.0] * 3
    else:
        mean, std = d.get("image_mean"), d.get("image_std")
    if cfg.data.image_mean is None and mean is not None:
        cfg.data.image_mean = [float(v) for v in mean]
    if cfg.data.image_std is None and std is not None:
        cfg.data.image_std = [float(v) for v in std]


# ----------------------------------------------------------------------------- assets: rebuild without hf_path


def hf_sections(cfg: Config) -> Dict[str, str]:
    """modality -> its config section, for the run's towers of kind hf."""
    from mmpretrain import modalities as M

    return {m.name: m.config_section for m in M.active(cfg)
            if m.config_section and getattr(getattr(cfg.model, m.config_section), "kind", None) == "hf"}


_ASSET_SKIP = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx"}


def save_tower_assets(cfg: Config, out_dir: "str | Path") -> None:
    """Copy each HF tower's config, tokenizer and processor files (not its weights) to
    `out_dir/hf_towers/<modality>/`; `for_rebuild` points the config there."""
    for modality, section in hf_sections(cfg).items():
        src = Path(getattr(cfg.model, section).hf_path)
        dst = Path(out_dir) / ASSETS_DIR / modality
        dst.mkdir(parents=True, exist_ok=True)
        for f in sorted(src.iterdir()):
            if f.is_file() and f.suffix not in _ASSET_SKIP and not f.name.endswith(".index.json"):
                shutil.copyfile(f, dst / f.name)


def for_rebuild(cfg: Config, assets_root: "str | Path | None") -> Config:
    """The config a saved model (export or checkpoint) rebuilds from: every tower's init random (the
    weights come from the file), HF towers read from `assets_root/hf_towers/<modality>/` when it
    holds their copy, and the image statistics resolved. Returns a modified copy."""
    from mmpretrain import modalities as M

    cfg = copy.deepcopy(cfg)
    for m in M.all_modalities():
        if m.config_section and hasattr(getattr(cfg.model, m.config_section), "init"):
            getattr(cfg.model, m.config_section).init = "random"
    root = Path(assets_root) / ASSETS_DIR if assets_root is not None else None
    for modality, section in hf_sections(cfg).items():
        t = getattr(cfg.model, section)
        if root is not None and (root / modality / "config.json").is_file():
            if cfg.data.tokenizer != "bytes" and modality == M.TEXT:
                cfg.data.tokenizer = "bytes"  # it named the original directory: the tower's tokenizer
            t.hf_path = str(root / modality)
    from mmpretrain.models import hf_audio

    hf_audio.follow_tower_copy(cfg)  # the audio front end's copy sits beside its tower's
    if cfg.model.vision.kind == "hf" and os.path.isdir(cfg.model.vision.hf_path or ""):
        resolve_image_stats(cfg)
    return cfg


def load_tower_init(tower: nn.Module, modality: str, key: str, path: str) -> None:
    """`model.<section>.init` = a path: the tower's weights from one of our exports or checkpoints."""
    from mmpretrain import checkpoint as ckpt_lib

    p = Path(path)
    if (p / "model.safetensors").is_file():
        from safetensors.torch import load_file

        sd = load_file(str(p / "model.safetensors"))
    else:
        try:
            sd = ckpt_lib.consolidated_state_dict(ckpt_lib.resolve_checkpoint(p))
        except FileNotFoundError as e:
            raise ConfigError(f"config key '{key}' = {path!r}: {e}") from None
    prefix = f"towers.{modality}."
    own = {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}
    from mmpretrain.models import zero3

    missing, unexpected = zero3.load_state_dict(tower, own)  # also when built under zero.Init
    if not own or missing or unexpected:
        raise ConfigError(f"config key '{key}' = {path!r}: its '{prefix}*' weights do not fit this tower "
                          f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
