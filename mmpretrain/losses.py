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
        # read here, not from the parameter: under ZeRO-3 it is only materialised inside forward
        for p in PAIR_MODALITIES:
            metrics[f"temperature/{p}"] = (1.0 / out[f"scale/{p}"].detach().float()).reshape(())
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


# ----------------------------------------------------------------------------- captioning

CAPTION_MODALITIES = ("image", "audio")


def caption_targets(batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack per-modality captions: rows [0, B) caption the image, [B, 2B) the audio.

    -> tokens (2B, L), lengths (2B,), valid (2B,) bool: the modality is present and its caption
    (json `caption_<m>`, else `caption`) has at least one token besides BOS."""
    toks = torch.cat([batch[f"caption_{m}"] for m in CAPTION_MODALITIES], 0)
    lens = torch.cat([batch[f"caption_{m}_len"] for m in CAPTION_MODALITIES], 0)
    present = torch.cat([batch[f"{m}_mask"].bool() for m in CAPTION_MODALITIES], 0)
    return toks, lens, present & (lens > 1)


def caption_token_count(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Number of predicted (target) tokens in this batch: sum over valid rows of (length - 1)."""
    _, lens, valid = caption_targets(batch)
    return torch.where(valid, lens - 1, torch.zeros_like(lens)).sum()


def caption_loss(
    model: torch.nn.Module, out: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor],
    denominator: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Next-token cross-entropy of the multimodal decoder (CoCa), per-modality captions.

    Each sample gives up to two rows: its image caption decoded from image tokens only, and
    its audio caption from audio tokens only (the other modality is masked out of the
    cross-attention). Padding and rows with an absent modality or caption are ignored. Returns
    world * local_sum / denominator, denominator = the global target-token count of this
    micro-batch by default (so DeepSpeed's rank averaging gives the global token mean); the
    feature cache passes the count over all accumulated micro-batches / grad_accum instead.
    """
    dec = model.decoder
    toks, lens, valid = caption_targets(batch)  # (2B, L)
    b = batch["image_mask"].shape[0]
    _, states = model.text(toks, lens)  # unimodal causal layers, (2B, L, W)
    ctx, ctx_mask = _stacked_context(dec, out, b)
    logits = dec(states[:, :-1], ctx, ctx_mask)  # (2B, L-1, V)
    pos = torch.arange(toks.shape[1] - 1, device=toks.device)
    tgt_ok = valid[:, None] & (pos[None, :] < (lens - 1)[:, None])  # (2B, L-1)
    targets = torch.where(tgt_ok, toks[:, 1:], torch.full_like(toks[:, 1:], -100))
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
    nll = nll.view(targets.shape)
    local_sum = nll.sum()
    with torch.no_grad():
        correct = ((logits.argmax(-1) == toks[:, 1:]) & tgt_ok).sum()
        per_mod = torch.stack([nll[:b].sum(), nll[b:].sum(), tgt_ok[:b].sum(), tgt_ok[b:].sum(), correct]).float()
        per_mod = D.all_reduce_sum(per_mod.detach())
    count = per_mod[2] + per_mod[3]
    denom = count if denominator is None else denominator.to(local_sum.device).float()
    loss = local_sum * D.world_size() / denom.clamp(min=1)
    metrics = {
        "loss/caption": (D.all_reduce_sum(local_sum.detach().float()) / count.clamp(min=1)),
        "loss/caption_image": per_mod[0] / per_mod[2].clamp(min=1),
        "loss/caption_audio": per_mod[1] / per_mod[3].clamp(min=1),
        "caption/token_acc": per_mod[4] / count.clamp(min=1),
        "caption/tokens": count,
    }
    return loss, metrics


def _stacked_context(dec: torch.nn.Module, out: Dict[str, torch.Tensor], b: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Memory for the 2B caption rows from B samples' tokens: pool each modality once; rows
    [0, B) attend only to the image part, rows [B, 2B) only to the audio part."""
    ci, _ = dec.context({"image": out["image_tokens"]}, {})  # (B, Qi, W)
    ca, _ = dec.context({"audio": out["audio_tokens"]}, {})  # (B, Qa, W)
    ctx = torch.cat([ci, ca], 1).repeat(2, 1, 1)  # (2B, Qi+Qa, W)
    col_is_image = torch.arange(ctx.shape[1], device=ctx.device) < ci.shape[1]
    row_is_image = torch.arange(2 * b, device=ctx.device) < b
    return ctx, col_is_image[None, :] == row_is_image[:, None]
