"""Text tower: causal transformer over tokens; the embedding is the EOS token's state
(CLIP practice). Returns the pooled vector and every token's state for the decoder."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from mmpretrain.config import TextTowerConfig
from mmpretrain.models.transformer import DecodeCache, Encoder


class TextTransformer(nn.Module):
    supports_pooled_only = True  # forward(..., pooled_only=True): the EOS state alone, states None

    def __init__(self, cfg: TextTowerConfig, vocab_size: int, context_len: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.width, self.context_len = cfg.width, context_len
        self.tok = nn.Embedding(vocab_size, cfg.width)
        self.pos = nn.Parameter(torch.randn(1, context_len, cfg.width) * 0.01)
        self.encoder = Encoder(cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio, dropout,
                               drop_path=getattr(cfg, "drop_path", 0.0))  # model.<tower>.drop_path
        self.ln_post = nn.LayerNorm(cfg.width)

    def new_cache(self) -> DecodeCache:
        return DecodeCache(len(self.encoder.blocks))

    def forward(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                cache: Optional[DecodeCache] = None, pooled_only: bool = False
                ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """tokens (B, L); lengths (B,) count BOS..EOS, 0 for absent text (None: no pooled output).
        With `cache`, tokens continue the cached prefix (positions from cache.offset on).
        pooled_only (with lengths, no cache): the last block computes the EOS state alone; states None."""
        start = cache.offset if cache is not None else 0
        if start + tokens.shape[1] > self.context_len:
            raise ValueError(f"text longer than the context ({self.context_len} tokens)")
        x = self.tok(tokens) + self.pos[:, start: start + tokens.shape[1]]
        if pooled_only and lengths is not None and cache is None:
            x = self.ln_post(self.encoder(x, causal=True, pool_index=(lengths - 1).clamp(min=0)))
            return x[:, 0], None
        x = self.ln_post(self.encoder(x, causal=True, cache=cache))  # causal: padding after EOS is never seen
        if cache is not None:
            cache.offset = start + tokens.shape[1]
        if lengths is None:
            return None, x
        eos = (lengths - 1).clamp(min=0)
        pooled = x[torch.arange(x.shape[0], device=x.device), eos]
        return pooled, x
