"""Pre-norm transformer blocks (self- and cross-attention) over ops.attention."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from mmpretrain.ops.attention import attention


class MultiheadAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float = 0.0, cross: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.cross = cross
        self.dropout = dropout
        if cross:
            self.q = nn.Linear(width, width)
            self.kv = nn.Linear(width, 2 * width)
        else:
            self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # (B, H, T, Dh)

    def forward(
        self,
        x: torch.Tensor,
        context: Optional[torch.Tensor] = None,
        causal: bool = False,
        key_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if self.cross:
            assert context is not None
            q = self._split(self.q(x))
            k, v = (self._split(t) for t in self.kv(context).chunk(2, dim=-1))
        else:
            q, k, v = (self._split(t) for t in self.qkv(x).chunk(3, dim=-1))
        o = attention(
            q, k, v, causal=causal, key_padding_mask=key_padding_mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        b, h, t, dh = o.shape
        return self.out(o.transpose(1, 2).reshape(b, t, h * dh))


class Block(nn.Module):
    """x + SelfAttn(LN(x)) [+ CrossAttn(LN(x), ctx)] + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, cross: bool = False):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = MultiheadAttention(width, heads, dropout)
        self.cross = None
        if cross:
            self.ln_c = nn.LayerNorm(width)
            self.cross = MultiheadAttention(width, heads, dropout, cross=True)
        self.ln2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(
        self,
        x: torch.Tensor,
        causal: bool = False,
        key_padding_mask: Optional[torch.Tensor] = None,
        context: Optional[torch.Tensor] = None,
        context_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), causal=causal, key_padding_mask=key_padding_mask)
        if self.cross is not None:
            x = x + self.cross(self.ln_c(x), context=context, key_padding_mask=context_mask)
        return x + self.mlp(self.ln2(x))


class Encoder(nn.Module):
    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float, dropout: float = 0.0, cross: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout, cross) for _ in range(depth))

    def forward(self, x: torch.Tensor, **kw) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x, **kw)
        return x


def init_weights(module: nn.Module) -> None:
    """Small normal init for linears/embeddings (ViT/CLIP practice); LayerNorm = identity."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
