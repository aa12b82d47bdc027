"""Run by tests under a launcher: train like `python -m mmpretrain.train`, then embed the first
samples of a shard with the live (possibly ZeRO-3 partitioned) training model and save them
on rank 0. Usage: train_then_embed.py OUT.pt SHARD --config FILE [overrides]"""
from __future__ import annotations

import sys
import tarfile

import torch

from mmpretrain import distributed as D
from mmpretrain.config import load_config
from mmpretrain.inference import InferenceModel
from mmpretrain.logging import setup_logging
from mmpretrain.trainer import Trainer


def shard_inputs(shard: str, n: int = 8) -> dict:
    """Image bytes, audio bytes and captions of the first n samples that have all three."""
    groups: dict = {}
    with tarfile.open(shard) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            groups.setdefault(key, {})[ext] = tf.extractfile(m).read()
    out = {"image": [], "audio": [], "text": []}
    for g in groups.values():
        img = next((g[e] for e in ("png", "jpg") if e in g), None)
        aud = next((g[e] for e in ("flac", "wav") if e in g), None)
        if img is None or aud is None or "txt" not in g:
            continue
        out["image"].append(img)
        out["audio"].append(aud)
        out["text"].append(g["txt"].decode())
        if len(out["text"]) == n:
            break
    return out


def main() -> int:
    out_file, shard, _, config, *overrides = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    cfg = load_config(config, overrides)
    info = D.discover()
    D.init(info)
    setup_logging(cfg.run.output_dir, info.rank)
    trainer = Trainer(cfg, info)
    trainer.run()
    model = trainer.engine.module.model.eval()  # ZeRO-3: submodule hooks gather the parameters
    inf = InferenceModel(model, cfg, trainer.tokenizer, trainer.engine.device)
    x = shard_inputs(shard)
    emb = {"image": inf.encode_image(x["image"]), "audio": inf.encode_audio(x["audio"]),
           "text": inf.encode_text(x["text"])}
    if info.is_main:
        torch.save({"inputs": x, "emb": emb}, out_file)
    D.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
