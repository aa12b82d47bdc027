"""The image-text part of a model as a real `transformers.CLIPModel` directory (config.json with
model_type clip, model.safetensors, tokenizer files, preprocessor_config.json), for tools that know
CLIP and not us:

    model = CLIPModel.from_pretrained("exports/demo/clip")
    processor = CLIPProcessor.from_pretrained("exports/demo/clip")

Native towers map onto CLIP's weights exactly (same embeddings as mmpretrain.inference.load):
vision with `model.vision.stem: patch` and the native text tower; so do transformers CLIP towers
(`kind: hf` on a clip_vision_model / clip_text_model directory, CLIP's own pooling), in any mix. The fused qkv splits into
q/k/v; CLIP's patch embedding has no bias, so ours is folded into the patch rows of the position
embedding (conv(x) + b + pos = conv_nobias(x) + (pos + b)); CLIP pools text at the first EOS id,
which is our length-1 position (our sequences are BOS .. EOS, then pad). The audio tower, the
caption decoder and the SigLIP bias have no place in a CLIPModel and are left out.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from mmpretrain.data.decode import CLIP_MEAN, CLIP_STD

CLIP_DIR = "clip"  # where mmpretrain.export writes it inside an export


class NotClipCompatible(ValueError):
    """The model cannot be written as a CLIPModel; the message says why in one line."""


def clip_incompatibility(cfg: Any, tokenizer: Any) -> Optional[str]:
    """Why this model is not a CLIPModel (one line), or None when it maps exactly."""
    from mmpretrain import modalities as M

    if "image" not in M.active_names(cfg) or M.TEXT not in M.active_names(cfg):
        return "no image or no text tower"
    v, t = cfg.model.vision, cfg.model.text
    for sec, tower, want, pool in ((v, "vision", "clip_vision_model", ("auto", "cls")),
                                   (t, "text", "clip_text_model", ("auto", "eos"))):
        if sec.kind == "native":
            continue
        mt = _hf_model_type(sec)
        if sec.kind != "hf" or mt != want:
            return (f"model.{tower}.kind={sec.kind!r} ({mt or 'unknown model type'}): only native towers and "
                    f"transformers CLIP towers ({want}) map onto a CLIPModel")
        if sec.pooling not in pool:
            return f"model.{tower}.pooling={sec.pooling!r}: CLIP pools {pool[1]}"
    if v.kind == "native" and v.stem != "patch":
        return f"model.vision.stem={v.stem!r}: CLIP's vision embedding is one linear patchify (stem: patch)"
    if v.kind == "native" and cfg.data.image_size % v.patch_size:
        return f"data.image_size={cfg.data.image_size} is not a multiple of model.vision.patch_size={v.patch_size}"
    if tokenizer.eos_id == 2:
        return ("the tokenizer's EOS id is 2: transformers' CLIP text model then pools at the largest token id "
                "(its legacy rule), not at EOS")
    if tokenizer.bos_id == tokenizer.eos_id:
        return "BOS and EOS are the same token: CLIP would pool at BOS (the first EOS id)"
    return None


def _hf_model_type(sec: Any) -> Optional[str]:
    try:
        with open(Path(sec.hf_path) / "config.json") as f:
            return json.load(f).get("model_type")
    except (OSError, TypeError, ValueError):
        return None


def _fused_qkv(prefix: str, src: str, sd: Dict[str, torch.Tensor], out: Dict[str, torch.Tensor]) -> None:
    w, b = sd[f"{src}.attn.qkv.weight"].chunk(3, 0), sd[f"{src}.attn.qkv.bias"].chunk(3, 0)
    for name, wi, bi in zip(("q_proj", "k_proj", "v_proj"), w, b):
        out[f"{prefix}.self_attn.{name}.weight"], out[f"{prefix}.self_attn.{name}.bias"] = wi, bi


def _encoder(dst: str, src: str, depth: int, sd: Dict[str, torch.Tensor], out: Dict[str, torch.Tensor]) -> None:
    for i in range(depth):
        d, s = f"{dst}.encoder.layers.{i}", f"{src}.encoder.blocks.{i}"
        _fused_qkv(d, s, sd, out)
        pairs = {"self_attn.out_proj": "attn.out", "layer_norm1": "ln1", "layer_norm2": "ln2",
                 "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2"}
        for a, b in pairs.items():
            for p in ("weight", "bias"):
                out[f"{d}.{a}.{p}"] = sd[f"{s}.{b}.{p}"]


def _hf_part(sd: Dict[str, torch.Tensor], tower: str, part: str, out: Dict[str, torch.Tensor]) -> None:
    """A transformers CLIP tower's weights (`towers.<m>.model.<part>.*`) under CLIPModel's `<part>.*`."""
    pre = f"towers.{tower}.model."
    for k, x in sd.items():
        if k.startswith(pre):
            rest = k[len(pre):]  # CLIPVisionModel keeps `vision_model.`; a bare transformer does not
            out[rest if rest.startswith(part + ".") else f"{part}.{rest}"] = x


def clip_state_dict(sd: Dict[str, torch.Tensor], cfg: Any, max_log_scale: float) -> Dict[str, torch.Tensor]:
    """Our state dict (fp32) -> CLIPModel's keys."""
    out: Dict[str, torch.Tensor] = {}
    v, t = "towers.image", "towers.text"
    vm, tm = "vision_model", "text_model"
    if cfg.model.vision.kind == "native":
        pos = sd[f"{v}.pos"][0].clone()  # (N+1, W)
        pos[1:] += sd[f"{v}.patch.bias"]  # CLIP's patch conv has no bias: fold ours into the patch positions
        out[f"{vm}.embeddings.patch_embedding.weight"] = sd[f"{v}.patch.weight"]
        out[f"{vm}.embeddings.class_embedding"] = sd[f"{v}.cls"].reshape(-1)
        out[f"{vm}.embeddings.position_embedding.weight"] = pos
        for a, b in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
            for p in ("weight", "bias"):
                out[f"{vm}.{a}.{p}"] = sd[f"{v}.{b}.{p}"]
        _encoder(vm, v, cfg.model.vision.depth, sd, out)
    else:
        _hf_part(sd, "image", vm, out)
    if cfg.model.text.kind == "native":
        out[f"{tm}.embeddings.token_embedding.weight"] = sd[f"{t}.tok.weight"]
        out[f"{tm}.embeddings.position_embedding.weight"] = sd[f"{t}.pos"][0]
        for p in ("weight", "bias"):
            out[f"{tm}.final_layer_norm.{p}"] = sd[f"{t}.ln_post.{p}"]
        _encoder(tm, t, cfg.model.text.depth, sd, out)
    else:
        _hf_part(sd, "text", tm, out)
    out["visual_projection.weight"] = sd["proj.image.weight"]
    out["text_projection.weight"] = sd["proj.text.weight"]
    # our scale is clamped at loss.max_logit_scale: store the value in effect
    out["logit_scale"] = sd["logit_scale.image_text"].reshape(()).clamp(max=max_log_scale)
    return {k: x.contiguous() for k, x in out.items()}


