"""Run a model over an eval split on every rank and compute retrieval metrics once.

Under ZeRO-3 every forward is collective, so ranks with fewer batches run dummy
forwards until all ranks are done."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from mmpretrain import distributed as D
from mmpretrain.config import Config


@torch.no_grad()
def embed_split(model, loader, device: torch.device, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """-> {image, audio, text: (N, E) fp32, image_mask/audio_mask/text_mask: (N,), label: (N,)} on this rank."""
    was_training = model.training
    model.eval()
    cols: Dict[str, List[torch.Tensor]] = {k: [] for k in ("image", "audio", "text", "image_mask", "audio_mask", "text_mask", "label")}
    it = iter(loader)
    dummy = None
    while True:
        batch = next(it, None)
        done = torch.tensor([0.0 if batch is not None else 1.0])
        if D.all_reduce_sum(done).item() >= D.world_size():
            break
        real = batch is not None
        if real:
            dummy = batch
        elif dummy is None:
            raise RuntimeError("this rank's eval shard is empty; use fewer processes or more eval shards")
        b = batch if real else dummy
        img = b["image"].to(device, dtype)
        emb_i = model.encode_image(img).float()
        emb_a = model.encode_audio(b["audio"].to(device)).float()
        emb_t = model.encode_text(b["text"].to(device), b["text_len"].to(device)).float()
        if real:
            for k, v in (("image", emb_i), ("audio", emb_a), ("text", emb_t)):
                cols[k].append(v.cpu())
            for k in ("image_mask", "audio_mask", "text_mask", "label"):
                cols[k].append(b[k].cpu())
    model.train(was_training)
    return {k: torch.cat(v) if v else torch.empty(0) for k, v in cols.items()}


def evaluate_retrieval(model, cfg: Config, tokenizer, device: torch.device, dtype: torch.dtype,
                       keep: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Retrieval metrics of the eval split; `keep`, if given, receives the gathered embeddings
    under 'embedded' (reused by the zero-shot / probe evals)."""
    from mmpretrain.data.pipeline import build_eval_loader
    from mmpretrain.eval.retrieval import gather_features, retrieval_report

    loader = build_eval_loader(cfg.data.eval_urls, cfg, tokenizer, batch_size=cfg.train.micro_batch_size, rank=D.rank(), world_size=D.world_size())
    local = embed_split(model, loader, device, dtype)
    full = {k: gather_features(v) for k, v in local.items()}
    if keep is not None:
        keep["embedded"] = full
    emb = {m: full[m] for m in ("image", "audio", "text")}
    masks = {m: full[f"{m}_mask"].bool() for m in ("image", "audio", "text")}
    labels = full["label"] if (full["label"] >= 0).all() and full["label"].numel() else None
    return retrieval_report(emb, masks, labels)
