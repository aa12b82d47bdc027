"""Text tower: causal transformer over tokens; the embedding is the EOS token's state
(CLIP practice). Returns the pooled vector and every token's state for the decoder."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn

from mmpretrain.config import TextTowerConfig
from mmpretrain.models.transformer import Encoder


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextTowerConfig, vocab_size: int, context_len: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, cfg.width)
        self.pos = nn.Parameter(torch.randn(1, context_len, cfg.width) * 0.01)
        self.encoder = Encoder(cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio, dropout)
        self.ln_post = nn.LayerNorm(cfg.width)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # tokens (B, L); lengths (B,) count BOS..EOS, 0 for absent text
        x = self.tok(tokens) + self.pos[:, : tokens.shape[1]]
        x = self.ln_post(self.encoder(x, causal=True))  # causal: padding after EOS is never seen
        eos = (lengths - 1).clamp(min=0)
        pooled = x[torch.arange(x.shape[0], device=x.device), eos]
        return pooled, x
