"""Triton attention kernel vs a float64 plain-math reference (interpreter on CPU)."""
import pytest
import torch

from _helpers import rel_err, seed_for
from mmpretrain.ops.reference import reference_attention

fa = pytest.importorskip("mmpretrain.ops.triton.flash_attention")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}

CASES = [  # B, H, Tq, Tk, D, causal, mask, dtype
    (1, 2, 1, 17, 32, False, False, torch.float32),
    (2, 1, 17, 33, 32, False, True, torch.float32),
    (1, 2, 33, 33, 64, True, False, torch.float32),
    (2, 1, 77, 77, 32, True, True, torch.float32),
    (1, 1, 17, 17, 128, False, True, torch.float32),
    (1, 1, 33, 77, 16, True, False, torch.float32),  # Tq < Tk: top-left causal
    (1, 1, 40, 9, 32, True, True, torch.float32),  # Tq > Tk
    (2, 2, 33, 17, 64, False, True, torch.bfloat16),
    (1, 2, 33, 33, 32, True, True, torch.float16),
]


def _inputs(case):
    B, H, TQ, TK, D, causal, masked, dtype = case
    g = seed_for(case)
    q, k, v = (torch.randn(B, H, t, D, generator=g) for t in (TQ, TK, TK))
    kpm = None
    if masked:
        kpm = torch.rand(B, TK, generator=g) > 0.3
        kpm[:, 0] = True  # keep every row non-empty here (empty rows have their own test)
    do = torch.randn(B, H, TQ, D, generator=g)
    return [t.to(DEV, dtype) for t in (q, k, v, do)], kpm if kpm is None else kpm.to(DEV), causal


def _check(q, k, v, do, kpm, causal, tol):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fa.triton_attention(*leaves, causal=causal, key_padding_mask=kpm)
    out.backward(do)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_leaves, causal=causal, key_padding_mask=kpm)
    ref.backward(do.double())
    assert out.dtype == q.dtype and out.shape == q.shape
    assert rel_err(out, ref) < tol
    for name, a, b in zip("qkv", leaves, ref_leaves):
        assert torch.isfinite(a.grad).all(), name
        assert rel_err(a.grad, b.grad) < tol, name
    return out, leaves


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_matches_float64_reference(case):
    (q, k, v, do), kpm, causal = _inputs(case)
    _check(q, k, v, do, kpm, causal, TOL[case[-1]])


def test_non_contiguous_views():
    # the models hand over transposed views of (B, T, H, D) projections
    g = seed_for("views")
    x = torch.randn(2, 21, 3 * 2 * 32, generator=g).to(DEV)
    q, k, v = (t.view(2, 21, 2, 32).transpose(1, 2) for t in x.chunk(3, -1))
    do = torch.randn(2, 21, 2, 32, generator=g).to(DEV).transpose(1, 2)
    assert not q.is_contiguous() and not do.is_contiguous()
    _check(q, k, v, do, None, True, 1e-3)


@pytest.mark.parametrize("causal", [False, True])
def test_fully_masked_rows_are_zero_without_nan(causal):
    g = seed_for("empty", causal)
    B, H, T, D = 3, 2, 19, 32
    q, k, v, do = (torch.randn(B, H, T, D, generator=g).to(DEV) for _ in range(4))
    kpm = torch.rand(B, T, generator=g) > 0.5
    kpm[0] = False  # batch item 0: no key at all
    kpm[1, :5] = False  # causal: the first 5 queries of item 1 see nothing
    kpm[2] = True
    out, leaves = _check(q, k, v, do, kpm.to(DEV), causal, 1e-3)
    assert torch.isfinite(out).all()
    assert out[0].abs().max() == 0 and leaves[0].grad[0].abs().max() == 0
    assert leaves[1].grad[0].abs().max() == 0 and leaves[2].grad[0].abs().max() == 0
    if causal:
        assert out[1, :, :5].abs().max() == 0
