"""The one attention entry point of the project; every model calls `attention`, which dispatches
to flash-attn, our Triton kernel, PyTorch SDPA, or a plain-math reference.

Shapes: q (B, H, Tq, D), k and v (B, H, Tk, D); key_padding_mask (B, Tk) bool, True = keep.
Causal masking is top-left aligned (query i sees keys j <= i), as SDPA's `is_causal`; for
Tq == Tk (every causal use in the models) all conventions agree. Rows with no kept key give 0.
"""
from __future__ import annotations

import importlib.util
import logging
import math
from typing import Optional, Set, Tuple

import torch
import torch.nn.functional as F

from mmpretrain.ops.reference import attention_mask, reference_attention

logger = logging.getLogger("mmpretrain.ops")

BACKENDS = ("sdpa", "triton", "flash", "reference")
# the choice is per call (each attention module holds its `backend`, set from model.attention_backend);
# the only module state is this log-once memory of which choice was made and why
_LOGGED: Set[Tuple[str, str]] = set()
_HALF = (torch.float16, torch.bfloat16)


def check_backend(name: Optional[str]) -> Optional[str]:
    """'sdpa' | 'triton' | 'flash' | 'reference' -> itself; None or 'auto' -> None (pick per call)."""
    if name not in (None, "auto") and name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {BACKENDS} or 'auto'")
    return None if name in (None, "auto") else name


def _has_flash() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _triton_on(t: torch.Tensor) -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    # lazy: triton is optional (the [gpu] extra) and importing it costs seconds
    from mmpretrain.ops.triton._common import usable

    return usable(t)


def _why_not_flash(q: torch.Tensor, k: torch.Tensor, causal: bool, kpm: Optional[torch.Tensor]) -> Optional[str]:
    if not _has_flash():
        return "flash-attn not installed"
    if not q.is_cuda:
        return "not CUDA tensors"
    if q.dtype not in _HALF:
        return f"flash-attn needs fp16/bf16, got {q.dtype}"
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} unsupported by flash-attn"
    if causal and q.shape[-2] != k.shape[-2]:
        return "flash-attn's causal mask is bottom-right aligned; ours is top-left for Tq != Tk"
    if causal and kpm is not None:
        return "causal + key padding: varlen would re-index keys"
    return None


def _why_not_triton(q: torch.Tensor, dropout_p: float) -> Optional[str]:
    if not _triton_on(q):
        return "no CUDA device and TRITON_INTERPRET unset"
    if dropout_p > 0:
        return "dropout not implemented in the Triton kernel"
    if q.shape[-1] > 128:
        return f"head dim {q.shape[-1]} > 128"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype}"
    return None


def choose_backend(
    q: torch.Tensor, k: torch.Tensor, causal: bool, kpm: Optional[torch.Tensor], dropout_p: float,
    backend: Optional[str] = None,
) -> Tuple[str, str]:
    """(backend, reason) for these inputs; a `backend` other than None / 'auto' is used as given."""
    forced = check_backend(backend)
    if forced is not None:
        return forced, "forced by model.attention_backend"
    no_flash = _why_not_flash(q, k, causal, kpm)
    if no_flash is None:
        return "flash", "flash-attn available, CUDA, half precision"
    if not q.is_cuda:
        # the interpreter is far too slow for training; triton on CPU only when forced
        return "sdpa", f"CPU tensors ({no_flash})"
    no_triton = _why_not_triton(q, dropout_p)
    if no_triton is None:
        return "triton", f"CUDA ({no_flash})"
    return "sdpa", f"{no_flash}; triton: {no_triton}"


def _log_once(name: str, reason: str) -> None:
    if (name, reason) not in _LOGGED:
        _LOGGED.add((name, reason))
        logger.info("attention backend: %s (%s)", name, reason)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """`backend`: None / 'auto' picks per call (see choose_backend); a name forces that kernel."""
    name, reason = choose_backend(q, k, causal, key_padding_mask, dropout_p, backend)
    _log_once(name, reason)
    if name == "sdpa":
        return _sdpa(q, k, v, causal, key_padding_mask, dropout_p)
    if name == "reference":
        return reference_attention(q, k, v, causal, key_padding_mask, dropout_p)
    if name == "triton":
        why = _why_not_triton(q, dropout_p)
        if why is not None:
            raise RuntimeError(f"attention backend 'triton' forced but unusable: {why}")
        from mmpretrain.ops.triton.flash_attention import triton_attention  # optional dependency

        return triton_attention(q, k, v, causal, key_padding_mask)
    if name == "flash":
        why = _why_not_flash(q, k, causal, key_padding_mask)
        if why is not None:
            raise RuntimeError(f"attention backend 'flash' forced but unusable: {why}")
        return _flash(q, k, v, causal, key_padding_mask, dropout_p)
    raise ValueError(f"unknown attention backend {name!r}")


def _sdpa(q, k, v, causal, kpm, dropout_p) -> torch.Tensor:
    if q.device.type == "meta":  # the capacity planner: cost it as the fused kernel a GPU runs
        return _fused_on_meta(q, k, v, causal, kpm, dropout_p)
    if kpm is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
    mask = attention_mask(q.shape[-2], k.shape[-2], causal, kpm, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    # some SDPA kernels give NaN for a row with no kept key; make it 0 everywhere (no sync)
    return torch.where(mask.any(-1, keepdim=True), out, torch.zeros((), dtype=out.dtype, device=out.device))


def _fused_on_meta(q, k, v, causal, kpm, dropout_p) -> torch.Tensor:
    """Shapes only: PyTorch's memory-efficient SDPA op, whose forward keeps q, k, v, the output and
    the row log-sum-exp for backward (no T x T weights, as on a GPU), and whose FLOPs the flop
    counter knows; SDPA's own choice on `meta` would be the math path, which keeps the weights."""
    bias = None
    if kpm is not None:
        mask = attention_mask(q.shape[-2], k.shape[-2], causal, kpm, q.device)
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        causal = False  # in the bias
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, dropout_p, causal)[0]


def _flash(q, k, v, causal, kpm, dropout_p) -> torch.Tensor:
    import flash_attn  # optional ([gpu] extra), CUDA only

    scale = 1.0 / math.sqrt(q.shape[-1])
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # flash-attn layout (B, T, H, D)
    if kpm is None:
        out = flash_attn.flash_attn_func(qt, kt, vt, dropout_p=dropout_p, softmax_scale=scale, causal=causal)
        return out.transpose(1, 2)
    # key padding: pack the kept keys (varlen); queries stay dense (one segment per batch item)
    B, TQ, H, D = qt.shape
    lens = kpm.sum(1, dtype=torch.int32)
    if bool((lens == 0).any()):  # varlen has no empty key sets; SDPA path zeroes those rows
        return _sdpa(q, k, v, causal, kpm, dropout_p)
    keep = kpm.reshape(-1).nonzero().squeeze(1)
    k_packed = kt.reshape(-1, H, D).index_select(0, keep)
    v_packed = vt.reshape(-1, H, D).index_select(0, keep)
    cu_k = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (B + 1) * TQ, TQ, dtype=torch.int32, device=q.device)
    out = flash_attn.flash_attn_varlen_func(
        qt.reshape(B * TQ, H, D), k_packed, v_packed, cu_q, cu_k, TQ, int(lens.max()),
        dropout_p=dropout_p, softmax_scale=scale, causal=False,
    )
    return out.view(B, TQ, H, D).transpose(1, 2)
