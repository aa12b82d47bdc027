"""Export a checkpoint (any ZeRO stage, any world size) to a self-contained directory that
loads without DeepSpeed and without unpickling anything:

    python -m mmpretrain.export --checkpoint runs/demo --out exports/demo

writes `model.safetensors` (fp32, or --dtype bf16/fp16), `config.json` (the resolved training
config plus provenance) and the tokenizer files. --checkpoint takes a run directory (its newest
complete checkpoint), a `checkpoints/` directory or one `step_XXXXXXXX/` directory.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from mmpretrain import checkpoint as ckpt_lib
from mmpretrain.config import config_hash, load_config, to_dict

EXPORT_FORMAT = "mmpretrain-export/1"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export(checkpoint: "str | Path", out: "str | Path", dtype: str = "fp32") -> Path:
    """Write the export; returns `out`. Written to a temporary sibling and renamed, so a crash
    never leaves a half-written export under `out`."""
    from safetensors.torch import save_file

    from mmpretrain.data.tokenizer import build_tokenizer
    from mmpretrain.models import build_model

    if dtype not in _DTYPES:
        raise ValueError(f"dtype '{dtype}' is not one of {sorted(_DTYPES)}")
    ckpt = ckpt_lib.resolve_checkpoint(checkpoint)
    cfg = load_config(str(ckpt / "config.yaml"))
    tok = build_tokenizer(cfg.data.tokenizer)
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's converter prints progress
        sd = ckpt_lib.consolidated_state_dict(ckpt)
    # check against a freshly built model, so an export always loads
    ckpt_lib.load_state_checked(build_model(cfg, tok.vocab_size), sd, ckpt)
    tensors = {k: v.to(_DTYPES[dtype]).contiguous() for k, v in sd.items()}
    trainer = ckpt_lib.read_trainer_state(ckpt)
    meta: Dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "config": to_dict(cfg),
        "config_hash": config_hash(cfg),
        "dtype": dtype,
        "vocab_size": tok.vocab_size,
        "source_checkpoint": str(ckpt.resolve()),
        "step": trainer.get("step"),
        "samples_seen": trainer.get("samples_seen"),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": EXPORT_FORMAT, "dtype": dtype})
        (tmp / "config.json").write_text(json.dumps(meta, indent=1) + "\n")
        tok.save(str(tmp / "tokenizer"))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmpretrain.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir or step_XXXXXXXX dir")
    p.add_argument("--out", required=True, help="export directory (replaced if it exists)")
    p.add_argument("--dtype", default="fp32", choices=sorted(_DTYPES))
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mmpretrain.safe_load import UnsafeCheckpointError

    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        src = ckpt_lib.resolve_checkpoint(args.checkpoint)
        out = export(src, args.out, args.dtype)
    except (FileNotFoundError, RuntimeError, ValueError, UnsafeCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"exported {src} -> {out} ({size / 2**20:.1f} MiB, "
          f"{time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
