"""Image encoder: ViT with a class token; returns the pooled vector and the patch tokens."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn

from mmpretrain.config import TowerConfig
from mmpretrain.models.transformer import Encoder, class_token_index


def conv_stem(width: int, patch_size: int) -> nn.Sequential:
    """Stacked 3x3 stride-2 convs down to the patch grid, then a 1x1 to the width
    ("Early convolutions help transformers see better", Xiao et al. 2021): small ViTs
    trained from scratch learn shape far faster than with one linear patchify."""
    layers, ch = [], 3
    for i in range(int(math.log2(patch_size))):
        out = max(width // 2 ** (int(math.log2(patch_size)) - 1 - i), 16)
        layers += [nn.Conv2d(ch, out, 3, stride=2, padding=1), nn.GroupNorm(1, out), nn.GELU()]
        ch = out
    layers.append(nn.Conv2d(ch, width, 1))
    return nn.Sequential(*layers)


class VisionTransformer(nn.Module):
    supports_pooled_only = True  # forward(..., pooled_only=True): the class token alone, tokens None

    def __init__(self, cfg: TowerConfig, image_size: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.width = cfg.width
        if getattr(cfg, "stem", "patch") == "conv":
            self.patch = conv_stem(cfg.width, cfg.patch_size)
        else:
            self.patch = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        n = (image_size // cfg.patch_size) ** 2
        scale = cfg.width ** -0.5  # CLIP's class and position embeddings
        self.cls = nn.Parameter(torch.randn(1, 1, cfg.width) * scale)
        self.pos = nn.Parameter(torch.randn(1, n + 1, cfg.width) * scale)
        self.ln_pre = nn.LayerNorm(cfg.width)
        self.encoder = Encoder(cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio, dropout,
                               drop_path=getattr(cfg, "drop_path", 0.0))  # model.<tower>.drop_path
        self.ln_post = nn.LayerNorm(cfg.width)

    def forward(self, images: torch.Tensor, pooled_only: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """pooled (B, W), tokens (B, N, W); pooled_only: the last block computes only the class token
        (tokens None)."""
        x = self.patch(images).flatten(2).transpose(1, 2)  # (B, N, W)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        idx = class_token_index(x) if pooled_only else None
        x = self.ln_post(self.encoder(self.ln_pre(x), pool_index=idx))
        return (x[:, 0], None) if idx is not None else (x[:, 0], x[:, 1:])

