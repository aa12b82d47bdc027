"""Chunked linear + cross-entropy: mean CE of (hidden @ weight.T) without materialising the
full (M, V) vocabulary logits; chunks of `chunk` tokens are recomputed in the backward."""
from __future__ import annotations

import torch


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, ignore_index: int):  # type: ignore[override]
        valid = targets != ignore_index
        count = valid.sum().clamp(min=1).to(torch.float32)
        safe_t = torch.where(valid, targets, torch.zeros_like(targets))
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for c0 in range(0, hidden.shape[0], chunk):
            logits = (hidden[c0 : c0 + chunk] @ weight.t()).float()
            lse[c0 : c0 + chunk] = torch.logsumexp(logits, dim=1)
            tgt = logits.gather(1, safe_t[c0 : c0 + chunk, None]).squeeze(1)
            total += torch.where(valid[c0 : c0 + chunk], lse[c0 : c0 + chunk] - tgt, 0.0).sum()
            del logits
        ctx.save_for_backward(hidden, weight, safe_t, valid, lse, count)
        ctx.chunk = chunk
        return (total / count).to(hidden.dtype)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        hidden, weight, safe_t, valid, lse, count = ctx.saved_tensors
        coef = g.float() / count
        dh = torch.empty_like(hidden)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for c0 in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[c0 : c0 + ctx.chunk]
            # d CE / d logits = softmax - onehot, for kept tokens only, times g / count
            p = (h @ weight.t()).float().sub_(lse[c0 : c0 + ctx.chunk, None]).exp_()
            p.scatter_add_(1, safe_t[c0 : c0 + ctx.chunk, None], torch.full_like(p[:, :1], -1.0))
            p.mul_((valid[c0 : c0 + ctx.chunk].float() * coef)[:, None])
            dh[c0 : c0 + ctx.chunk] = (p.to(weight.dtype) @ weight).to(hidden.dtype)
            dw.addmm_(p.t(), h.float())
            del p
        return dh, dw.to(weight.dtype), None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024, ignore_index: int = -100
) -> torch.Tensor:
    """Mean over non-ignored tokens of CE(hidden @ weight.T, targets); hidden (M, D), weight (V, D),
    targets (M,) long. Equals F.cross_entropy(hidden @ weight.T, targets, ignore_index=...) except
    that all-ignored targets give 0 rather than NaN. Peak extra memory O(chunk * V)."""
    return _ChunkedLinearCE.apply(hidden, weight, targets, int(chunk), int(ignore_index))
