"""FlashAttention-2 style Triton attention: online-softmax forward saving the row LSE, and a
recomputing backward (delta preprocess, a dK/dV kernel over key blocks, a dQ kernel over query
blocks). Causal masking is top-left aligned (query i sees keys j <= i), like SDPA's is_causal."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import bucket, configs, dot_precision, upcast

LOG2E = 1.4426950408889634

_GPU_CONFIGS = [
    dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2)]
]
_FIXED = dict(BLOCK_M=32, BLOCK_N=32)  # interpreter: large blocks = fewer (slow) program instances
_KEY = ["Q_BUCKET", "K_BUCKET", "BLOCK_D", "CAUSAL", "HAS_MASK"]


@triton.jit
def _keep(rows, cols, KPM, TQ, TK, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: which (query, key) pairs take part."""
    keep = (rows < TQ)[:, None] & (cols < TK)[None, :]
    if HAS_MASK:
        kp = tl.load(KPM + cols, mask=cols < TK, other=0)
        keep = keep & (kp != 0)[None, :]
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None])
    return keep


@triton.autotune(configs=configs(_GPU_CONFIGS, _FIXED), key=_KEY)
@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, KPM,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, s_ob, s_oh, s_om, s_od, s_mb,
    H, TQ, TK, HEAD_D, qk_scale, Q_BUCKET, K_BUCKET,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    K += b * s_kb + h * s_kh
    V += b * s_vb + h * s_vh
    KPM += b * s_mb
    q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qm + offs_d[None, :] * s_qd,
                mask=(rows < TQ)[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, base-2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = TK
    if CAUSAL:
        hi = tl.minimum(TK, (pid_m + 1) * BLOCK_M)  # key blocks past the diagonal are all masked
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < TK
        kt = tl.load(K + cols[None, :] * s_kn + offs_d[:, None] * s_kd, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(V + cols[:, None] * s_vn + offs_d[None, :] * s_vd, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        s = tl.where(_keep(rows, cols, KPM, TQ, TK, CAUSAL, HAS_MASK), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with nothing kept so far has m_new = -inf; shift by 0 instead so exp2 gives 0, not NaN
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0  # fully masked row: output 0, LSE 0 (backward's p is masked to 0 anyway)
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, 0.0, m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    row_ok = rows < TQ
    tl.store(O + b * s_ob + h * s_oh + rows[:, None] * s_om + offs_d[None, :] * s_od,
             o.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * TQ + rows, lse, mask=row_ok)


@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA, s_ob, s_oh, s_om, s_od, s_db, s_dh, s_dm, s_dd, H, TQ, HEAD_D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta_i = sum_d dO_id * O_id, the softmax-backward row term."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < TQ)[:, None] & (offs_d < HEAD_D)[None, :]
    o = tl.load(O + b * s_ob + h * s_oh + rows[:, None] * s_om + offs_d[None, :] * s_od, mask=mask, other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + rows[:, None] * s_dm + offs_d[None, :] * s_dd, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * TQ + rows, delta, mask=rows < TQ)


@triton.autotune(configs=configs(_GPU_CONFIGS, _FIXED), key=_KEY)
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KPM,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, s_db, s_dh, s_dm, s_dd, s_mb,
    s_gb, s_gh, s_gt, s_gd,
    H, TQ, TK, HEAD_D, qk_scale, sm_scale, Q_BUCKET, K_BUCKET,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per key block: accumulate dK, dV over all query blocks (no atomics)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    kv_mask = (cols < TK)[:, None] & d_ok[None, :]
    k = tl.load(K + b * s_kb + h * s_kh + cols[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + b * s_vb + h * s_vh + cols[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    Q += b * s_qb + h * s_qh
    DO += b * s_db + h * s_dh
    LSE += bh.to(tl.int64) * TQ
    DELTA += bh.to(tl.int64) * TQ
    KPM += b * s_mb
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M  # earlier queries see none of these keys
    for start_m in range(lo, TQ, BLOCK_M):
        rows = start_m + offs_m
        r_ok = rows < TQ
        qd_mask = r_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + rows[:, None] * s_qm + offs_d[None, :] * s_qd, mask=qd_mask, other=0.0)
        do = tl.load(DO + rows[:, None] * s_dm + offs_d[None, :] * s_dd, mask=qd_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + rows, mask=r_ok, other=0.0)
        delta = tl.load(DELTA + rows, mask=r_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        keep = _keep(rows, cols, KPM, TQ, TK, CAUSAL, HAS_MASK)
        p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    out = b * s_gb + h * s_gh + cols[:, None] * s_gt + offs_d[None, :] * s_gd  # DK/DV: same contiguous layout
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(configs=configs(_GPU_CONFIGS, _FIXED), key=_KEY)
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KPM,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, s_db, s_dh, s_dm, s_dd, s_mb,
    s_gb, s_gh, s_gt, s_gd,
    H, TQ, TK, HEAD_D, qk_scale, sm_scale, Q_BUCKET, K_BUCKET,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per query block: accumulate dQ over the key blocks it attends to."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    r_ok = rows < TQ
    qd_mask = r_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qm + offs_d[None, :] * s_qd, mask=qd_mask, other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + rows[:, None] * s_dm + offs_d[None, :] * s_dd, mask=qd_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + bh.to(tl.int64) * TQ + rows, mask=r_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * TQ + rows, mask=r_ok, other=0.0)
    K += b * s_kb + h * s_kh
    V += b * s_vb + h * s_vh
    KPM += b * s_mb
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = TK
    if CAUSAL:
        hi = tl.minimum(TK, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols < TK)[:, None] & d_ok[None, :]
        k = tl.load(K + cols[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
        v = tl.load(V + cols[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        keep = _keep(rows, cols, KPM, TQ, TK, CAUSAL, HAS_MASK)
        p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq_off = b * s_gb + h * s_gh + rows[:, None] * s_gt + offs_d[None, :] * s_gd
    tl.store(DQ + dq_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=qd_mask)


def _meta(q: torch.Tensor, k: torch.Tensor, causal: bool, kpm: Optional[torch.Tensor]) -> dict:
    return dict(
        CAUSAL=bool(causal), HAS_MASK=kpm is not None, UPCAST=upcast(q.dtype), PRECISION=dot_precision(q.dtype),
        BLOCK_D=triton.next_power_of_2(max(q.shape[-1], 16)),
    )


def _mask_arg(q: torch.Tensor, kpm: Optional[torch.Tensor]) -> Tuple[torch.Tensor, int]:
    if kpm is None:
        return torch.empty(1, dtype=torch.uint8, device=q.device), 0  # never read (HAS_MASK=False)
    m = kpm.to(device=q.device, dtype=torch.uint8).contiguous()
    return m, m.stride(0)


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, kpm: Optional[torch.Tensor], sm_scale: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (out (B,H,Tq,D) in q's dtype, lse (B*H, Tq) fp32 in base-2 units)."""
    B, H, TQ, D = q.shape
    TK = k.shape[2]
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B * H, TQ), device=q.device, dtype=torch.float32)
    mask, s_mb = _mask_arg(q, kpm)
    grid = lambda meta: (triton.cdiv(TQ, meta["BLOCK_M"]), B * H)  # noqa: E731
    _fwd_kernel[grid](
        q, k, v, o, lse, mask, *q.stride(), *k.stride(), *v.stride(), *o.stride(), s_mb,
        H, TQ, TK, D, sm_scale * LOG2E, bucket(TQ), bucket(TK), **_meta(q, k, causal, kpm),
    )
    return o, lse


def attention_backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    causal: bool, kpm: Optional[torch.Tensor], sm_scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, TQ, D = q.shape
    TK = k.shape[2]
    meta = _meta(q, k, causal, kpm)
    delta = torch.empty_like(lse)
    _bwd_delta_kernel[(triton.cdiv(TQ, 32), B * H)](
        o, do, delta, *o.stride(), *do.stride(), H, TQ, D, BLOCK_M=32, BLOCK_D=meta["BLOCK_D"]
    )
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    mask, s_mb = _mask_arg(q, kpm)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), s_mb)
    scalars = (H, TQ, TK, D, sm_scale * LOG2E, sm_scale, bucket(TQ), bucket(TK))
    _bwd_dkdv_kernel[lambda m: (triton.cdiv(TK, m["BLOCK_N"]), B * H)](
        q, k, v, do, lse, delta, dk, dv, mask, *strides, *dk.stride(), *scalars, **meta)
    _bwd_dq_kernel[lambda m: (triton.cdiv(TQ, m["BLOCK_M"]), B * H)](
        q, k, v, do, lse, delta, dq, mask, *strides, *dq.stride(), *scalars, **meta)
    return dq, dk, dv


class TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, kpm: Optional[torch.Tensor], sm_scale: float):  # type: ignore[override]
        o, lse = attention_forward(q, k, v, causal, kpm, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse, kpm)
        ctx.causal, ctx.sm_scale = causal, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):  # type: ignore[override]
        q, k, v, o, lse, kpm = ctx.saved_tensors
        dq, dk, dv = attention_backward(do, q, k, v, o, lse, ctx.causal, kpm, ctx.sm_scale)
        return dq, dk, dv, None, None, None


def triton_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None, sm_scale: Optional[float] = None,
) -> torch.Tensor:
    """q (B,H,Tq,D), k/v (B,H,Tk,D), key_padding_mask (B,Tk) bool True=keep; D <= 128."""
    if q.shape[-1] > 128:
        raise ValueError(f"triton attention supports head dim <= 128, got {q.shape[-1]}")
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    return TritonAttention.apply(q, k, v, bool(causal), key_padding_mask, float(sm_scale))
