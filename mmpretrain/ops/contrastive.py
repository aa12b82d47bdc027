"""Per-row contrastive cross-entropy of local queries against global keys.

`contrastive_rows(q, k, logit_scale, targets, col_valid)` returns, for each local row i,
    CE(logit_scale * q_i @ k.T  with invalid columns at -inf,  target = targets[i])
and 0 where targets[i] < 0 (the row has no partner).  q (n, D), k (N, D), targets (n,)
long index into k's rows or -1, col_valid (N,) bool.  The naive version builds the (n, N)
logits; the tiled versions (same signature) never do: they keep the row log-sum-exp and
recompute column tiles in the backward (Triton kernel on GPU, pure torch elsewhere).
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F

DEFAULT_TILE = 2048  # most columns per tile
# the largest temporary, an (n, tile) block, holds at most this many elements (16 MiB in fp32): with
# many local rows the tile narrows, so the loss's extra memory stays flat as the batch grows
TILE_ELEMENTS = 2048 * 2048
MIN_TILE = 128  # narrower tiles make the matmuls inefficient


def tile_columns(rows: int, cols: int, tile_size: Optional[int] = None) -> int:
    """Columns per tile for `rows` local queries against `cols` keys: `tile_size` when given, else
    DEFAULT_TILE narrowed so that rows x tile <= TILE_ELEMENTS (never below MIN_TILE)."""
    if tile_size:
        return int(tile_size)
    return max(1, min(cols, max(MIN_TILE, min(DEFAULT_TILE, TILE_ELEMENTS // max(1, rows)))))


def contrastive_rows_naive(
    q: torch.Tensor, k: torch.Tensor, logit_scale: torch.Tensor, targets: torch.Tensor, col_valid: torch.Tensor
) -> torch.Tensor:
    logits = logit_scale * (q @ k.t())  # (n, N)
    logits = logits.masked_fill(~col_valid[None, :], float("-inf"))
    valid_rows = targets >= 0
    safe_t = targets.clamp(min=0)
    # rows without a partner see one finite logit so CE stays finite; they are zeroed below
    logits = torch.where(valid_rows[:, None], logits, torch.zeros_like(logits))
    ce = F.cross_entropy(logits, safe_t, reduction="none")
    return torch.where(valid_rows, ce, torch.zeros_like(ce))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # half inputs accumulate in fp32


class _TiledContrastive(torch.autograd.Function):
    """Pure-torch tiled loss: forward keeps the row LSE; backward recomputes each tile."""

    @staticmethod
    def forward(ctx, q, k, scale, targets, col_valid, tile: int):  # type: ignore[override]
        cdt = _compute_dtype(q)
        qc, kc, sc = q.to(cdt), k.to(cdt), scale.to(cdt)
        lse = torch.full((q.shape[0],), float("-inf"), dtype=cdt, device=q.device)
        for c0 in range(0, k.shape[0], tile):
            s = (qc @ kc[c0 : c0 + tile].t()).mul_(sc)
            s.masked_fill_(~col_valid[None, c0 : c0 + tile], float("-inf"))
            lse = torch.logaddexp(lse, torch.logsumexp(s, dim=1))
            del s
        row_ok = targets >= 0
        t = targets.clamp(min=0)
        tgt = sc * (qc * kc[t]).sum(-1)
        tgt = torch.where(col_valid[t], tgt, torch.full_like(tgt, float("-inf")))
        loss = torch.where(row_ok, lse - tgt, torch.zeros_like(tgt))
        ctx.save_for_backward(q, k, scale, targets, col_valid, lse)
        ctx.tile = tile
        return loss.to(q.dtype)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        q, k, scale, targets, col_valid, lse = ctx.saved_tensors
        cdt = lse.dtype
        qc, kc, sc = q.to(cdt), k.to(cdt), scale.to(cdt)
        row_ok = targets >= 0
        t = targets.clamp(min=0)
        gw = torch.where(row_ok, g.to(cdt), torch.zeros((), dtype=cdt, device=g.device))
        lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[:, None]
        need_k = ctx.needs_input_grad[1]
        dq = torch.zeros_like(qc)
        dk = torch.zeros_like(kc) if need_k else None
        dscale = torch.zeros((), dtype=cdt, device=q.device)
        for c0 in range(0, k.shape[0], ctx.tile):
            kt = kc[c0 : c0 + ctx.tile]
            qk = qc @ kt.t()
            # P = softmax * g, built in place in one (n, tile) buffer
            p = qk.mul(sc).masked_fill_(~col_valid[None, c0 : c0 + ctx.tile], float("-inf"))
            p.sub_(lse_safe).exp_().mul_(gw[:, None])
            dq.addmm_(p, kt)
            if need_k:
                dk[c0 : c0 + ctx.tile] = p.t() @ qc
            dscale += p.reshape(-1) @ qk.reshape(-1)
            del qk, p
        # the one-hot (target) part of (softmax - onehot)
        k_t = kc[t]
        dq.sub_(gw[:, None] * k_t)
        if need_k:
            dk.index_add_(0, t, -gw[:, None] * qc)
            dk.mul_(sc)
        dscale -= (gw * (qc * k_t).sum(-1)).sum()
        dq.mul_(sc)
        dk = dk.to(k.dtype) if need_k else None
        return dq.to(q.dtype), dk, dscale.to(scale.dtype).reshape(scale.shape), None, None, None


def contrastive_rows_tiled(
    q: torch.Tensor,
    k: torch.Tensor,
    logit_scale: torch.Tensor,
    targets: torch.Tensor,
    col_valid: torch.Tensor,
    tile_size: Optional[int] = None,
) -> torch.Tensor:
    """Same result and gradients (q, k, logit_scale) as `contrastive_rows_naive`, extra memory
    O(n * tile) instead of O(n * N) (tile: `tile_columns`). Pure torch; runs on any device."""
    scale = torch.as_tensor(logit_scale, device=q.device)
    tile = tile_columns(q.shape[0], k.shape[0], tile_size)
    return _TiledContrastive.apply(q, k, scale, targets, col_valid.bool(), tile)


def _triton_ok(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and (
        importlib.util.find_spec("triton") is not None
    )


def contrastive_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    logit_scale: torch.Tensor,
    targets: torch.Tensor,
    col_valid: torch.Tensor,
    impl: str = "naive",
    tile_size: Optional[int] = None,
) -> torch.Tensor:
    """impl: 'naive' | 'tiled' (Triton on CUDA, torch tiles elsewhere) | 'torch_tiled' | 'triton'."""
    if impl == "naive":
        return contrastive_rows_naive(q, k, logit_scale, targets, col_valid)
    if impl == "tiled":
        impl = "triton" if _triton_ok(q) else "torch_tiled"
    if impl == "torch_tiled":
        return contrastive_rows_tiled(q, k, logit_scale, targets, col_valid, tile_size)
    if impl == "triton":
        from mmpretrain.ops.triton.contrastive import contrastive_rows_triton  # optional ([gpu] extra)

        return contrastive_rows_triton(q, k, logit_scale, targets, col_valid)
    raise ValueError(f"unknown contrastive impl {impl!r}")


def contrastive_rows_same_label(
    q: torch.Tensor, k: torch.Tensor, logit_scale: torch.Tensor, targets: torch.Tensor, col_valid: torch.Tensor,
    same: torch.Tensor, mode: str,
) -> torch.Tensor:
    """Per-row loss when other samples of a row's class are in the batch (`same` (n, N) bool: column j
    has row i's label; the partner column need not be set). mode 'ignore': they are neither positives
    nor negatives (false-negative elimination: CE over the partner and the other classes' columns);
    'positive': each is a positive, as in UniCL (Yang et al. 2022): -mean over positives of
    log softmax_ij. Rows with no partner give 0; with no same-label column both equal the plain loss."""
    logits = logit_scale * (q @ k.t())  # (n, N)
    logits = logits.masked_fill(~col_valid[None, :], float("-inf"))
    valid_rows = targets >= 0
    safe_t = targets.clamp(min=0)
    partner = torch.zeros_like(same)
    partner[torch.arange(q.shape[0], device=q.device), safe_t] = True
    others = same & ~partner & col_valid[None, :]
    logits = torch.where(valid_rows[:, None], logits, torch.zeros_like(logits))
    if mode == "ignore":
        logits = logits.masked_fill(others & valid_rows[:, None], float("-inf"))
        loss = F.cross_entropy(logits, safe_t, reduction="none")
    elif mode == "positive":
        pos = (partner | others) & valid_rows[:, None]
        lse = torch.logsumexp(logits, dim=1)
        mean_pos = torch.where(pos, logits, torch.zeros_like(logits)).sum(1) / pos.sum(1).clamp(min=1)
        loss = lse - mean_pos
    else:
        raise ValueError(f"unknown same-label mode {mode!r}; expected 'ignore' or 'positive'")
    return torch.where(valid_rows, loss, torch.zeros_like(loss))
