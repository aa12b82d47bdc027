"""Issue 15: `train.compile` compiles each tower in place (names and checkpoints unchanged); the
loss and gradients equal eager to 1e-6 (aot_eager: dynamo + AOT autograd, no code generation, so
the test takes seconds; inductor is the same path plus codegen); where the backend cannot compile,
one warning and eager; refused with ZeRO-3."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "models"))
from tiny import fake_batch, tiny_cfg  # noqa: E402

from mmpretrain.config import ConfigError  # noqa: E402
from mmpretrain.engine import TrainModule  # noqa: E402
from mmpretrain.models import build_model  # noqa: E402
from mmpretrain.models import compile as mc  # noqa: E402


def _run(cfg, backend):
    torch.manual_seed(0)
    model = build_model(cfg, 259)
    names = list(model.state_dict())
    n = mc.compile_towers(model, backend, torch.device("cpu"))
    batch = fake_batch(cfg, 6, drop=("audio",))
    out = []
    for _ in range(2):  # a second call reuses the compiled graphs
        model.zero_grad()
        loss, _ = TrainModule(model, cfg)(batch)
        loss.backward()
        out.append((float(loss), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    return n, names, list(model.state_dict()), out


def test_compiled_towers_give_the_eager_loss_and_gradients():
    cfg = tiny_cfg("model.attention_backend=sdpa")
    n0, names0, _, eager = _run(cfg, "off")
    n1, names1, after, comp = _run(cfg, "aot_eager")
    assert n0 == 0 and n1 == 3 and names1 == after == names0  # in place: checkpoints unchanged
    for (l0, g0), (l1, g1) in zip(eager, comp):
        assert abs(l0 - l1) <= 1e-6 * max(1, abs(l0)), (l0, l1)
        assert g0.keys() == g1.keys()
        for k in g0:
            torch.testing.assert_close(g0[k], g1[k], atol=1e-6, rtol=1e-5, msg=k)


def test_inductor_without_a_compiler_warns_once_and_stays_eager(monkeypatch, caplog):
    monkeypatch.setattr(mc.shutil, "which", lambda name: None)
    model = build_model(tiny_cfg(), 259)
    with caplog.at_level(logging.WARNING, logger="mmpretrain.compile"):
        assert mc.compile_towers(model, "inductor", torch.device("cpu")) == 0
    assert [r.getMessage() for r in caplog.records] == [
        "train.compile=inductor: inductor on CPU needs a C++ compiler (c++ / g++ / clang++), none is on PATH; "
        "the towers run eager"]


def test_compile_with_zero3_is_refused_naming_the_keys():
    with pytest.raises(ConfigError, match="train.compile.*zero_stage=3"):
        tiny_cfg("train.compile=inductor", "train.zero_stage=3")
