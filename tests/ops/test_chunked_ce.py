"""Chunked linear + cross-entropy vs F.cross_entropy on full logits."""
import pytest
import torch
import torch.nn.functional as F

from _helpers import rel_err, seed_for
from mmpretrain.ops.chunked_ce import chunked_linear_cross_entropy


@pytest.mark.parametrize("M,V,D,chunk", [(1, 7, 8, 4), (37, 50, 16, 8), (64, 300, 32, 64), (20, 11, 8, 1000)])
def test_matches_full_logits(M, V, D, chunk):
    g = seed_for(M, V, D, chunk)
    h = torch.randn(M, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (M,), generator=g)
    t[torch.rand(M, generator=g) < 0.3] = -100
    t[0] = 1
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=-100)
    rh, rw = torch.autograd.grad(ref, (h, w))
    got = chunked_linear_cross_entropy(h, w, t, chunk=chunk)
    gh, gw = torch.autograd.grad(got * 1.0, (h, w))
    # the loss accumulates in fp32 by design; grads are recomputed in fp32 too
    assert rel_err(got, ref) < 1e-6 and rel_err(gh, rh) < 1e-6 and rel_err(gw, rw) < 1e-6


def test_all_ignored_is_zero():
    h = torch.randn(5, 4, requires_grad=True)
    w = torch.randn(6, 4, requires_grad=True)
    loss = chunked_linear_cross_entropy(h, w, torch.full((5,), -100), chunk=2)
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().max() == 0 and w.grad.abs().max() == 0
