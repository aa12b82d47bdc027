"""Objectives: pairwise contrastive (InfoNCE or SigLIP) with global negatives and
modality masks, and the weighting of the terms.

Distributed scheme ("local loss"): features are all-gathered with gradient; each rank
scores its local rows against all global columns. A pair only uses samples holding both
modalities: other rows are dropped and other columns masked to -inf, so a missing
modality never becomes a negative. Each rank returns world * (local sum) / (global valid
count); DeepSpeed averages gradients over ranks, so the step equals a single process on
the concatenated batch.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from mmpretrain import distributed as D
from mmpretrain.config import Config
from mmpretrain.ops.contrastive import contrastive_rows

PAIR_MODALITIES = {"image_text": ("image", "text"), "audio_text": ("audio", "text"), "image_audio": ("image", "audio")}


def _siglip_rows(
    q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor, col_valid: torch.Tensor
) -> torch.Tensor:
    """Per-row SigLIP loss: -sum_j log sigmoid(z_ij * (scale q_i.k_j + bias)), z = +1 on the partner."""
    logits = scale * (q @ k.t()) + bias  # (n, N)
    z = -torch.ones_like(logits)
    rows = torch.arange(q.shape[0], device=q.device)
    valid = targets >= 0
    z[rows[valid], targets[valid]] = 1.0
    nll = -F.logsigmoid(z * logits) * col_valid[None, :].to(logits.dtype)
    return torch.where(valid, nll.sum(1), torch.zeros_like(nll[:, 0]))


class ContrastiveLoss:
    """Callable: model outputs + batch masks -> (loss for backward, detached metrics)."""

    def __init__(self, cfg: Config) -> None:
        self.kind = cfg.loss.kind
        self.impl = cfg.loss.impl
        self.weights = {p: getattr(cfg.loss.pairs, p) for p in PAIR_MODALITIES}
        self.min_valid = cfg.loss.min_valid_pairs

    def __call__(
        self, out: Dict[str, torch.Tensor], masks: Dict[str, torch.Tensor]
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        world, rank = D.world_size(), D.rank()
        # sorted: set order differs between processes (hash seed) and the gathers must line up
        needed = sorted({m for p, w in self.weights.items() if w > 0 for m in PAIR_MODALITIES[p]})
        local = {m: out[m].float() for m in needed}
        glob = {m: D.all_gather_with_grad(local[m]) for m in needed}
        # one collective for all presence masks: (world*n, 3)
        mask_stack = torch.stack([masks["image"], masks["audio"], masks["text"]], 1).to(torch.uint8)
        gmask = D.all_gather_nograd(mask_stack).bool()
        gmasks = {"image": gmask[:, 0], "audio": gmask[:, 1], "text": gmask[:, 2]}
        n = mask_stack.shape[0]
        offset = rank * n
        total = torch.zeros((), device=mask_stack.device)
        sums, counts = {}, {}
        for pair, w in self.weights.items():
            if w <= 0:
                continue
            a, b = PAIR_MODALITIES[pair]
            col_valid = gmasks[a] & gmasks[b]  # (N,)
            n_valid = col_valid.sum()
            row_valid = col_valid[offset : offset + n]
            targets = torch.where(
                row_valid, torch.arange(offset, offset + n, device=row_valid.device), torch.full_like(row_valid, -1, dtype=torch.long)
            )
            scale = out[f"scale/{pair}"]
            if self.kind == "infonce":
                rows = contrastive_rows(local[a], glob[b], scale, targets, col_valid, impl=self.impl)
                rows = rows + contrastive_rows(local[b], glob[a], scale, targets, col_valid, impl=self.impl)
                local_sum = rows.sum() / 2
            else:
                bias = out[f"bias/{pair}"]
                local_sum = _siglip_rows(local[a], glob[b], scale, bias, targets, col_valid).sum()
            # too few pairs: contribute 0 * loss so the graph (and ZeRO's hooks) still see every tensor
            enough = (n_valid >= self.min_valid).to(local_sum.dtype)
            pair_loss = enough * local_sum * world / n_valid.clamp(min=1)
            total = total + w * pair_loss
            sums[pair], counts[pair] = (enough * local_sum).detach(), n_valid.detach()
        # logit_bias is only used by SigLIP; tie it in so every parameter gets a gradient
        total = total + 0.0 * sum(out[f"bias/{p}"] for p in PAIR_MODALITIES)
        metrics = self._global_metrics(sums, counts)
        metrics["loss/contrastive"] = sum(self.weights[k[5:]] * v for k, v in metrics.items() if k.startswith("loss/"))
        return total, metrics

    @staticmethod
    def _global_metrics(sums: Dict[str, torch.Tensor], counts: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        if not sums:
            return {}
        keys = list(sums)
        summed = D.all_reduce_sum(torch.stack([sums[k] for k in keys]).float())
        return {f"loss/{k}": summed[i] / counts[k].clamp(min=1) for i, k in enumerate(keys)} | {
            f"pairs/{k}": counts[k].float() for k in keys
        }


def weighted_total(contrastive: torch.Tensor, caption: torch.Tensor, cfg: Config) -> torch.Tensor:
    return cfg.loss.contrastive_weight * contrastive + cfg.loss.caption_weight * caption
