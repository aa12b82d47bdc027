"""CoCa-style multimodal text decoder: attentional poolers summarise the tokens of each
captioned modality, modality embeddings tag them, and causal layers over the unimodal text
states cross-attend to whichever modalities are present and predict the next caption token."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from mmpretrain import modalities as M
from mmpretrain.config import Config
from mmpretrain.models.transformer import DecodeCache, Encoder, init_fan_in, init_weights
from mmpretrain.models.zero3 import gathered
from mmpretrain.ops.attention import attention


class AttentionalPooler(nn.Module):
    """`n_queries` learned queries cross-attend to a token sequence (CoCa's attentional pooler).

    tokens (B, N, C) [+ key mask (B, N), True = keep] -> (B, n_queries, W). With n_queries == 0
    the tokens are only projected to W (the decoder then attends to every token)."""

    def __init__(self, ctx_width: int, width: int, heads: int, n_queries: int) -> None:
        super().__init__()
        self.heads, self.n_queries = heads, n_queries
        self.attention_backend = "auto"
        self.ln_k = nn.LayerNorm(ctx_width)
        if n_queries > 0:
            self.queries = nn.Parameter(torch.randn(n_queries, width) * 0.02)
            self.ln_q = nn.LayerNorm(width)
            self.q = nn.Linear(width, width)
            self.kv = nn.Linear(ctx_width, 2 * width)
            self.out = nn.Linear(width, width)
        else:
            self.proj = nn.Linear(ctx_width, width)
        self.ln_out = nn.LayerNorm(width)

    def init_attention(self) -> None:
        """CLIP's attention scales (models.transformer.init_weights) for the pooler's maps, so its
        queries start out attending to some tokens more than others, not to all alike."""
        if self.n_queries == 0:
            return
        for lin in (self.q, self.kv, self.out):
            init_fan_in(lin)

    def forward(self, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.ln_k(tokens)
        if self.n_queries == 0:
            return self.ln_out(self.proj(x))
        b = tokens.shape[0]
        q = self.q(self.ln_q(self.queries)).expand(b, -1, -1)  # (B, Q, W)
        k, v = self.kv(x).chunk(2, dim=-1)  # (B, N, W) each

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)

        o = attention(split(q), split(k), split(v), key_padding_mask=mask, backend=self.attention_backend)  # (B, H, Q, Dh)
        o = o.transpose(1, 2).reshape(b, self.n_queries, -1)
        return self.ln_out(self.out(o))


class MultimodalDecoder(nn.Module):
    """Poolers + modality embeddings + `decoder_depth` causal blocks with cross-attention + LM head.

    `context()` builds the cross-attention memory from the present modalities; `forward()`
    maps unimodal text states (B, L, W) to next-token logits (B, L, V)."""

    def __init__(self, cfg: Config, vocab_size: int, context_widths: Dict[str, int]) -> None:
        """context_widths: captioned modality -> its tower's token width (in context order)."""
        super().__init__()
        m = cfg.model
        t = m.text
        width = t.width
        self.width = width
        self.modalities = list(context_widths)
        self.poolers = nn.ModuleDict({
            k: AttentionalPooler(w, width, t.heads, t.decoder_queries) for k, w in context_widths.items()})
        self.modality_embed = nn.ParameterDict({k: nn.Parameter(torch.zeros(1, 1, width)) for k in self.modalities})
        # the text section's dropout (model.text.dropout, else model.dropout); no stochastic depth here
        self.encoder = Encoder(width, t.decoder_depth, t.heads, t.mlp_ratio, M.tower_dropout(cfg, M.TEXT), cross=True)
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        init_weights(self)
        with gathered(list(self.modality_embed.parameters())):  # a built submodule: partitioned under zero.Init
            for k in self.modalities:
                nn.init.normal_(self.modality_embed[k], std=0.02)
        for pooler in self.poolers.values():
            pooler.init_attention()

    def context(
        self,
        tokens: Dict[str, Optional[torch.Tensor]],
        keep: Dict[str, Optional[torch.Tensor]],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention memory of the given modalities.

        tokens[m]: (B, N_m, C_m) encoder tokens or None (modality not computed); keep[m]: (B,)
        bool, which rows may attend to modality m (None = all). Returns (ctx (B, T, W),
        ctx_mask (B, T) bool); a row whose modalities are all masked attends to nothing."""
        parts, masks = [], []
        for m in self.modalities:
            tok = tokens.get(m)
            if tok is None:
                continue
            pooled = self.poolers[m](tok) + self.modality_embed[m].to(tok.dtype)  # (B, Q, W)
            k = keep.get(m)
            k = torch.ones(tok.shape[0], dtype=torch.bool, device=tok.device) if k is None else k.bool()
            parts.append(pooled)
            masks.append(k[:, None].expand(-1, pooled.shape[1]))
        if not parts:
            raise ValueError(f"the decoder needs tokens of at least one of {self.modalities}")
        return torch.cat(parts, 1), torch.cat(masks, 1)

    def new_cache(self) -> DecodeCache:
        return DecodeCache(len(self.encoder.blocks))

    def forward(self, text_states: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor,
                cache: Optional[DecodeCache] = None) -> torch.Tensor:
        """`cache`: incremental decoding; the context's keys / values are computed on the first call."""
        x = self.encoder(text_states, causal=True, context=ctx.to(text_states.dtype), context_mask=ctx_mask,
                         cache=cache)
        return self.head(self.ln_f(x))  # (B, L, V)

    def stacked_context(self, tokens: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Memory for C x B caption rows from B samples' tokens of the C captioned modalities:
        pool each modality once; rows [k B, (k+1) B) attend only to modality k's part."""
        parts = [self.context({m: tokens[m]}, {})[0] for m in self.modalities]  # (B, Q_k, W) each
        b = parts[0].shape[0]
        ctx = torch.cat(parts, 1).repeat(len(parts), 1, 1)  # (C B, sum Q, W)
        col_owner = torch.cat([torch.full((p.shape[1],), k, device=ctx.device) for k, p in enumerate(parts)])
        row_owner = torch.arange(len(parts), device=ctx.device).repeat_interleave(b)
        return ctx, col_owner[None, :] == row_owner[:, None]
