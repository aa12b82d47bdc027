"""Issue 15: `train.deepspeed` passed through to DeepSpeed (validated before any process starts),
offload of optimizer state and parameters to CPU, and the throughput figures in the logs
(FLOPs per sample, TFLOP/s and MFU per device, peak memory per rank)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import trainkit as tk

sys.path.insert(0, str(Path(__file__).parent / "models"))
from tiny import tiny_cfg  # noqa: E402

from mmpretrain import preflight  # noqa: E402
from mmpretrain.config import ConfigError  # noqa: E402
from mmpretrain.engine import deepspeed_config  # noqa: E402
from mmpretrain.throughput import FlopMeter  # noqa: E402


@pytest.mark.parametrize("override, words", [
    ("train.deepspeed={bf16: {enabled: true}}", ["train.deepspeed.bf16", "train.precision"]),
    ("train.deepspeed={train_batch_size: 64}", ["train.deepspeed.train_batch_size", "train.micro_batch_size"]),
    ("train.deepspeed={zero_optimization: {stage: 3}}", ["zero_optimization.stage", "train.zero_stage"]),
    ("train.deepspeed={zero_optimisation: {overlap_comm: true}}", ["train.deepspeed.zero_optimisation", "allowed"]),
    ("train.deepspeed={zero_optimization: {overlap_com: true}}", ["zero_optimization.overlap_com", "Extra inputs"]),
    ("train.deepspeed={zero_optimization: {reduce_bucket_size: lots}}",
     ["zero_optimization.reduce_bucket_size", "'lots'"]),
])
def test_bad_deepspeed_settings_are_refused_naming_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        preflight.check_deepspeed(tiny_cfg(override))
    assert all(w in str(e.value) for w in words), str(e.value)


def test_deepspeed_settings_are_merged_into_the_generated_config():
    cfg = tiny_cfg("train.zero_stage=3", "train.deepspeed={zero_optimization: {overlap_comm: true, "
                   "reduce_bucket_size: 1000, offload_optimizer: {device: cpu}}, wall_clock_breakdown: true}")
    preflight.check_deepspeed(cfg)
    ds = deepspeed_config(cfg, 2)
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["overlap_comm"] is True and z["reduce_bucket_size"] == 1000
    assert z["offload_optimizer"] == {"device": "cpu"} and z["stage3_param_persistence_threshold"] == 0
    assert ds["wall_clock_breakdown"] is True and ds["train_batch_size"] == 16  # ours kept


def test_flops_per_sample_of_a_linear_layer():
    """forward 2·B·I·O, backward twice that (input and weight gradients): 6·I·O per sample."""
    lin = torch.nn.Linear(64, 32, bias=False)
    meter = FlopMeter(peak_tflops=1.0)
    x = torch.randn(8, 64, requires_grad=True)
    with meter.counting(8):
        lin(x).sum().backward()
    assert meter.flops_per_sample == 6 * 64 * 32
    f = meter.figures(1e6)  # a million samples per second per device
    assert f["tflops_per_device"] == pytest.approx(6 * 64 * 32 * 1e6 / 1e12)
    assert f["mfu"] == pytest.approx(f["tflops_per_device"] / 1.0)
    with meter.counting(8):  # counted once: later blocks are not
        lin(x).sum().backward()
    assert meter.flops_per_sample == 6 * 64 * 32


@pytest.mark.distributed
def test_zero3_with_optimizer_and_parameters_offloaded_to_cpu_trains_and_logs_throughput(tiny_data, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    over = tk.tiny_overrides(out, tiny_data, "train.zero_stage=3", "train.steps=6", "train.peak_tflops=0.5",
                             "train.deepspeed={zero_optimization: {offload_optimizer: {device: cpu}, "
                             "offload_param: {device: cpu}, overlap_comm: true}}")
    assert tk.run("torchrun", 2, over, log, timeout=240) == 0, log.read_text()[-3000:]
    rows = tk.train_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]
    r = rows[-1]
    assert r["flops_per_sample"] > 0 and r["tflops_per_device"] > 0 and 0 < r["mfu"] < 1
    assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 0.5)
    assert r["samples_per_s_per_device"] == pytest.approx(r["samples_per_s"] / 2)
    assert 50 < r["peak_mem_mib"] < 20000
    console = (out / "logs" / "rank0.log").read_text()
    assert "TFLOP/s/device (MFU" in console and "peak mem" in console