def clip_config(cfg: Any, tokenizer: Any, logit_scale: float, model: Any = None) -> Any:
    """CLIPConfig: native towers' shapes from our config, transformers towers' own configs; the text
    config's pad / bos / eos are our tokenizer's (CLIP pools at the first EOS id)."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    v, t = cfg.model.vision, cfg.model.text
    common = dict(hidden_act="gelu", layer_norm_eps=1e-5, attention_dropout=0.0, projection_dim=cfg.model.embed_dim)
    ids = dict(pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    if t.kind == "native":
        text = CLIPTextConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=t.width, intermediate_size=int(t.width * t.mlp_ratio),
            num_hidden_layers=t.depth, num_attention_heads=t.heads, max_position_embeddings=cfg.data.text_max_len,
            **ids, **common).to_dict()
    else:
        text = {**model.towers["text"].model.config.to_dict(), **ids, "projection_dim": cfg.model.embed_dim}
    if v.kind == "native":
        vision = CLIPVisionConfig(
            hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio), num_hidden_layers=v.depth,
            num_attention_heads=v.heads, num_channels=3, image_size=cfg.data.image_size, patch_size=v.patch_size,
            **common).to_dict()
    else:
        vision = {**model.towers["image"].model.config.to_dict(), "projection_dim": cfg.model.embed_dim}
    for d in (text, vision):
        for k in ("architectures", "model_type", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
            d.pop(k, None)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.model.embed_dim,
                      logit_scale_init_value=logit_scale)


def preprocessor_config(cfg: Any) -> Dict[str, Any]:
    """CLIPImageProcessor doing our eval transform: shorter side to data.image_size (bicubic),
    centre crop, /255, the run's mean / std (data.image_mean / image_std, default CLIP's)."""
    s = int(cfg.data.image_size)
    return {
        "image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
        "do_resize": True, "size": {"shortest_edge": s}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": s, "width": s},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [float(x) for x in (getattr(cfg.data, "image_mean", None) or CLIP_MEAN)],
        "image_std": [float(x) for x in (getattr(cfg.data, "image_std", None) or CLIP_STD)],
        "do_convert_rgb": True,
    }


def export_clip(loaded: Any, out_dir: "str | Path", dtype: torch.dtype = torch.float32) -> Path:
    """Write `loaded` (mmpretrain.loading.Loaded) as a CLIPModel directory; NotClipCompatible
    (one line: why) when its towers do not map onto CLIP's."""
    from transformers import CLIPModel

    cfg, tok = loaded.cfg, loaded.tokenizer
    why = clip_incompatibility(cfg, tok)
    if why:
        raise NotClipCompatible(why)
    max_log = math.log(cfg.loss.max_logit_scale)
    sd = clip_state_dict({k: v.float() for k, v in loaded.state_dict.items()}, cfg, max_log)
    conf = clip_config(cfg, tok, float(sd["logit_scale"]), loaded.model)
    conf.architectures = ["CLIPModel"]
    model = CLIPModel(conf)
    model.load_state_dict(sd, strict=True)  # every CLIP weight from ours, nothing left over
    model = model.to(dtype).eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(cfg), indent=1) + "\n")
    tok.save(str(out), cfg.data.text_max_len)
    from mmpretrain.export import share_readable  # lazy: export imports this module

    share_readable(out)  # safetensors writes 0600: teammates could not read a CLIP directory written on its own

    return out


CLIP_MODES = ("auto", "off", "require")


def skip_reason(loaded: Any, mode: str = "auto") -> Optional[str]:
    """None when `mmpretrain.export` writes the CLIPModel (into <export>/clip), else why not (one
    line). mode: auto (when compatible) | off | require (NotClipCompatible when not compatible)."""
    if mode not in CLIP_MODES:
        raise ValueError(f"clip export mode {mode!r}; choose one of {CLIP_MODES}")
    if mode == "off":
        return "not requested (--clip off)"
    why = clip_incompatibility(loaded.cfg, loaded.tokenizer)
    if why and mode == "require":
        raise NotClipCompatible(f"--clip require: this model is not CLIP-compatible: {why}")
    return why
