"""The one way to rebuild a trained model from disk: `load_model(path)` for exports and
training checkpoints (used by `mmpretrain.evaluate`, `mmpretrain.inference` and
`mmpretrain.export`).

`path` is an export (`model.safetensors` + `config.json` [+ `tokenizer/`], written by
`python -m mmpretrain.export`), one `step_XXXXXXXX/` checkpoint, a `checkpoints/` directory or
a run directory (its newest complete checkpoint). Either way: config -> tokenizer ->
`build_model` -> a checked load of the weights (every key must fit). Exports are read with
safetensors and JSON only; checkpoints with the weights-only loader (`mmpretrain.safe_load`),
consolidated over ZeRO partitions by DeepSpeed's converter.
"""
from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mmpretrain import checkpoint as ckpt_lib
from mmpretrain.config import Config, from_dict, load_config
from mmpretrain.data.hf_tokenizer import tokenizer_for
from mmpretrain.data.tokenizer import build_tokenizer
from mmpretrain.models import build_model
from mmpretrain.models.hf import for_rebuild

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
EXPORT_TOKENIZER = "tokenizer"


class ExportFileError(RuntimeError):
    """A file of an export is not what its name says (not a safetensors file, not JSON)."""


@dataclass
class Loaded:
    """A model rebuilt from `source` (an export dir or a step dir), on the CPU, in eval mode.
    `state_dict` is the fp32 state it was loaded from (what an export writes)."""

    model: torch.nn.Module
    cfg: Config
    tokenizer: Any
    state_dict: Dict[str, torch.Tensor]
    source: Path


def is_export(path: "str | Path") -> bool:
    return (Path(path) / EXPORT_WEIGHTS).is_file()


def load(path: "str | Path", ema: bool = False) -> Loaded:
    """Config, tokenizer, model and weights from an export or a checkpoint (see the module doc).
    ema: a checkpoint's EMA weights (train.ema, its ema.pt) instead of the trained ones; refused
    (FileNotFoundError) for an export or a checkpoint without one.
    Raises FileNotFoundError for a path that is neither, RuntimeError when the weights do not fit
    the model, safe_load.UnsafeCheckpointError for a checkpoint file that is not plain data,
    ExportFileError (a RuntimeError) naming an export file that is not safetensors / JSON."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    if is_export(p):
        if ema:
            raise FileNotFoundError(f"{p} is an export: the EMA choice was made when it was exported (--ema)")
        source, where = p, p / EXPORT_WEIGHTS
        cfg, tok, sd = _read_export(p)
    else:
        if (p / EXPORT_CONFIG).is_file():
            raise FileNotFoundError(f"{p} is not an export: {EXPORT_WEIGHTS} is missing "
                                    "(make one with python -m mmpretrain.export)")
        source = where = ckpt_lib.resolve_checkpoint(p)
        cfg, tok, sd = _read_checkpoint(source)
        if ema:
            from mmpretrain.ema import with_ema

            sd = with_ema(sd, source)
    model = build_model(cfg, tok.vocab_size)
    ckpt_lib.load_state_checked(model, sd, where)
    return Loaded(model.eval(), cfg, tok, sd, source)


def load_model(path: "str | Path", device: "str | torch.device | None" = None) -> Tuple[torch.nn.Module, Config, Any]:
    """(model in eval mode on `device`, config, tokenizer) from an export or a checkpoint.
    device None: CUDA when available, else the CPU."""
    loaded = load(path)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return loaded.model.to(dev).eval(), loaded.cfg, loaded.tokenizer


def saved_config(path: "str | Path") -> Config:
    """The config `load(path)` rebuilds the model from, without reading weights or building the
    model (`mmpretrain-evaluate --print-config`). Raises as `load` does for a wrong path."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    if is_export(p):
        return _export_config(p)
    if (p / EXPORT_CONFIG).is_file():
        raise FileNotFoundError(f"{p} is not an export: {EXPORT_WEIGHTS} is missing "
                                "(make one with python -m mmpretrain.export)")
    return _checkpoint_config(ckpt_lib.resolve_checkpoint(p))


def _export_config(d: Path) -> Config:
    if not (d / EXPORT_CONFIG).is_file():
        raise FileNotFoundError(f"{d} is not an export: {EXPORT_CONFIG} is missing "
                                "(make one with python -m mmpretrain.export)")
    try:
        meta = json.loads((d / EXPORT_CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportFileError(f"export file '{d / EXPORT_CONFIG}' is not a JSON file ({e})") from None
    # towers: init random (the weights are below), HF ones from the export's copy of their config
    return for_rebuild(from_dict(meta.get("config", meta)), d)


def _read_export(d: Path) -> Tuple[Config, Any, Dict[str, torch.Tensor]]:
    cfg = _export_config(d)
    tok_dir = d / EXPORT_TOKENIZER
    tok = build_tokenizer(str(tok_dir)) if tok_dir.is_dir() else tokenizer_for(cfg)
    sd = {k: v.float() for k, v in _load_safetensors(d / EXPORT_WEIGHTS).items()}
    return cfg, tok, sd


def _load_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    """load_file, with a damaged or foreign file named in one line instead of safetensors' bare
    'header too large' / 'invalid header' message."""
    try:
        return load_file(str(path))
    except SafetensorError as e:
        size = path.stat().st_size
        raise ExportFileError(f"export file '{path}' is not a safetensors file ({size} bytes; safetensors: {e}); "
                              "re-export it with python -m mmpretrain.export") from None


def _checkpoint_config(ckpt: Path) -> Config:
    # a checkpoint's run directory holds the HF towers' configs (trainer: save_tower_assets)
    return for_rebuild(load_config(str(ckpt / "config.yaml")), ckpt.parent.parent)


def _read_checkpoint(ckpt: Path) -> Tuple[Config, Any, Dict[str, torch.Tensor]]:
    cfg = _checkpoint_config(ckpt)
    tok = tokenizer_for(cfg)
    # DeepSpeed's ZeRO converter prints progress to stdout; CLIs print their results there
    with contextlib.redirect_stdout(sys.stderr):
        sd = ckpt_lib.consolidated_state_dict(ckpt)
    return cfg, tok, sd
