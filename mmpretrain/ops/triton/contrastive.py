"""Triton tiled contrastive CE (see mmpretrain.ops.contrastive): the (n, N) similarity only
exists one (BLOCK_M, BLOCK_N) tile at a time. Forward stores the row LSE and target logit;
backward recomputes tiles in a dQ(+dscale) kernel over row blocks and a dK kernel over column
blocks, so no atomics are needed."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import bucket, configs, dot_precision, upcast

_GPU = [
    dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (32, 64, 4, 2)]
]
_FIXED = dict(BLOCK_M=32, BLOCK_N=32)
_KEY = ["M_BUCKET", "N_BUCKET", "BLOCK_D"]


@triton.jit
def _load_rows(X, rows, offs_d, R, D, s_r, s_d, UPCAST: tl.constexpr):
    x = tl.load(X + rows[:, None] * s_r + offs_d[None, :] * s_d, mask=(rows < R)[:, None] & (offs_d < D)[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.autotune(configs=configs(_GPU, _FIXED), key=_KEY)
@triton.jit
def _fwd_kernel(
    Q, K, SCALE, TGT, COLV, LSE, TQK, s_qm, s_qd, s_kn, s_kd, NQ, NK, D, M_BUCKET, N_BUCKET,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q, rows, offs_d, NQ, D, s_qm, s_qd, UPCAST)
    t = tl.load(TGT + rows, mask=rows < NQ, other=-1)
    scale = tl.load(SCALE).to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    tqk = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, NK, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(K, cols, offs_d, NK, D, s_kn, s_kd, UPCAST)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        tqk += tl.sum(tl.where(cols[None, :] == t[:, None], qk, 0.0), 1)
        cv = tl.load(COLV + cols, mask=cols < NK, other=0)
        s = tl.where((cv != 0)[None, :], qk * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no kept column yet: avoid inf - inf
        l_i = l_i * tl.exp(m_i - m_ref) + tl.sum(tl.exp(s - m_ref[:, None]), 1)
        m_i = m_new
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(tl.where(l_i == 0.0, 1.0, l_i)))
    tl.store(LSE + rows, lse, mask=rows < NQ)
    tl.store(TQK + rows, tqk, mask=rows < NQ)


@triton.jit
def _dlogits(q, k, cols, t, lse, gw, scale, COLV, NK, PRECISION: tl.constexpr):
    """(qk, (softmax - onehot) * g) for one tile; masked columns contribute 0."""
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    cv = tl.load(COLV + cols, mask=cols < NK, other=0)
    p = tl.where((cv != 0)[None, :], tl.exp(qk * scale - lse[:, None]), 0.0) * gw[:, None]
    ds = p - tl.where(cols[None, :] == t[:, None], gw[:, None], 0.0)
    return qk, ds


@triton.autotune(configs=configs(_GPU, _FIXED), key=_KEY)
@triton.jit
def _bwd_dq_kernel(
    Q, K, SCALE, TGT, COLV, LSE, GW, DQ, DSC, s_qm, s_qd, s_kn, s_kd, NQ, NK, D, M_BUCKET, N_BUCKET,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    r_ok = rows < NQ
    q = _load_rows(Q, rows, offs_d, NQ, D, s_qm, s_qd, UPCAST)
    t = tl.load(TGT + rows, mask=r_ok, other=-1)
    lse = tl.load(LSE + rows, mask=r_ok, other=0.0)
    gw = tl.load(GW + rows, mask=r_ok, other=0.0)
    scale = tl.load(SCALE).to(tl.float32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dsc = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, NK, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(K, cols, offs_d, NK, D, s_kn, s_kd, UPCAST)
        qk, ds = _dlogits(q, k, cols, t, lse, gw, scale, COLV, NK, PRECISION)
        dsc += tl.sum(ds * qk, 1)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    mask = r_ok[:, None] & (offs_d < D)[None, :]
    tl.store(DQ + rows[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=mask)
    tl.store(DSC + rows, dsc, mask=r_ok)


@triton.autotune(configs=configs(_GPU, _FIXED), key=_KEY)
@triton.jit
def _bwd_dk_kernel(
    Q, K, SCALE, TGT, COLV, LSE, GW, DK, s_qm, s_qd, s_kn, s_kd, NQ, NK, D, M_BUCKET, N_BUCKET,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K, cols, offs_d, NK, D, s_kn, s_kd, UPCAST)
    scale = tl.load(SCALE).to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, NQ, BLOCK_M):
        rows = start_m + offs_m
        r_ok = rows < NQ
        q = _load_rows(Q, rows, offs_d, NQ, D, s_qm, s_qd, UPCAST)
        t = tl.load(TGT + rows, mask=r_ok, other=-1)
        lse = tl.load(LSE + rows, mask=r_ok, other=0.0)
        gw = tl.load(GW + rows, mask=r_ok, other=0.0)
        qk, ds = _dlogits(q, k, cols, t, lse, gw, scale, COLV, NK, PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    mask = (cols < NK)[:, None] & (offs_d < D)[None, :]
    tl.store(DK + cols[:, None] * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=mask)


def _meta(q: torch.Tensor, nq: int, nk: int) -> dict:
    return dict(UPCAST=upcast(q.dtype), PRECISION=dot_precision(q.dtype),
                BLOCK_D=triton.next_power_of_2(max(q.shape[1], 16)), M_BUCKET=bucket(nq), N_BUCKET=bucket(nk))


class TritonContrastive(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, scale, targets, col_valid):  # type: ignore[override]
        n, D = q.shape
        N = k.shape[0]
        colv = col_valid.to(torch.uint8).contiguous()
        tgt = targets.to(torch.int32).contiguous()
        sc = scale.reshape(1).contiguous()
        lse = torch.empty(n, dtype=torch.float32, device=q.device)
        tqk = torch.empty(n, dtype=torch.float32, device=q.device)
        _fwd_kernel[lambda m: (triton.cdiv(n, m["BLOCK_M"]),)](
            q, k, sc, tgt, colv, lse, tqk, *q.stride(), *k.stride(), n, N, D, **_meta(q, n, N))
        row_ok = targets >= 0
        t = targets.clamp(min=0)
        tgt_logit = torch.where(col_valid[t], sc.float() * tqk, torch.full_like(tqk, float("-inf")))
        loss = torch.where(row_ok, lse - tgt_logit, torch.zeros_like(lse))
        ctx.save_for_backward(q, k, sc, tgt, colv, lse)
        ctx.scale_shape, ctx.scale_dtype = scale.shape, scale.dtype
        return loss.to(q.dtype)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        q, k, sc, tgt, colv, lse = ctx.saved_tensors
        n, D = q.shape
        N = k.shape[0]
        gw = torch.where(tgt >= 0, g.float(), torch.zeros((), device=g.device)).contiguous()
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # all-invalid rows: p = 0
        meta = _meta(q, n, N)
        dq = torch.empty((n, D), dtype=q.dtype, device=q.device)
        dsc = torch.empty(n, dtype=torch.float32, device=q.device)
        args = (*q.stride(), *k.stride(), n, N, D)
        _bwd_dq_kernel[lambda m: (triton.cdiv(n, m["BLOCK_M"]),)](
            q, k, sc, tgt, colv, lse, gw, dq, dsc, *args, **meta)
        dk = None
        if ctx.needs_input_grad[1]:
            dk = torch.empty((N, D), dtype=k.dtype, device=k.device)
            _bwd_dk_kernel[lambda m: (triton.cdiv(N, m["BLOCK_N"]),)](
                q, k, sc, tgt, colv, lse, gw, dk, *args, **meta)
        dscale = dsc.sum().to(ctx.scale_dtype).reshape(ctx.scale_shape)
        return dq, dk, dscale, None, None


def contrastive_rows_triton(
    q: torch.Tensor, k: torch.Tensor, logit_scale: torch.Tensor, targets: torch.Tensor, col_valid: torch.Tensor
) -> torch.Tensor:
    """Triton version of `contrastive_rows_naive` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    scale = torch.as_tensor(logit_scale, device=q.device)
    return TritonContrastive.apply(q, k, scale, targets, col_valid.bool())
