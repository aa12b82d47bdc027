"""Export a checkpoint (any ZeRO stage, any world size) to a self-contained directory that
loads without DeepSpeed and without unpickling anything:

    python -m mmpretrain.export --checkpoint runs/demo --out exports/demo

writes `model.safetensors` (fp32, or --dtype bf16/fp16), `config.json` (the resolved training
config plus provenance) and the tokenizer files. --checkpoint takes a run directory (its newest
complete checkpoint), a `checkpoints/` directory or one `step_XXXXXXXX/` directory.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from safetensors.torch import save_file

from mmpretrain import checkpoint as ckpt_lib
from mmpretrain import export_clip, loading, model_card
from mmpretrain.config import DTYPES, config_hash, dtype_of, to_dict
from mmpretrain.models.hf import save_tower_assets
from mmpretrain.safe_load import UnsafeCheckpointError

EXPORT_FORMAT = "mmpretrain-export/1"


def export(checkpoint: "str | Path", out: "str | Path", dtype: str = "fp32", clip: str = "auto",
           ema: bool = False) -> Path:
    """Write the export; returns `out`. ema: export the checkpoint's EMA weights (train.ema). Written to a temporary sibling and renamed, so a crash
    never leaves a half-written export under `out`. The export is readable by others as far as
    the umask allows (directories 0777 & ~umask, files 0666 & ~umask), like any other file."""
    torch_dtype = dtype_of(dtype)
    ckpt = ckpt_lib.resolve_checkpoint(checkpoint)
    # the model a later load_model rebuilds, checked against these weights: an export always loads
    loaded = loading.load(ckpt, ema=ema)
    cfg, tok, sd = loaded.cfg, loaded.tokenizer, loaded.state_dict
    tensors = {k: v.to(torch_dtype).contiguous() for k, v in sd.items()}
    trainer = ckpt_lib.read_trainer_state(ckpt)
    meta: Dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "model_type": "mmpretrain", "architectures": ["MMPretrainModel"],  # AutoModel after `import mmpretrain.hf`
        "config": to_dict(cfg),
        "config_hash": config_hash(cfg),
        "dtype": dtype,
        "vocab_size": tok.vocab_size,
        "source_checkpoint": str(ckpt.resolve()),
        "step": trainer.get("step"),
        "samples_seen": trainer.get("samples_seen"),
        "weights": "ema" if ema else "trained",  # ema: the moving average of train.ema
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    clip_why = export_clip.skip_reason(loaded, clip)  # None: a transformers.CLIPModel goes to out/clip
    meta["clip"] = export_clip.CLIP_DIR if clip_why is None else f"not exported: {clip_why}"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(tensors, str(tmp / loading.EXPORT_WEIGHTS), metadata={"format": "pt",  # what transformers' loaders check
                                                                          "mmpretrain_format": EXPORT_FORMAT, "dtype": dtype})
        (tmp / loading.EXPORT_CONFIG).write_text(json.dumps(meta, indent=1) + "\n")
        tok.save(str(tmp / loading.EXPORT_TOKENIZER), cfg.data.text_max_len)
        tok.save(str(tmp), cfg.data.text_max_len)  # AutoTokenizer.from_pretrained(out) reads the root
        if clip_why is None:
            export_clip.export_clip(loaded, tmp / export_clip.CLIP_DIR, torch_dtype)
        model_card.write(tmp, cfg, meta, tok.vocab_size, ckpt, clip_why, loaded.model)
        save_tower_assets(cfg, tmp)  # HF towers' config / tokenizer / processor: loads without their hf_path
        share_readable(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def share_readable(root: Path) -> None:
    """Modes a plain mkdir / open would give (0777 / 0666 & ~umask), for `root` and everything
    under it: mkdtemp makes the directory 0700 and safetensors writes its file 0600, which
    teammates could not read."""
    mask = os.umask(0)  # reading the umask means setting it; restored at once
    os.umask(mask)
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from mmpretrain.cli import tool_epilog

    p = argparse.ArgumentParser(prog="mmpretrain-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=tool_epilog("config.json keeps the run's config under \"config\"."))
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir or step_XXXXXXXX dir")
    p.add_argument("--out", required=True, help="export directory (replaced if it exists)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of the saved weights (default fp32)")
    p.add_argument("--clip", default="auto", choices=export_clip.CLIP_MODES,
                   help="also write the image-text towers as a transformers.CLIPModel into OUT/clip: auto = when "
                        "the towers map onto CLIP exactly (else say why and skip), require = fail when not, off")
    p.add_argument("--ema", action="store_true",
                   help="export the EMA of the weights (a run with train.ema.enabled) instead of the trained weights")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        src = ckpt_lib.resolve_checkpoint(args.checkpoint)
        out = export(src, args.out, args.dtype, args.clip, ema=args.ema)
    except (FileNotFoundError, RuntimeError, ValueError, UnsafeCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"exported {src} -> {out} ({size / 2**20:.1f} MiB, "
          f"{time.perf_counter() - t0:.1f} s)")
    clip_state = json.loads((out / loading.EXPORT_CONFIG).read_text()).get("clip")
    print(f"CLIPModel: {out / clip_state}" if clip_state == export_clip.CLIP_DIR else f"CLIPModel: {clip_state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
