"""The training entry point every launcher starts:
`python -m mmpretrain.train --config FILE [dotted.key=value ...]`."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from mmpretrain import checkpoint as ckpt_lib
from mmpretrain import distributed as D
from mmpretrain.config import Config, ConfigError, config_hash, load_config, to_yaml
from mmpretrain.preemption import PREEMPTED_MARKER, REQUEUE_EXIT_CODE, PreemptionWatcher

log = logging.getLogger("mmpretrain.train")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NONFINITE_EXIT_CODE = 3


class Preempted(Exception):
    """Every rank saw the preemption flag and the checkpoint is saved."""


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


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
        # what to resume and how: exact, universal (other world size) or weights only (other ZeRO stage)
        resume = ckpt_lib.find_resume(self.ckpt_root, cfg.train.resume)
        plan = ckpt_lib.plan_resume(resume, info.world_size, cfg.train.zero_stage) if resume else None
        if plan is not None and plan.mode == "weights_only":
            ckpt_lib.load_consolidated_weights(model, resume)  # before ZeRO partitions the module
        if plan is not None and plan.mode == "universal":
            ckpt_lib.ensure_universal(resume)
        self.engine, self.optimizer, self.scheduler = build_engine(
            cfg, model, info.world_size, load_universal=plan is not None and plan.mode == "universal")
        self.dtype = _DTYPES[cfg.train.precision]
        seed_everything(cfg.run.seed + 1000 * info.rank)  # per-rank streams (dropout, augment)
        # the data seed moves on after a non-exact resume (see _data_cfg); the loader is built before
        # the checkpoint restores the RNG, as in an uninterrupted run
        self.data_seed = plan.trainer_state.get("data_seed", cfg.run.seed) if plan is not None else cfg.run.seed
        # the explicit checkpoint this run started from (train.resume=PATH), kept by later saves
        explicit = plan is not None and cfg.train.resume not in ("auto", "never") and \
            plan.ckpt.resolve() == Path(cfg.train.resume).resolve()
        self.origin = ckpt_lib.origin_of(plan.ckpt) if explicit else (plan.trainer_state.get("origin") if plan else None)
        if plan is not None and plan.mode != "exact":
            log.warning("resume mode '%s': the data stream restarts (seed + step); exact data order "
                        "is kept only for the same world size", plan.mode)
            self.data_seed += plan.trainer_state["step"]
        self.loader = build_train_loader(self._data_cfg(), info.rank, info.world_size, self.tokenizer)
        self.step, self.samples_seen = 0, 0
        self.modality_counts = {"image": 0, "audio": 0, "text": 0}
        self.nonfinite_total, self.nonfinite_run = 0, 0
        if plan is not None:
            state = ckpt_lib.load(self.engine, plan)
            t = state["trainer"]
            self.step, self.samples_seen = t["step"], t["samples_seen"]
            self.modality_counts = t.get("modality_counts", self.modality_counts)
            self.nonfinite_total = t.get("nonfinite_total", 0)
            if plan.mode == "exact":
                self.loader.load_state_dict(state["rank"]["data"])
            if plan.mode == "weights_only":  # the schedule was not restored: move it to this step
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
                    self.scheduler.last_epoch = self.step - 1
                    self.scheduler.step()
        own = plan is not None and plan.mode == "exact" and plan.ckpt.parent.resolve() == self.ckpt_root.resolve()
        self.last_saved_step = self.step if own else -1
        self._closed = False
        self.metrics = MetricsLogger(cfg, info.rank, cfg.train.steps, start_step=self.step)
        self.watcher = PreemptionWatcher(cfg.train.preempt_margin_minutes * 60).install()
        self._nan_image_steps = ckpt_lib.fault_steps("NAN_IMAGE_STEPS")

    @property
    def model(self):
        return self.engine.module.model

    # ------------------------------------------------------------------ pieces
    def _next_batch(self) -> Dict[str, Any]:
        from mmpretrain.engine import batch_to_device

        batch = batch_to_device(next(self.loader), self.engine.device, self.dtype)
        if self.step + 1 in self._nan_image_steps and self.info.rank == 0:
            batch["image"][0] = float("nan")  # fault injection: one poisoned input on one rank
        return batch

    def _grads_finite_stage0(self) -> bool:
        """ZeRO 1-3 skip non-finite gradients themselves; stage 0 hands them to torch."""
        finite = [torch.isfinite(p.grad).all() for p in self.engine.module.parameters() if p.grad is not None]
        bad = bool(finite) and not bool(torch.stack(finite).all())  # one host sync, not one per parameter
        return not D.any_rank(bad)

    def _data_cfg(self) -> Config:
        """The config the loader sees: run.seed is the data seed (moved on by a non-exact resume)."""
        if self.data_seed == self.cfg.run.seed:
            return self.cfg
        return dataclasses.replace(self.cfg, run=dataclasses.replace(self.cfg.run, seed=self.data_seed))

    def train_step(self) -> Dict[str, float]:
        t0 = time.perf_counter()
        data_wait = 0.0
        totals: Dict[str, float] = {}
        bad_terms: List[str] = []
        skipped_before = self.engine.skipped_steps
        grads_ok = True
        cache = None
        if self.cfg.loss.feature_cache:  # exact big-batch contrastive gradient (mmpretrain.feature_cache)
            from mmpretrain.feature_cache import FeatureCache

            td = time.perf_counter()
            pending = [self._next_batch() for _ in range(self.cfg.train.grad_accum)]
            data_wait += time.perf_counter() - td
            cache = FeatureCache.build(self.model, pending)
        for micro in range(self.cfg.train.grad_accum):
            td = time.perf_counter()
            batch = cache.batches[micro] if cache is not None else self._next_batch()
            data_wait += time.perf_counter() - td
            loss, metrics = self.engine(batch) if cache is None else self.engine(batch, feature_cache=cache,
                                                                                  micro_index=micro)
            # loss metrics are already summed over ranks (losses.py), so every rank sees the same
            # non-finite terms and skips the same step without another collective
            values = {k: float(v) for k, v in metrics.items()}
            bad_terms.extend(k for k, v in values.items() if k.startswith("loss") and not math.isfinite(v))
            self.engine.backward(loss)
            if micro == self.cfg.train.grad_accum - 1 and self.cfg.train.zero_stage == 0:
                grads_ok = self._grads_finite_stage0()
                if not grads_ok or bad_terms:
                    self.engine.client_optimizer.skip_next = True  # engine.SkippableAdamW
            self.engine.step()
            # an fp16/bf16 wrapper that skipped on its own never called the inner step: do not carry the flag over
            self.engine.client_optimizer.skip_next = False
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + v / self.cfg.train.grad_accum
            n = int(batch["image_mask"].numel())
            self.samples_seen += n * self.info.world_size
            present = D.all_reduce_sum(torch.stack([batch[f"{m}_mask"].sum() for m in self.modality_counts]))
            for m, c in zip(self.modality_counts, present.tolist()):
                self.modality_counts[m] += int(c)
        self.step += 1
        nonfinite = bool(bad_terms) or not grads_ok or self.engine.skipped_steps > skipped_before
        self._count_nonfinite(nonfinite, bad_terms)
        totals["step_time"] = time.perf_counter() - t0
        totals["data_wait"] = data_wait
        totals["nonfinite_steps"] = self.nonfinite_total
        return totals

    def _count_nonfinite(self, nonfinite: bool, bad_terms: List[str]) -> None:
        if not nonfinite or self.cfg.train.precision == "fp16" and not bad_terms:
            self.nonfinite_run = 0  # fp16 loss-scale overflows are routine, not failures
            return
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        what = f"loss terms {sorted(set(bad_terms))}" if bad_terms else "gradient (all loss terms finite)"
        log.warning("step %d skipped: non-finite %s (%d in a row)", self.step, what, self.nonfinite_run)
        if self.nonfinite_run >= self.cfg.train.max_nonfinite_steps:
            raise NonFiniteError(
                f"{self.nonfinite_run} consecutive steps up to step {self.step} had a non-finite {what}; "
                f"stopping (train.max_nonfinite_steps={self.cfg.train.max_nonfinite_steps}). Last good checkpoint: "
                f"{ckpt_lib.find_resume(self.ckpt_root, 'auto')}")

    def _record(self, m: Dict[str, float]) -> Dict[str, Any]:
        mb = self.cfg.train.micro_batch_size * self.cfg.train.grad_accum * self.info.world_size
        rec: Dict[str, Any] = {"kind": "train", "step": self.step, "samples_seen": self.samples_seen}
        rec.update(m)
        rec["lr"] = self.scheduler.get_last_lr()[0]
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
            "nonfinite_total": self.nonfinite_total,
            "data_seed": self.data_seed,
            "origin": self.origin,
        }
        ckpt_lib.save(
            self.engine, self.ckpt_root, self.step, trainer_state, {"data": self.loader.state_dict()},
            self.config_yaml, self.cfg.train.keep_last,
        )
        self.last_saved_step = self.step

    def evaluate(self) -> Optional[Dict[str, Any]]:
        if not self.cfg.data.eval_urls:
            return None
        from mmpretrain.eval.runner import evaluate_retrieval

        kept: Dict[str, Any] = {}
        res = evaluate_retrieval(self.model, self.cfg, self.tokenizer, self.engine.device, self.dtype, keep=kept)
        from mmpretrain.evaluate import periodic_extras  # zero-shot, captioning, probe (cfg.eval)

        res.update(periodic_extras(self.model, self.cfg, self.tokenizer, self.engine.device, self.dtype,
                                   kept.get("embedded")))
        if self.info.is_main:
            from mmpretrain.evaluate import summary_lines

            for line in summary_lines(res):
                log.info("eval step %d: %s", self.step, line)
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
            if self.watcher.agreed():  # collective: every rank takes the same branch
                self.save()
                self.metrics.log({"kind": "preempted", "step": self.step, "reason": self.watcher.flag or "peer"},
                                 console=True)
                raise Preempted(f"preempted at step {self.step} ({self.watcher.flag or 'another rank'}); saved")
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < cfg.train.steps:
                self.evaluate()
            minutes = cfg.train.save_every_minutes
            due = bool(cfg.train.save_every and self.step % cfg.train.save_every == 0)
            if minutes > 0:  # clocks differ across ranks: any rank's deadline counts for all (save is collective)
                late = time.time() - last_save >= minutes * 60
                due = D.any_rank(late) or due
            if due and self.step < cfg.train.steps:
                self.save()
                last_save = time.time()
        if self.last_saved_step != self.step:  # the same on every rank (save is collective)
            self.save()
        result["after"] = self.evaluate()
        return result

    def close(self) -> None:
        """Idempotent: signal handlers, metrics file / wandb, loader workers."""
        if self._closed:
            return
        self._closed = True
        self.watcher.uninstall()
        self.metrics.close()
        self.loader.close()


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
        (Path(cfg.run.output_dir) / PREEMPTED_MARKER).unlink(missing_ok=True)  # this is the requeued run
    log.info("launcher=%s rank=%d/%d local_rank=%d", info.launcher, info.rank, info.world_size, info.local_rank)
    from mmpretrain.safe_load import UnsafeCheckpointError

    try:
        trainer = Trainer(cfg, info)
    except (UnsafeCheckpointError, FileNotFoundError) as e:  # every rank raises it together
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = trainer.run()
    except Preempted as e:
        log.warning("%s; exiting with code %d for requeue", e, REQUEUE_EXIT_CODE)
        if info.is_main:
            ckpt_lib.atomic_write(Path(cfg.run.output_dir) / PREEMPTED_MARKER, f"{trainer.step} {trainer.watcher.flag}\n")
        D.barrier()
        return REQUEUE_EXIT_CODE
    except NonFiniteError as e:
        log.error("%s", e)
        return NONFINITE_EXIT_CODE
    finally:
        trainer.close()
    if info.is_main and result.get("after"):
        from mmpretrain.eval.report import format_table

        print(format_table(result.get("before"), result["after"]))
    D.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
