"""Pre-norm transformer blocks (self- and cross-attention) over ops.attention, with an
optional key/value cache so incremental decoding runs the very same forward."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.utils.checkpoint

from mmpretrain.ops.attention import attention


class LayerCache:
    """One block's cached keys / values: self-attention grows by the tokens of each call,
    cross-attention is computed from the context once. Tensors are (N, H, T, Dh)."""

    __slots__ = ("self_kv", "cross_kv")

    def __init__(self) -> None:
        self.self_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.cross_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def select(self, index: torch.Tensor) -> None:
        """Keep rows `index` (beam search reorders and repeats rows)."""
        for slot in self.__slots__:
            kv = getattr(self, slot)
            if kv is not None:
                setattr(self, slot, (kv[0].index_select(0, index), kv[1].index_select(0, index)))


class DecodeCache:
    """Caches of a stack of blocks plus the number of positions already decoded."""

    def __init__(self, depth: int) -> None:
        self.layers: List[LayerCache] = [LayerCache() for _ in range(depth)]
        self.offset = 0

    def select(self, index: torch.Tensor) -> None:
        for c in self.layers:
            c.select(index)


class MultiheadAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float = 0.0, cross: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.cross = cross
        self.dropout = dropout
        self.attention_backend = "auto"  # MultimodalModel.set_attention_backend sets every module's
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
        cache: Optional[LayerCache] = None,
        query_index: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """query_index (B,) long: self-attention for one query per row, at that position -> (B, 1, W)."""
        if self.cross:
            q = self._split(self.q(x))
            if cache is not None and cache.cross_kv is not None:
                k, v = cache.cross_kv
            else:
                assert context is not None
                k, v = (self._split(t) for t in self.kv(context).chunk(2, dim=-1))
                if cache is not None:
                    cache.cross_kv = (k, v)
        elif query_index is not None:
            # only the rows at query_index ask (the pooled token); every row still gives keys / values.
            # qkv runs on all rows as one module call (ZeRO-3 gathers its weight in that call's hook)
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            q = self._split(q[torch.arange(x.shape[0], device=x.device), query_index][:, None])
            k, v = self._split(k), self._split(v)
            if causal:  # query at position p sees keys j <= p: a key mask, the query being alone
                keep = torch.arange(x.shape[1], device=x.device)[None, :] <= query_index[:, None]
                key_padding_mask = keep if key_padding_mask is None else keep & key_padding_mask.bool()
                causal = False
        else:
            q, k, v = (self._split(t) for t in self.qkv(x).chunk(3, dim=-1))
            if cache is not None:
                if cache.self_kv is not None:
                    if q.shape[2] != 1:
                        raise ValueError("a cached self-attention continues one token at a time")
                    k = torch.cat([cache.self_kv[0], k], 2)
                    v = torch.cat([cache.self_kv[1], v], 2)
                    causal = False  # one new query after every cached key: nothing to mask
                cache.self_kv = (k, v)
        o = attention(
            q, k, v, causal=causal, key_padding_mask=key_padding_mask,
            dropout_p=self.dropout if self.training else 0.0, backend=self.attention_backend,
        )
        b, h, t, dh = o.shape
        return self.out(o.transpose(1, 2).reshape(b, t, h * dh))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth on a residual branch (B, ...): in training each sample's branch is zeroed
    with probability p and the kept ones are scaled by 1 / (1 - p), so the expectation is x. p = 0 or
    eval: x itself, drawing no random numbers (the dropout streams stay as they were)."""
    if p <= 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


def drop_path_rates(rate: float, depth: int) -> List[float]:
    """Per-block drop rates rising linearly from 0 (first block) to `rate` (last), as in timm /
    EVA-CLIP (torch.linspace(0, rate, depth)): a one-block encoder drops nothing."""
    if depth <= 1:
        return [0.0] * depth
    return [rate * i / (depth - 1) for i in range(depth)]


