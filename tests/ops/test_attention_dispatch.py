"""Backend choice, logging and cross-backend agreement of `mmpretrain.ops.attention`."""
import logging

import pytest
import torch

from _helpers import rel_err, seed_for
from mmpretrain.ops import attention as A
from mmpretrain.ops.reference import reference_attention


@pytest.fixture(autouse=True)
def _fresh_log():
    A._LOGGED.clear()
    yield


def _qkv(B, H, TQ, TK, D, dtype=torch.float64, tag=""):
    g = seed_for(B, H, TQ, TK, D, tag)
    return [torch.randn(B, H, t, D, generator=g, dtype=dtype, requires_grad=True) for t in (TQ, TK, TK)]


def test_auto_on_cpu_prefers_sdpa_and_logs_once(caplog):
    q, k, v = _qkv(1, 2, 5, 5, 16)
    name, why = A.choose_backend(q, k, False, None, 0.0)
    assert name == "sdpa" and "CPU" in why
    with caplog.at_level(logging.INFO, logger="mmpretrain.ops"):
        for _ in range(3):
            A.attention(q, k, v)
    msgs = [r.getMessage() for r in caplog.records if r.name == "mmpretrain.ops"]
    assert len(msgs) == 1 and "sdpa" in msgs[0]


def test_backend_argument_forces_and_validates():
    q, k, v = _qkv(1, 1, 4, 4, 16)
    assert A.choose_backend(q, k, False, None, 0.0, "reference") == ("reference", "forced by model.attention_backend")
    with pytest.raises(ValueError):
        A.attention(q, k, v, backend="nope")
    assert A.check_backend("auto") is None
    assert A.choose_backend(q, k, False, None, 0.0, "auto")[0] == "sdpa"


def test_model_backend_reaches_every_attention_module(monkeypatch):
    """model.attention_backend is the model's own state: two models may differ in one process."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
    from tiny import fake_batch, tiny_cfg

    from mmpretrain.models import build_model

    cfg = tiny_cfg("model.attention_backend=reference")
    model, other = build_model(cfg, 259), build_model(tiny_cfg("model.attention_backend=sdpa"), 259)
    seen = []
    real = A.reference_attention
    monkeypatch.setattr(A, "reference_attention", lambda *a, **k: seen.append(1) or real(*a, **k))
    other(fake_batch(cfg, 2))
    assert not seen  # the sdpa model never takes the reference path
    model(fake_batch(cfg, 2))
    n_attn = sum(1 for m in model.modules() if hasattr(m, "attention_backend"))
    assert len(seen) >= n_attn - 1 > 0  # every self / cross attention and pooler of the forward


def test_forced_flash_without_flash_attn_raises():
    if A._has_flash() and torch.cuda.is_available():
        pytest.skip("flash-attn present")
    q, k, v = _qkv(1, 1, 4, 4, 16)
    with pytest.raises(RuntimeError, match="flash"):
        A.attention(q, k, v, backend="flash")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 2, 7, 7, 16), (1, 3, 5, 11, 32), (2, 1, 1, 9, 8)])
def test_sdpa_matches_reference(shape, causal):
    q, k, v = _qkv(*shape)
    g = seed_for(shape, causal, "mask")
    kpm = torch.rand(shape[0], shape[3], generator=g) > 0.4
    kpm[0] = False  # an item with no key: 0 output everywhere
    for mask in (None, kpm):
        out = A.attention(q, k, v, causal=causal, key_padding_mask=mask, backend="sdpa")
        ref = A.attention(q, k, v, causal=causal, key_padding_mask=mask, backend="reference")
        assert rel_err(out, ref) < 1e-10
        go = torch.autograd.grad(out.sum(), (q, k, v))
        gr = torch.autograd.grad(ref.sum(), (q, k, v))
        for a, b in zip(go, gr):
            assert torch.isfinite(a).all() and rel_err(a, b) < 1e-10
    assert out[0].abs().max() == 0


def test_forced_triton_on_cpu_matches_reference():
    from mmpretrain.ops.triton._common import INTERPRET

    if not (INTERPRET or torch.cuda.is_available()):
        pytest.skip("needs TRITON_INTERPRET=1 or a GPU")
    q, k, v = (t.detach().float().requires_grad_() for t in _qkv(2, 2, 13, 13, 32))
    kpm = torch.ones(2, 13, dtype=torch.bool)
    kpm[1, 9:] = False
    out = A.attention(q, k, v, causal=True, key_padding_mask=kpm, backend="triton")
    ref = reference_attention(q.double(), k.double(), v.double(), causal=True, key_padding_mask=kpm)
    assert rel_err(out, ref) < 1e-3
    with pytest.raises(RuntimeError, match="dropout"):
        A.attention(q, k, v, dropout_p=0.1, backend="triton")


def test_reference_dropout_is_stochastic_but_unbiased_in_shape():
    q, k, v = _qkv(1, 1, 6, 6, 8)
    out = A.attention(q, k, v, dropout_p=0.5, backend="reference")
    assert out.shape == q.shape and torch.isfinite(out).all()
