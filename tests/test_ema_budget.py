"""train.ema (EMA of the weights: update rule, eval swap, checkpoint, exact resume, export) and
train.max_minutes (a wall-clock budget that shortens the run and its LR schedule)."""
from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn as nn

import faultkit
import trainkit as tk
from mmpretrain.budget import WallClockBudget
from mmpretrain.checkpoint import complete_checkpoints, read_trainer_state
from mmpretrain.config import ConfigError, load_config
from mmpretrain.ema import EMA_FILE, WeightEMA, ema_state_dict
from mmpretrain.engine import lr_lambda, set_schedule_total


# ----------------------------------------------------------------------------- EMA, in process


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    net[1].bias.requires_grad_(False)  # frozen: not tracked
    return net


@pytest.mark.parametrize("warmup, every", [(True, 1), (False, 2)])
def test_ema_matches_a_float64_reference_of_the_update_rule(warmup, every):
    net = _net()
    ema = WeightEMA(net, decay=0.8, warmup=warmup, every=every)
    assert set(ema.shadow) == {"0.weight", "0.bias", "1.weight"}
    ref = {n: p.detach().double().clone() for n, p in net.named_parameters() if p.requires_grad}
    n_updates = 0
    for step in range(1, 7):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))  # an optimizer step
        if step % every == 0:
            d = min(0.8, (1 + n_updates) / (10 + n_updates)) if warmup else 0.8
            for n, p in net.named_parameters():
                if p.requires_grad:
                    ref[n] = d * ref[n] + (1 - d) * p.detach().double()
            n_updates += 1
        assert ema.update(step) == (step % every == 0)
    assert ema.updates == n_updates
    for n in ref:
        assert ema.shadow[n].dtype == torch.float32
        torch.testing.assert_close(ema.shadow[n].double(), ref[n], rtol=0, atol=1e-6)
        assert not torch.allclose(ema.shadow[n], dict(net.named_parameters())[n])


def test_swap_in_and_back_and_checkpoint_file(tmp_path):
    net = _net()
    ema = WeightEMA(net, decay=0.5, warmup=False)
    trained = {n: p.detach().clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema.update(1)
    after = {n: p.detach().clone() for n, p in net.named_parameters()}
    with ema.swapped_in():
        torch.testing.assert_close(net[0].weight.detach(), trained["0.weight"] + 0.5, rtol=0, atol=1e-6)
        assert torch.equal(net[1].bias, after["1.bias"])  # frozen: untouched
    for n, p in net.named_parameters():
        assert torch.equal(p, after[n])  # restored exactly
    ema.save(tmp_path)
    other = WeightEMA(_net(), decay=0.5, warmup=False)
    assert other.load(tmp_path) and other.updates == 1
    assert torch.equal(other.shadow["0.weight"], ema.shadow["0.weight"])
    assert torch.equal(ema_state_dict(tmp_path)["0.weight"], ema.shadow["0.weight"])
    assert not WeightEMA(_net()).load(tmp_path / "nothing")  # no ema.pt: starts from the weights


# ----------------------------------------------------------------------------- budget, in process


def test_schedule_rescaled_to_a_new_total_ends_at_the_floor():
    cfg = load_config(str(tk.TINY_CONFIG), ["train.steps=100", "optim.warmup_steps=2", "optim.min_lr_ratio=0.1"])
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    for _ in range(10):
        opt.step()
        sched.step()
    set_schedule_total(sched, cfg, 30)
    assert opt.param_groups[0]["lr"] == lr_lambda(cfg, 30)(10) < lr_lambda(cfg)(10)  # further down the shorter cosine
    for _ in range(20):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.1)  # the floor, at the new end (step 30)
    assert lr_lambda(cfg, 30)(29) > 0.1


def _budget(minutes: float, steps: int, used: float) -> WallClockBudget:
    b = WallClockBudget(minutes, steps, seconds_before=used)
    b.start()
    for i in range(1, 11):
        assert b.observe(0.5 if i > 2 else 5.0) == (i == 10)  # steps 1-2 (slow warm-up) are not measured
    return b


def test_budget_decides_from_the_measured_step_time_and_reserves_eval_and_save():
    b = _budget(1.0, 1000, used=10.0)
    b.note_eval(2.0)
    b.note_save(1.0)
    total = b.decide(10, eval_every=0, save_every=0)
    assert total in (10 + 93, 10 + 94)  # (60 - 10 - 3) / 0.5 = 94, less the test's own milliseconds
    assert b.decided and not b.final  # fitted again from every measured step after a quarter of the rest
    due = next(i for i in range(1, 40) if b.observe(1.0))
    assert due == 23  # 10 + max(8, int(0.25 * 93)) = 33rd step of the session
    total = b.decide(33, eval_every=0, save_every=0)
    # (60 - elapsed - 3) / mean step: the mean rose from 0.5 to (8 * 0.5 + 23 * 1.0) / 31
    assert total < 10 + 93 and b.final and not any(b.observe(1.0) for _ in range(50))
    b = _budget(1.0, 1000, used=10.0)
    b.note_eval(2.0)
    assert b.decide(10, eval_every=10, save_every=0) in (10 + 67, 10 + 68)  # an eval every 10 steps: 0.7 s a step, (60 - 10 - 2) / 0.7
    assert _budget(1.0, 50, used=10.0).decide(10, 0, 0) == 50  # never more than train.steps
    assert _budget(0.1, 1000, used=10.0).decide(10, 0, 0) == 10  # over budget already: stop now


