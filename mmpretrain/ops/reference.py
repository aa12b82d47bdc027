"""Plain-math reference implementations (no fused kernels), used by the 'reference' attention
backend and as ground truth in tests (call them with float64 inputs)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def attention_mask(
    tq: int, tk: int, causal: bool, key_padding_mask: Optional[torch.Tensor], device: torch.device
) -> Optional[torch.Tensor]:
    """Bool keep-mask broadcastable to (B, H, Tq, Tk); causal is top-left aligned (key j <= query i)."""
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask.bool()[:, None, None, :]
    if causal:
        tri = torch.ones(tq, tk, dtype=torch.bool, device=device).tril()
        mask = tri if mask is None else mask & tri
    return mask


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(QK^T / sqrt(d)) V in at least fp32; rows with no kept key give 0."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    s = (qf @ kf.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    mask = attention_mask(q.shape[-2], k.shape[-2], causal, key_padding_mask, q.device)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
        any_kept = mask.any(-1, keepdim=True)
        s = torch.where(any_kept, s, torch.zeros_like(s))  # finite row -> no NaN; zeroed below
    p = torch.softmax(s, dim=-1)
    if mask is not None:
        p = torch.where(any_kept, p, torch.zeros_like(p))
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    return (p @ vf).to(q.dtype)
