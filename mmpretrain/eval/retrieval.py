"""Cross-modal retrieval metrics (R@k, median/mean rank), chunked over queries, plus a
variable-size all_gather so each rank can embed its own eval shard.

Ranks are 1-based. Tie policy (pessimistic, deterministic): a non-matching gallery item scoring
within `tie_tol` (1e-6) of the best matching item is ranked before it, so
rank = 1 + #{non-matching g : s(q, g) >= m - tie_tol}, m = best cosine among matching items.
Constant features thus score at chance, never 100 %; the tolerance absorbs float32 matmul
rounding, which changes with the chunk shape. Recalls are fractions in [0, 1].
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmpretrain import modalities as M


def _matching(q_lab: Optional[torch.Tensor], g_lab: Optional[torch.Tensor], q0: int, nq: int, ng: int,
              device: torch.device) -> torch.Tensor:
    """(nq, ng) bool: which gallery items match each query of the chunk starting at q0."""
    if q_lab is None:
        idx = torch.arange(q0, q0 + nq, device=device)
        return idx[:, None] == torch.arange(ng, device=device)[None, :]
    return q_lab[:, None] == g_lab[None, :]


def retrieval_ranks(query: torch.Tensor, gallery: torch.Tensor, query_labels: Optional[torch.Tensor] = None,
                    gallery_labels: Optional[torch.Tensor] = None, chunk_size: int = 1024,
                    tie_tol: float = 1e-6) -> torch.Tensor:
    """(Nq,) float: 1-based rank of the best-ranked matching gallery item per query (inf: no match).

    Without labels query i matches gallery i (needs Nq == Ng); with labels, matching = same label.
    Only a (chunk_size, Ng) block of similarities exists at any time.
    """
    if query.dim() != 2 or gallery.dim() != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"need (Nq, D) and (Ng, D) features, got {tuple(query.shape)} and {tuple(gallery.shape)}")
    if (query_labels is None) != (gallery_labels is None):
        raise ValueError("give both query_labels and gallery_labels, or neither")
    nq, ng = query.shape[0], gallery.shape[0]
    if query_labels is None and nq != ng:
        raise ValueError(f"without labels query i matches gallery i, so Nq must equal Ng ({nq} != {ng})")
    if query_labels is not None and (query_labels.shape[0] != nq or gallery_labels.shape[0] != ng):
        raise ValueError("labels must have one entry per query / gallery row")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dev = query.device
    q = F.normalize(query.float(), dim=-1)
    g = F.normalize(gallery.to(dev).float(), dim=-1)
    q_lab = query_labels.to(dev) if query_labels is not None else None
    g_lab = gallery_labels.to(dev) if gallery_labels is not None else None
    ranks = torch.empty(nq, dtype=torch.float64, device=dev)
    for s in range(0, nq, chunk_size):
        e = min(nq, s + chunk_size)
        sims = q[s:e] @ g.t()  # (c, Ng)
        match = _matching(q_lab[s:e] if q_lab is not None else None, g_lab, s, e - s, ng, dev)
        best = sims.masked_fill(~match, float("-inf")).amax(dim=1, keepdim=True)
        r = 1 + ((sims >= best - tie_tol) & ~match).sum(dim=1).double()
        ranks[s:e] = torch.where(match.any(dim=1), r, torch.full_like(r, math.inf))
    return ranks


def retrieval_metrics(query: torch.Tensor, gallery: torch.Tensor, query_labels: Optional[torch.Tensor] = None,
                      gallery_labels: Optional[torch.Tensor] = None, ks: Sequence[int] = (1, 5, 10),
                      chunk_size: int = 1024, tie_tol: float = 1e-6) -> Dict[str, float]:
    """{'R@k' for k in ks, 'median_rank', 'mean_rank', 'num_queries', 'chance_R@1'}.

    Queries with no matching gallery item (labels case) are left out; `num_queries` counts the rest.
    median_rank is the usual median (mean of the two middle ranks for an even count, as numpy).
    """
    ranks = retrieval_ranks(query, gallery, query_labels, gallery_labels, chunk_size, tie_tol)
    keep = torch.isfinite(ranks)
    ranks = ranks[keep]
    out: Dict[str, float] = {}
    if ranks.numel() == 0:
        out.update({f"R@{k}": float("nan") for k in ks})
        out.update(median_rank=float("nan"), mean_rank=float("nan"), num_queries=0, **{"chance_R@1": float("nan")})
        return out
    for k in ks:
        out[f"R@{k}"] = (ranks <= k).double().mean().item()
    srt = ranks.sort().values
    mid = (srt.numel() - 1) // 2
    out["median_rank"] = ((srt[mid] + srt[srt.numel() // 2]) / 2).item()
    out["mean_rank"] = ranks.mean().item()
    out["num_queries"] = int(ranks.numel())
    if query_labels is None:
        out["chance_R@1"] = 1.0 / gallery.shape[0]
    else:
        out["chance_R@1"] = chance_recall(query_labels[keep.to(query_labels.device)], gallery_labels, 1)
    return out


def chance_recall(query_labels: torch.Tensor, gallery_labels: torch.Tensor, k: int = 1) -> float:
    """Expected R@k of a uniformly random gallery order, exact:

        mean over queries q of  1 - C(Ng - n_q, k) / C(Ng, k),   n_q = #{g : label_g == label_q}

    which for k = 1 is mean_q n_q / Ng. Queries with n_q = 0 are left out (as in retrieval_metrics).
    """
    g = gallery_labels.reshape(-1).cpu()
    ng = g.numel()
    vals, counts = torch.unique(g, return_counts=True)
    count_of = dict(zip(vals.tolist(), counts.tolist()))
    n = [count_of.get(v, 0) for v in query_labels.reshape(-1).cpu().tolist()]
    n = [c for c in n if c > 0]
    if not n or ng == 0:
        return float("nan")
    kk = min(k, ng)
    miss = [math.comb(ng - c, kk) / math.comb(ng, kk) for c in n]  # P(no match among the first k)
    return float(sum(1.0 - m for m in miss) / len(miss))


def gather_features(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` (N_r, ...) from all ranks in rank order; N_r may differ per rank.

    Identity when torch.distributed is not initialised or world size is 1. Rows are padded to the
    largest N_r for the collective and trimmed after. bool tensors travel as uint8 (gloo-safe).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    is_bool = t.dtype == torch.bool
    x = (t.to(torch.uint8) if is_bool else t).contiguous()
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes_l = [int(s.item()) for s in sizes]
    n_max = max(sizes_l)
    if n_max > x.shape[0]:
        pad = torch.zeros((n_max - x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        x = torch.cat([x, pad], dim=0)
    parts = [torch.empty_like(x) for _ in sizes_l]
    dist.all_gather(parts, x)
    out = torch.cat([p[:s] for p, s in zip(parts, sizes_l)], dim=0)
    return out.bool() if is_bool else out


def _pair_order(names: Iterable[str]) -> list:
    names, order = list(names), M.names()  # registry order first
    return [m for m in order if m in names] + sorted(m for m in names if m not in order)


def retrieval_report(embeddings: Mapping[str, torch.Tensor], masks: Optional[Mapping[str, torch.Tensor]] = None,
                     labels: Optional[torch.Tensor] = None, ks: Sequence[int] = (1, 5, 10),
                     chunk_size: int = 1024) -> Dict[str, float]:
    """Retrieval in every direction between the modalities in `embeddings` (rows aligned by sample).

    masks[m] (N,) bool marks samples that have modality m (missing key: all present); each pair
    uses only samples having both. With labels, a hit is any gallery item of the query's class;
    without, only the paired sample. Keys: 'image_to_text/R@1', ..., '<pair>/num_queries',
    '<pair>/chance' (expected R@1 at random for that pair's subset) and 'chance' (the same over
    all labelled samples: mean_q n_q / N; 1/N without labels).
    """
    masks = dict(masks or {})
    names = _pair_order(embeddings)
    n_total = None
    for m in names:
        n = embeddings[m].shape[0]
        if n_total is not None and n != n_total:
            raise ValueError(f"embeddings must share the sample axis: {m} has {n} rows, expected {n_total}")
        n_total = n
    out: Dict[str, float] = {}
    for a in names:
        for b in names:
            if a == b:
                continue
            ea, eb = embeddings[a], embeddings[b]
            both = torch.ones(ea.shape[0], dtype=torch.bool, device=ea.device)
            for m in (a, b):
                if m in masks and masks[m] is not None:
                    both &= masks[m].to(ea.device).bool()
            if not bool(both.any()):
                continue
            lab = labels.to(ea.device)[both] if labels is not None else None
            res = retrieval_metrics(ea[both], eb.to(ea.device)[both], lab, lab, ks, chunk_size)
            pre = f"{a}_to_{b}"
            for k, v in res.items():
                out[f"{pre}/{'chance' if k == 'chance_R@1' else k}"] = v
    if n_total:
        out["chance"] = chance_recall(labels, labels, 1) if labels is not None else 1.0 / n_total
    return out