def test_budget_off_and_kept_decision():
    assert WallClockBudget(0.0, 100).decided and WallClockBudget(0.0, 100).total == 100
    kept = WallClockBudget(5.0, 100, seconds_before=12.0, schedule_total=40)
    assert kept.decided and kept.total == 40 and kept.elapsed() == 12.0
    assert not any(kept.observe(0.1) for _ in range(20))


@pytest.mark.parametrize("override, key", [
    (["train.max_minutes=-1"], "train.max_minutes"), (["train.ema.decay=1.5"], "train.ema.decay"),
    (["train.ema.every=0"], "train.ema.every"), (["train.ema.enabled=true", "train.zero_stage=3"], "train.ema.enabled"),
    (["eval.use_ema=true"], "eval.use_ema")])
def test_bad_values_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(str(tk.TINY_CONFIG), override)


# ----------------------------------------------------------------------------- real runs (one process)

EMA_ON = ("train.ema.enabled=true", "train.ema.decay=0.9", "train.steps=6", "train.save_every=3")


def test_ema_is_saved_and_a_resumed_run_is_bit_identical(tiny_data, tmp_path):
    ref, log = tmp_path / "ref", tmp_path / "ref.log"
    assert tk.run("single", 1, tk.tiny_overrides(ref, tiny_data, *EMA_ON), log) == 0, log.read_text()[-3000:]
    ckpts = complete_checkpoints(ref / "checkpoints")
    assert [c.name for c in ckpts] == ["step_00000003", "step_00000006"]
    assert all((c / EMA_FILE).is_file() for c in ckpts)
    # a second run resumes from step 3 of the first and trains steps 4-6 again
    out = tmp_path / "resumed"
    over = tk.tiny_overrides(out, tiny_data, *EMA_ON, f"train.resume={ckpts[0]}")
    assert tk.run("single", 1, over, log) == 0, log.read_text()[-3000:]
    assert sorted(tk.losses_by_step(out)) == [4, 5, 6]
    assert all(tk.losses_by_step(out)[s] == tk.losses_by_step(ref)[s] for s in (4, 5, 6))
    tk.assert_same_weights(tk.final_weights(ref), tk.final_weights(out))
    ema_ref = ema_state_dict(ckpts[-1])
    ema_out = ema_state_dict(complete_checkpoints(out / "checkpoints")[-1])
    tk.assert_same_weights(ema_ref, ema_out)
    weights = tk.final_weights(ref)
    assert set(ema_ref) <= set(weights) and any(not torch.equal(ema_ref[k], weights[k]) for k in ema_ref)
    # export --ema writes the EMA weights
    from mmpretrain.export import main as export_main
    from safetensors.torch import load_file

    assert export_main(["--checkpoint", str(ref), "--out", str(tmp_path / "exp"), "--ema", "--clip", "off"]) == 0
    exported = load_file(str(tmp_path / "exp" / "model.safetensors"))
    assert all(torch.equal(exported[k], ema_ref[k]) for k in ema_ref)
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["weights"] == "ema"


def test_budget_cuts_a_slow_run_and_its_schedule_and_eval_uses_the_ema(tiny_data, tmp_path):
    """Steps slowed to ~0.35 s and a 10 s budget: 40 steps cannot fit. With train.ema.decay=1 (no
    warm-up) the EMA stays at the initial weights, so the final eval (eval.use_ema) scores exactly
    what the step-0 eval scored."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    over = tk.tiny_overrides(out, tiny_data, "train.steps=40", "train.max_minutes=0.17", "optim.min_lr_ratio=0.1",
                             "train.ema.enabled=true", "train.ema.decay=1.0", "train.ema.warmup=false",
                             "eval.use_ema=true", "eval.captioning=false", "eval.zeroshot=false",
                             faultkit.plugin("slow_steps"), eval_=True)
    t0 = time.time()
    assert tk.run("single", 1, over, log, **{faultkit.SLOW_STEP_VAR: "0.35"}) == 0, log.read_text()[-3000:]
    rows = tk.metrics_rows(out)
    decision = [r for r in rows if r.get("kind") == "budget"]
    assert 1 <= len(decision) <= 2 and decision[0]["step"] == 10, decision  # a second fit when steps remain
    total = decision[-1]["total_steps"]
    assert 10 <= total < 40, decision
    assert all(d["step_s"] >= 0.35 for d in decision)  # the wall-clock step: the slow start of each step counts
    train = tk.train_rows(out)
    assert train[-1]["step"] == total
    assert train[-1]["lr"] == pytest.approx(3e-3 * 0.1)  # the cosine reached its floor at the new end
    last = complete_checkpoints(out / "checkpoints")[-1]
    assert last.name == f"step_{total:08d}"
    state = read_trainer_state(last)
    assert state["schedule_total"] == total and 0 < state["train_seconds"] < time.time() - t0
    assert state["train_seconds"] < 0.17 * 60 + 3  # within the budget, give or take a shared CPU's jitter
    assert "train.max_minutes=0.17: step time" in (out / "logs" / "rank0.log").read_text()
    evals = [r for r in rows if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [0, total]
    scores = [{k: v for k, v in r.items() if k not in ("step", "time")} for r in evals]
    assert scores[0] == scores[1]
