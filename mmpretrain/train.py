"""The training entry point every launcher starts:
`python -m mmpretrain.train --config FILE [dotted.key=value ...]`."""
from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from mmpretrain import checkpoint as ckpt_lib
from mmpretrain import distributed as D
from mmpretrain.config import Config, ConfigError, config_hash, load_config, to_yaml

log = logging.getLogger("mmpretrain.train")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmpretrain.train", description=__doc__)
    p.add_argument("--config", help="YAML run config (configs/*.yaml)")
    # the deepspeed launcher appends --local_rank=N; discovery reads LOCAL_RANK instead
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4")
    return p.parse_args(argv)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Owns the engine, the loader and the counters; `run()` is the loop."""

    def __init__(self, cfg: Config, info: D.DistInfo) -> None:
        from mmpretrain.data.pipeline import build_train_loader
        from mmpretrain.data.tokenizer import build_tokenizer
        from mmpretrain.engine import build_engine
        from mmpretrain.logging import MetricsLogger
        from mmpretrain.models import build_model
        from mmpretrain.ops.attention import set_backend

        self.cfg, self.info = cfg, info
        self.out = Path(cfg.run.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.config_yaml = to_yaml(cfg)
        set_backend(cfg.model.attention_backend)
        self.tokenizer = build_tokenizer(cfg.data.tokenizer)
        seed_everything(cfg.run.seed)  # identical initial weights on every rank
        model = build_model(cfg, self.tokenizer.vocab_size)
        self.engine, self.optimizer, self.scheduler = build_engine(cfg, model, info.world_size)
        self.dtype = _DTYPES[cfg.train.precision]
        seed_everything(cfg.run.seed + 1000 * info.rank)  # per-rank streams (dropout, augment)
        self.loader = build_train_loader(cfg, info.rank, info.world_size, self.tokenizer)
        self.step, self.samples_seen = 0, 0
        self.modality_counts = {"image": 0, "audio": 0, "text": 0}
        resume = ckpt_lib.find_resume(self.ckpt_root, cfg.train.resume)
        if resume is not None:
            state = ckpt_lib.load(self.engine, resume)
            t = state["trainer"]
            self.step, self.samples_seen = t["step"], t["samples_seen"]
            self.modality_counts = t.get("modality_counts", self.modality_counts)
            self.loader.load_state_dict(state["rank"]["data"])
        self.metrics = MetricsLogger(cfg, info.rank, cfg.train.steps, start_step=self.step)

    @property
    def model(self):
        return self.engine.module.model

    # ------------------------------------------------------------------ pieces
    def _next_batch(self) -> Dict[str, Any]:
        from mmpretrain.engine import batch_to_device

        return batch_to_device(next(self.loader), self.engine.device, self.dtype)

    def train_step(self) -> Dict[str, float]:
        t0 = time.perf_counter()
        data_wait = 0.0
        totals: Dict[str, float] = {}
        for _ in range(self.cfg.train.grad_accum):
            td = time.perf_counter()
            batch = self._next_batch()
            data_wait += time.perf_counter() - td
            loss, metrics = self.engine(batch)
            self.engine.backward(loss)
            self.engine.step()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v) / self.cfg.train.grad_accum
            n = int(batch["image_mask"].numel())
            self.samples_seen += n * self.info.world_size
            for m in self.modality_counts:
                self.modality_counts[m] += int(D.all_reduce_sum(batch[f"{m}_mask"].sum()).item())
        self.step += 1
        totals["step_time"] = time.perf_counter() - t0
        totals["data_wait"] = data_wait
        return totals

    def _record(self, m: Dict[str, float]) -> Dict[str, Any]:
        mb = self.cfg.train.micro_batch_size * self.cfg.train.grad_accum * self.info.world_size
        rec: Dict[str, Any] = {"kind": "train", "step": self.step, "samples_seen": self.samples_seen}
        rec.update(m)
        rec["lr"] = self.scheduler.get_last_lr()[0]
        for p in ("image_text", "audio_text", "image_audio"):
            rec[f"temperature/{p}"] = float(1.0 / self.model.scale(p).detach().float())
        gn = self.engine.get_global_grad_norm()
        rec["grad_norm"] = float(gn) if gn is not None else None
        rec["samples_per_s"] = mb / max(m["step_time"], 1e-9)
        for k, v in self.loader.stats().items():
            rec[f"data/{k}"] = v
        return rec

    def save(self) -> None:
        trainer_state = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "modality_counts": self.modality_counts,
            "config_hash": config_hash(self.cfg),
            "world_size": self.info.world_size,
            "zero_stage": self.cfg.train.zero_stage,
        }
        ckpt_lib.save(
            self.engine, self.ckpt_root, self.step, trainer_state, {"data": self.loader.state_dict()},
            self.config_yaml, self.cfg.train.keep_last,
        )

    def evaluate(self) -> Optional[Dict[str, Any]]:
        if not self.cfg.data.eval_urls:
            return None
        from mmpretrain.eval.runner import evaluate_retrieval

        res = evaluate_retrieval(self.model, self.cfg, self.tokenizer, self.engine.device, self.dtype)
        self.metrics.log({"kind": "eval", "step": self.step, **res}, console=False)
        return res

    # ------------------------------------------------------------------ loop
    def run(self) -> Dict[str, Any]:
        cfg = self.cfg
        result: Dict[str, Any] = {}
        if self.step == 0 and cfg.data.eval_urls:
            result["before"] = self.evaluate()
        last_save = time.time()
        while self.step < cfg.train.steps:
            m = self.train_step()
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                self.metrics.log(self._record(m))
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < cfg.train.steps:
                self.evaluate()
            minutes = cfg.train.save_every_minutes
            due = (cfg.train.save_every and self.step % cfg.train.save_every == 0) or (
                minutes > 0 and time.time() - last_save >= minutes * 60
            )
            if due and self.step < cfg.train.steps:
                self.save()
                last_save = time.time()
        self.save()
        result["after"] = self.evaluate()
        self.metrics.close()
        self.loader.close()
        return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)  # refused before any process group starts
        info = D.discover()
    except (ConfigError, D.LaunchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, torch.get_num_threads() // max(info.local_world_size, 1)))
    D.init(info)  # DeepSpeed wants a process group even for one process
    from mmpretrain.logging import setup_logging

    setup_logging(cfg.run.output_dir, info.rank)
    if info.is_main:
        Path(cfg.run.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run.output_dir) / "config.yaml").write_text(to_yaml(cfg))
    log.info("launcher=%s rank=%d/%d local_rank=%d", info.launcher, info.rank, info.world_size, info.local_rank)
    trainer = Trainer(cfg, info)
    result = trainer.run()
    if info.is_main and result.get("after"):
        from mmpretrain.eval.report import format_table

        print(format_table(result.get("before"), result["after"]))
    D.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
