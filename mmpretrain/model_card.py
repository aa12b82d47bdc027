"""The model card (`README.md`) written into every export: architecture, training data and
progress, the metrics of the last evaluation of the run, intended use and how to load it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

MAX_METRICS = 40


def last_eval(ckpt: Optional[Path], step: Optional[int]) -> Optional[Dict[str, Any]]:
    """The last `kind: eval` record of the run's metrics.jsonl at or before `step`, when `ckpt`
    (a step_XXXXXXXX dir) lives in a run directory (run/checkpoints/step_...); else None."""
    if ckpt is None:
        return None
    run = Path(ckpt).resolve().parent.parent
    path = run / "metrics.jsonl"
    if Path(ckpt).resolve().parent.name != "checkpoints" or not path.is_file():
        return None
    found = None
    with open(path, errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line of a killed run
            if not isinstance(rec, dict) or rec.get("kind") != "eval":
                continue
            if step is not None and isinstance(rec.get("step"), int) and rec["step"] > step:
                continue
            found = rec
    return found


def _flat(d: Dict[str, Any], prefix: str = "") -> List[tuple]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flat(v, key + "/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append((key, v))
    return out


def _hf_config(tower: Any) -> Optional[Any]:
    """The config of the first transformers model inside a tower (kind hf), if any."""
    if tower is None:
        return None
    for mod in tower.modules():
        conf = getattr(mod, "config", None)
        if conf is not None and hasattr(conf, "model_type") and hasattr(conf, "to_dict"):
            return conf
    return None


def _hf_shape(conf: Any) -> tuple:
    d = conf.to_dict()
    first = lambda *ks: next((d[k] for k in ks if d.get(k) is not None), "")  # noqa: E731
    return (first("hidden_size", "d_model", "width"),
            first("num_hidden_layers", "encoder_layers", "num_layers"),
            first("num_attention_heads", "encoder_attention_heads", "num_heads"))


def _architecture(cfg: Any, vocab_size: int, model: Any = None) -> List[str]:
    from mmpretrain import modalities as M

    m = cfg.model
    towers = getattr(model, "towers", {}) if model is not None else {}
    lines = ["| tower | kind | width | depth | heads | details |", "|---|---|---|---|---|---|"]
    for mod in M.active(cfg):  # the towers this model has
        sec = M.tower_section(cfg, mod)
        if sec is None:
            lines.append(f"| {mod.name} | plugin | | | | |")
            continue
        kind = getattr(sec, "kind", "native")
        shape = (getattr(sec, "width", ""), getattr(sec, "depth", ""), getattr(sec, "heads", ""))
        detail = []
        conf = _hf_config(towers[mod.name]) if kind != "native" and mod.name in towers else None
        if conf is not None:
            shape = _hf_shape(conf)
            detail.append(f"transformers `{conf.model_type}`")
        elif kind != "native":
            detail.append(f"tower kind `{kind}`")
        elif mod.name in towers:
            tower = towers[mod.name]  # the class says which architecture; its config keys say the rest
            detail.append(type(tower).__name__ + "".join(
                f", {k} {getattr(sec, k)}" for k in ("stem", "patch_size", "n_mels") if hasattr(sec, k)))
        if mod.kind == "media":
            detail.append(f"input {tuple(mod.sample_shape(cfg.data))}")
        else:
            detail.append(f"vocab {vocab_size}, {cfg.data.text_max_len} tokens")
        if kind != "native":
            for key in ("hf_path", "pooling"):
                if getattr(sec, key, None):
                    detail.append(f"{key} `{getattr(sec, key)}`")
        lines.append(f"| {mod.name} | {kind} | {shape[0]} | {shape[1]} | {shape[2]} | {'; '.join(detail)} |")
    lines.append("")
    lines.append(f"Shared embedding dimension {m.embed_dim} (a bias-free linear projection per tower); "
                 f"contrastive loss `{cfg.loss.kind}` over the pairs {', '.join(M.pair_weights(cfg))}.")
    if m.text.decoder_depth > 0:
        lines.append(f"Captioning decoder (CoCa-style): {m.text.decoder_depth} cross-attention layers over "
                     f"{', '.join(c for c in M.captioned() if c in M.active_names(cfg))} tokens.")
    return lines


def render(cfg: Any, meta: Dict[str, Any], vocab_size: int, evaluation: Optional[Dict[str, Any]],
           clip_note: Optional[str], model: Any = None) -> str:
    step, seen = meta.get("step"), meta.get("samples_seen")
    name = cfg.run.name
    out = [f"# {name} (mmpretrain export)", "",
           "A multimodal contrastive model trained with mmpretrain: each tower maps its modality into one "
           "shared space of L2-normalized embeddings.", "", "## Architecture", ""]
    out += _architecture(cfg, vocab_size, model)
    out += ["", "## Training", "",
            f"- step {step}, samples seen {seen}, weights {meta.get('dtype')}, config hash `{meta.get('config_hash')}`",
            "- data sources:"]
    for src in cfg.data.train:
        out.append(f"  - `{src.name}` (weight {src.weight}): `{src.urls}`")
    if not cfg.data.train:
        out.append("  - none recorded")
    text_kind = getattr(cfg.model.text, "kind", "native")
    tok_name = f"the text tower's own ({text_kind})" if text_kind != "native" else f"`{cfg.data.tokenizer}`"
    out += [f"- tokenizer: {tok_name}", "", "## Evaluation", ""]
    if evaluation:
        rows = _flat({k: v for k, v in evaluation.items() if k not in ("kind", "step")})
        out.append(f"Last evaluation of the run, at step {evaluation.get('step')}:")
        out += ["", "| metric | value |", "|---|---|"]
        out += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows[:MAX_METRICS]]
        if len(rows) > MAX_METRICS:
            out.append(f"\n({len(rows) - MAX_METRICS} more in the run's metrics.jsonl)")
    else:
        out.append("None recorded (no `kind: eval` record in the run's metrics.jsonl for this checkpoint).")
    out += ["", "## Intended use", "",
            "Research on multimodal retrieval and zero-shot classification (image / audio / text embeddings, "
            "captions where the decoder is present), and as initialisation for further training. The model "
            "knows only what its training data shows: check it on your own data before relying on it, and do "
            "not use it for decisions about people.", "",
            "## How to load", "", "```python",
            "from mmpretrain import inference",
            "m = inference.load(\"<this dir>\")",
            "emb = m.encode_text([\"a red circle\"])        # also encode_image / encode_audio",
            "", "import mmpretrain.hf                        # registers model_type 'mmpretrain'",
            "from transformers import AutoModel, AutoTokenizer",
            "model = AutoModel.from_pretrained(\"<this dir>\")",
            "tok = AutoTokenizer.from_pretrained(\"<this dir>\")",
            "emb = model.get_text_features(**tok([\"a red circle\"], return_tensors=\"pt\"))"]
    if clip_note is None:
        out += ["", "from transformers import CLIPModel, CLIPProcessor   # image-text part, no mmpretrain needed",
                "clip = CLIPModel.from_pretrained(\"<this dir>/clip\")",
                "processor = CLIPProcessor.from_pretrained(\"<this dir>/clip\")"]
    out.append("```")
    if clip_note is not None:
        out += ["", f"No CLIPModel export: {clip_note}."]
    else:
        out += ["", "`clip/` holds the image and text towers as a `transformers.CLIPModel` (same embeddings); "
                "the audio tower and the caption decoder are only in the mmpretrain export."]
    return "\n".join(out) + "\n"


def write(out_dir: "str | Path", cfg: Any, meta: Dict[str, Any], vocab_size: int, ckpt: Optional[Path] = None,
          clip_note: Optional[str] = None, model: Any = None) -> Path:
    """README.md in `out_dir`; `model` (the loaded model) gives the shapes of transformers towers."""
    path = Path(out_dir) / "README.md"
    path.write_text(render(cfg, meta, vocab_size, last_eval(ckpt, meta.get("step")), clip_note, model))
    return path