class Block(nn.Module):
    """x + DropPath(SelfAttn(LN(x))) [+ DropPath(CrossAttn(LN(x), ctx))] + DropPath(MLP(LN(x)))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, cross: bool = False,
                 drop_path: float = 0.0):
        super().__init__()
        self.drop_path = drop_path  # this block's stochastic-depth rate (drop_path_rates)
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
        cache: Optional[LayerCache] = None,
        query_index: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """query_index (B,) long: only that position of each row leaves the block, (B, 1, W): attention
        and MLP run for it alone (the keys / values still come from every position)."""
        p, train = self.drop_path, self.training
        a = self.attn(self.ln1(x), causal=causal, key_padding_mask=key_padding_mask, cache=cache,
                      query_index=query_index)
        if query_index is not None:
            x = x[torch.arange(x.shape[0], device=x.device), query_index][:, None]
        x = x + drop_path(a, p, train)
        if self.cross is not None:
            x = x + drop_path(self.cross(self.ln_c(x), context=context, key_padding_mask=context_mask, cache=cache),
                              p, train)
        return x + drop_path(self.mlp(self.ln2(x)), p, train)


class Encoder(nn.Module):
    # activation checkpointing (model.<tower>.grad_checkpointing): each block's activations are
    # recomputed in backward instead of kept (the RNG state is replayed, so dropout masks match)
    grad_checkpointing: bool = False

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float, dropout: float = 0.0, cross: bool = False,
                 drop_path: float = 0.0):
        """drop_path: the stochastic-depth rate of the last block (drop_path_rates)."""
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout, cross, drop_path=r)
                                    for r in drop_path_rates(drop_path, depth))

    def forward(self, x: torch.Tensor, cache: Optional[DecodeCache] = None,
                pool_index: Optional[torch.Tensor] = None, **kw) -> torch.Tensor:
        """`cache`: incremental decoding (see DecodeCache); the caller advances its offset.
        `pool_index` (B,) long: the caller reads only that position of each row (the class token, the
        EOS): the last block computes it alone and the result is (B, 1, W). The same numbers as the
        full (B, T, W) at those positions, for ~3/4 less of the last block's work."""
        recompute = self.grad_checkpointing and cache is None and torch.is_grad_enabled()
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            if pool_index is not None and i == last:
                kw = dict(kw, query_index=pool_index)
            if recompute:
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False, **kw)
            else:
                x = blk(x, cache=cache.layers[i] if cache is not None else None, **kw)
        if pool_index is not None and not self.blocks:  # no last block to narrow: pick the positions here
            x = x[torch.arange(x.shape[0], device=x.device), pool_index][:, None]
        return x


def class_token_index(x: torch.Tensor) -> torch.Tensor:
    """Position 0 of every row of x (B, T, W): the class token, as Encoder's pool_index."""
    return x.new_zeros(x.shape[0], dtype=torch.long)


def set_grad_checkpointing(module: nn.Module, on: bool) -> int:
    """Activation checkpointing on / off for every native Encoder in `module` and every
    transformers model in it (their own `gradient_checkpointing_enable`); returns how many."""
    n = 0
    for m in module.modules():
        if isinstance(m, Encoder):
            m.grad_checkpointing = on
            n += 1
        elif hasattr(m, "gradient_checkpointing_enable") and getattr(m, "supports_gradient_checkpointing", False):
            if on:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                m.gradient_checkpointing_disable()
            n += 1
    return n


def init_weights(module: nn.Module) -> None:
    """CLIP's initialisation (the OpenAI / OpenCLIP text tower's, used by OpenCLIP users for every
    tower): inside each Encoder block the query / key / value maps ~ N(0, width^-1/2) so attention
    logits start at unit scale (0.02 leaves attention near-uniform and small CLIPs learn slowly),
    the MLP's first map ~ N(0, (2 width)^-1/2), the two maps back into the residual stream ~
    N(0, width^-1/2 (2 depth)^-1/2); other linears trunc-normal 0.02, embeddings N(0, 0.02),
    LayerNorm = identity. Under zero.Init one module's parameters are gathered at a time (models.zero3)."""
    from mmpretrain.models.zero3 import gathered

    for m in module.modules():
        if not isinstance(m, (nn.Linear, nn.Embedding, nn.LayerNorm)):
            continue
        with gathered(list(m.parameters(recurse=False))):
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            else:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    for enc in (m for m in module.modules() if isinstance(m, Encoder)):
        for blk in enc.blocks:
            _init_block(blk, len(enc.blocks))


def _init_block(blk: "Block", depth: int) -> None:
    from mmpretrain.models.zero3 import full_shape, gathered

    width = full_shape(blk.ln1.weight)[0]
    attn_std, fc_std, proj_std = width ** -0.5, (2 * width) ** -0.5, width ** -0.5 * (2 * depth) ** -0.5
    maps = [(blk.mlp[0], fc_std), (blk.mlp[2], proj_std)]
    for a in (blk.attn, blk.cross):
        if a is None:
            continue
        maps += [(lin, attn_std) for lin in (getattr(a, n, None) for n in ("qkv", "q", "kv")) if lin is not None]
        maps.append((a.out, proj_std))
    for lin, std in maps:
        with gathered([lin.weight]):
            nn.init.normal_(lin.weight, std=std)


def init_fan_in(lin: nn.Linear) -> None:
    """Weight ~ N(0, in_features^-1/2): CLIP's rule for a tower's map into the shared space, also used
    for the CoCa pooler's attention maps."""
    from mmpretrain.models.zero3 import full_shape, gathered

    with gathered([lin.weight]):
        nn.init.normal_(lin.weight, std=full_shape(lin.weight)[1] ** -0.5)
