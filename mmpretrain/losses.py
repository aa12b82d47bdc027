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

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from mmpretrain import distributed as D
from mmpretrain import modalities as M
from mmpretrain.config import Config
from mmpretrain.models.model import CaptionOutput
from mmpretrain.ops.contrastive import contrastive_rows, contrastive_rows_same_label

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
    """Callable: embeddings + logit scales / biases + presence masks -> (loss for backward,
    detached metrics). A pure function of tensors (the model's forward made them)."""

    def __init__(self, cfg: Config) -> None:
        self.kind = cfg.loss.kind
        self.impl = cfg.loss.impl
        self.pairs = {p.name: p for p in M.active_pairs(cfg)}  # between the towers the model has
        self.weights = M.pair_weights(cfg)
        self.min_valid = cfg.loss.min_valid_pairs
        self.same_label = getattr(cfg.loss, "same_label", "negative")  # loss.same_label

    def __call__(
        self, embeddings: Dict[str, torch.Tensor], scales: Dict[str, torch.Tensor], biases: Dict[str, torch.Tensor],
        masks: Dict[str, torch.Tensor], labels: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """labels (n,) long, -1 = none: read when loss.same_label is not 'negative'."""
        world, rank = D.world_size(), D.rank()
        # sorted: set order differs between processes (hash seed) and the gathers must line up
        needed = sorted({m for p, w in self.weights.items() if w > 0 for m in (self.pairs[p].a, self.pairs[p].b)})
        local = {m: embeddings[m].float() for m in needed}
        glob = {m: D.all_gather_with_grad(local[m]) for m in needed}
        # one collective for all presence masks: (world*n, number of modalities)
        order = list(masks)
        mask_stack = torch.stack([masks[m] for m in order], 1).to(torch.uint8)
        gmask = D.all_gather_nograd(mask_stack).bool()
        gmasks = {m: gmask[:, i] for i, m in enumerate(order)}
        n = mask_stack.shape[0]
        offset = rank * n
        same = None
        if self.same_label != "negative":  # (n, N): column j holds a sample of row i's class
            if labels is None:
                raise ValueError(f"loss.same_label={self.same_label!r} needs the batch's labels")
            glabels = D.all_gather_nograd(labels.to(mask_stack.device))
            same = (labels[:, None].to(glabels.device) == glabels[None, :]) & (labels[:, None] >= 0).to(glabels.device)
        total = torch.zeros((), device=mask_stack.device)
        sums, counts = {}, {}
        for pair, w in self.weights.items():
            if w <= 0:
                continue
            a, b = self.pairs[pair].a, self.pairs[pair].b
            col_valid = gmasks[a] & gmasks[b]  # (N,)
            n_valid = col_valid.sum()
            row_valid = col_valid[offset : offset + n]
            targets = torch.where(
                row_valid, torch.arange(offset, offset + n, device=row_valid.device), torch.full_like(row_valid, -1, dtype=torch.long)
            )
            scale = scales[pair]
            if same is not None:
                rows = contrastive_rows_same_label(local[a], glob[b], scale, targets, col_valid, same, self.same_label)
                rows = rows + contrastive_rows_same_label(local[b], glob[a], scale, targets, col_valid, same,
                                                          self.same_label)
                local_sum = rows.sum() / 2
            elif self.kind == "infonce":
                rows = contrastive_rows(local[a], glob[b], scale, targets, col_valid, impl=self.impl)
                rows = rows + contrastive_rows(local[b], glob[a], scale, targets, col_valid, impl=self.impl)
                local_sum = rows.sum() / 2
            else:
                local_sum = _siglip_rows(local[a], glob[b], scale, biases[pair], targets, col_valid).sum()
            # too few pairs: contribute 0 * loss so the graph (and ZeRO's hooks) still see every tensor
            enough = (n_valid >= self.min_valid).to(local_sum.dtype)
            pair_loss = enough * local_sum * world / n_valid.clamp(min=1)
            total = total + w * pair_loss
            sums[pair], counts[pair] = (enough * local_sum).detach(), n_valid.detach()
        # logit_bias is only used by SigLIP; tie it in so every parameter gets a gradient
        total = total + 0.0 * sum(biases[p] for p in self.pairs)
        metrics = self._global_metrics(sums, counts)
        metrics["loss/contrastive"] = sum(self.weights[k[5:]] * v for k, v in metrics.items() if k.startswith("loss/"))
        # read here, not from the parameter: under ZeRO-3 it is only materialised inside forward
        for p in self.pairs:
            metrics[f"temperature/{p}"] = (1.0 / scales[p].detach().float()).reshape(())
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


# ----------------------------------------------------------------------------- captioning


def caption_token_count(batch: M.Batch) -> torch.Tensor:
    """Number of predicted (target) tokens in this batch: over captioned modalities present with a
    caption besides BOS, sum of (length - 1)."""
    total = torch.zeros((), dtype=torch.long)
    for m in M.captioned():
        lens = batch.caption_len[m]
        valid = batch.masks[m].bool() & (lens > 1)
        total = total + torch.where(valid, lens - 1, torch.zeros_like(lens)).sum().cpu()
    return total


def caption_loss(cap: CaptionOutput, denominator: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Next-token cross-entropy of the multimodal decoder (CoCa) over the model's caption rows
    (models.model.CaptionOutput): padding and rows with an absent modality or caption are ignored.
    Returns world * local_sum / denominator, denominator = the global target-token count of this
    micro-batch by default (so DeepSpeed's rank averaging gives the global token mean); the
    feature cache passes the count over all accumulated micro-batches / grad_accum instead."""
    logits, toks, lens, valid = cap.logits, cap.tokens, cap.lengths, cap.valid
    pos = torch.arange(toks.shape[1] - 1, device=toks.device)
    tgt_ok = valid[:, None] & (pos[None, :] < (lens - 1)[:, None])  # (C B, L-1)
    targets = torch.where(tgt_ok, toks[:, 1:], torch.full_like(toks[:, 1:], -100))
    # half logits are scored in fp32; float64 ones (reference tests) keep their precision
    acc = torch.promote_types(logits.dtype, torch.float32)
    nll = F.cross_entropy(logits.to(acc).flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
    nll = nll.view(targets.shape)
    local_sum = nll.sum()
    c = len(cap.modalities)
    with torch.no_grad():
        correct = ((logits.argmax(-1) == toks[:, 1:]) & tgt_ok).sum()
        # per modality: each row's sums added to its owner's slot
        sums = torch.zeros(c, device=nll.device).index_add_(0, cap.owner, nll.detach().float().sum(1))
        counts = torch.zeros(c, device=nll.device).index_add_(0, cap.owner, tgt_ok.sum(1).float())
        per_mod = torch.cat([sums, counts, correct.float()[None]])
        per_mod = D.all_reduce_sum(per_mod.float())
    count = per_mod[c: 2 * c].sum()
    denom = (count if denominator is None else denominator.to(local_sum.device).float()).to(acc)
    loss = local_sum * D.world_size() / denom.clamp(min=1)
    metrics = {"loss/caption": per_mod[:c].sum() / count.clamp(min=1)}
    for k, m in enumerate(cap.modalities):
        metrics[f"loss/caption_{m}"] = per_mod[k] / per_mod[c + k].clamp(min=1)
    metrics["caption/token_acc"] = per_mod[2 * c] / count.clamp(min=1)
    metrics["caption/tokens"] = count
    return loss, metrics
