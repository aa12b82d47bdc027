"""Throughput figures for the logs: FLOPs per training sample (counted once by
`torch.utils.flop_counter` over the forward and backward of the first micro-batch a process
trains), then TFLOP/s per device, model FLOPs utilisation against `train.peak_tflops`, and peak
memory per rank.

The count covers what dispatches through aten (matmuls, convolutions, SDPA); kernels of our own
(the Triton / flash attention backends) are not seen by it, so it is an undercount with those.
Dense bf16 peaks for `train.peak_tflops` (vendor figures, without sparsity): A100 312, H100 SXM
989, H100 PCIe 756, H200 989, L40S 362, A10G 125 (fp32 peaks are far lower; set what the run uses)."""
from __future__ import annotations

import contextlib
import resource
import sys
from typing import Dict, Iterator, Optional

import torch

PEAK_TFLOPS_BF16 = {"a100": 312.0, "h100": 989.0, "h100-pcie": 756.0, "h200": 989.0, "l40s": 362.0, "a10g": 125.0}


class FlopMeter:
    """FLOPs per sample from one counted micro-batch; per-step figures from the step's rate."""

    def __init__(self, peak_tflops: float = 0.0) -> None:
        self.peak_tflops = float(peak_tflops or 0.0)
        self.flops_per_sample: Optional[float] = None

    @contextlib.contextmanager
    def counting(self, samples: int) -> Iterator[None]:
        """Count the FLOPs of the block (a micro-batch's forward and backward) the first time."""
        if self.flops_per_sample is not None or samples <= 0:
            yield
            return
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            yield
        self.flops_per_sample = counter.get_total_flops() / samples

    def figures(self, samples_per_s_per_device: float) -> Dict[str, float]:
        if self.flops_per_sample is None:
            return {}
        tflops = self.flops_per_sample * samples_per_s_per_device / 1e12
        out = {"flops_per_sample": self.flops_per_sample, "tflops_per_device": tflops}
        if self.peak_tflops > 0:
            out["mfu"] = tflops / self.peak_tflops
        return out


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this rank: allocated on a CUDA device, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
