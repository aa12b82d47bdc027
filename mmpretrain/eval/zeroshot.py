"""Zero-shot classification: class names x prompt templates -> averaged text embeddings
(CLIP practice); image and audio embeddings are classified by cosine similarity."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from mmpretrain.data.shards import expand_urls
from mmpretrain.eval.metrics import classification_metrics


@torch.no_grad()
def class_embeddings(model: torch.nn.Module, tokenizer, class_names: Sequence[str], templates: Sequence[str],
                     max_len: int, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """(C, E) unit vectors: per class, the mean of its normalized prompt embeddings, renormalized."""
    if not class_names:
        raise ValueError("no class names")
    templates = list(templates) or ["{}"]
    prompts = [t.replace("{}", c) for c in class_names for t in templates]  # class-major
    embs = []
    for s in range(0, len(prompts), batch_size):
        ids, lens = tokenizer.encode_batch(prompts[s: s + batch_size], max_len)
        embs.append(model.encode_text(ids.to(device), lens.to(device)).float())
    e = F.normalize(torch.cat(embs), dim=-1).view(len(class_names), len(templates), -1).mean(1)
    return F.normalize(e, dim=-1)


def zeroshot_predict(embeddings: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """(N, C) cosine scores of (N, E) embeddings against the (C, E) class embeddings."""
    return F.normalize(embeddings.float(), dim=-1) @ class_emb.to(embeddings.device).float().t()


def zeroshot_report(embeddings: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], labels: torch.Tensor,
                    class_emb: torch.Tensor) -> Dict[str, Dict[str, object]]:
    """Per modality (samples having it and a label in [0, C)): accuracy, macro recall / F1 / precision,
    confusion matrix (rows = true class), as eval.metrics.classification_metrics."""
    num_classes = class_emb.shape[0]
    out: Dict[str, Dict[str, object]] = {}
    for m, e in embeddings.items():
        keep = masks[m].bool().cpu() & (labels.cpu() >= 0) & (labels.cpu() < num_classes)
        if not bool(keep.any()):
            continue
        scores = zeroshot_predict(e.cpu()[keep], class_emb.cpu())
        out[m] = classification_metrics(scores.argmax(1), labels.cpu()[keep], num_classes)
    return out


def load_class_names(path: Optional[str] = None, eval_urls: Optional[str] = None) -> Optional[List[str]]:
    """Class names in label order: a json list file (or a json object with "classes"), a text
    file with one name a line, or else `classes.json` beside or above the first eval shard."""
    candidates: List[Path] = []
    if path:
        candidates.append(Path(path))
    elif eval_urls:
        urls = expand_urls(eval_urls)
        if urls and not urls[0].startswith(("pipe:", "http:", "https:")):
            shard = Path(urls[0])
            candidates += [shard.parent / "classes.json", shard.parent.parent / "classes.json"]
    for c in candidates:
        if c.is_file():
            text = c.read_text()
            if c.suffix == ".json":
                data = json.loads(text)
                names = data.get("classes") if isinstance(data, dict) else data
            else:
                names = [ln.strip() for ln in text.splitlines() if ln.strip()]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{c}: expected a list of class-name strings")
            return names
        if path:
            raise FileNotFoundError(f"class names file '{path}' does not exist")
    return None
