"""The trainer: builds the model, the DeepSpeed engine, the loader and the checkpoint manager from a
validated config, and runs the loop (steps, logging, preemption, eval, saves)."""
from __future__ import annotations

import contextlib
import logging
import math
import random
import socket
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from mmpretrain import lifecycle  # notes the launcher's pid at import (lifecycle.PARENT_AT_IMPORT)
from mmpretrain import checkpoint as ckpt_lib
from mmpretrain import distributed as D
from mmpretrain import console, faults, host_malloc, modalities, preemption
from mmpretrain.config import Config, dtype_of, to_yaml
from mmpretrain.budget import WallClockBudget
from mmpretrain.data.pipeline import build_train_loader
from mmpretrain.data.hf_tokenizer import tokenizer_for
from mmpretrain.ema import WeightEMA
from mmpretrain.engine import build_engine, set_schedule_total
from mmpretrain.eval.report import format_table
from mmpretrain.eval.suite import EvalSuite, summary_lines
from mmpretrain.feature_cache import FeatureCache
from mmpretrain.logging import MetricsLogger, setup_logging
from mmpretrain.models import build_model, zero3
from mmpretrain.models.compile import compile_towers
from mmpretrain.models.hf import save_tower_assets
from mmpretrain.preemption import PREEMPTED_MARKER, REQUEUE_EXIT_CODE, PreemptionWatcher
from mmpretrain.safe_load import UnsafeCheckpointError
from mmpretrain.throughput import FlopMeter, peak_memory_mib

log = logging.getLogger("mmpretrain.train")

NONFINITE_EXIT_CODE = 3


class Preempted(Exception):
    """Every rank saw the preemption flag and the checkpoint is saved."""


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Owns the engine, the loader and the counters; `run()` is the loop."""

    def __init__(self, cfg: Config, info: D.DistInfo, watcher: Optional[PreemptionWatcher] = None,
                 watchdog: Optional[lifecycle.Watchdog] = None) -> None:
        self.cfg, self.info = cfg, info
        self.watchdog = watchdog
        self.out = Path(cfg.run.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.tokenizer = tokenizer_for(cfg)  # data.tokenizer, or an HF text tower's own
        seed_everything(cfg.run.seed)  # identical initial weights on every rank
        # resume (what, how: exact / universal / weights only) and save cadence: mmpretrain.checkpoint
        self.checkpointer = ckpt_lib.CheckpointManager(cfg, info, self.ckpt_root)
        with zero3.construction(cfg, info.world_size) as partitioned:  # ZeRO-3: no rank holds the whole model
            model = build_model(cfg, self.tokenizer.vocab_size)
        if partitioned:
            local, full = zero3.local_and_full_numel(model)
            log.info("model built under deepspeed.zero.Init: this rank holds %d of %d parameters", local, full)
        self.checkpointer.prepare_model(model)  # a weights-only resume loads here, before ZeRO partitions
        self.engine, self.optimizer, self.scheduler = build_engine(
            cfg, model, info.world_size, load_universal=self.checkpointer.load_universal)
        self.ema: Optional[WeightEMA] = None
        if cfg.train.ema.enabled:  # fp32 copy of the trainable weights on the device; the checkpoint restores it
            e = cfg.train.ema
            self.ema = WeightEMA(model, e.decay, e.warmup, e.every)
            self.checkpointer.ema = self.ema
        compile_towers(model, cfg.train.compile, self.engine.device)  # in place, on the device the engine chose
        self.dtype = dtype_of(cfg.train.precision)
        seed_everything(cfg.run.seed + 1000 * info.rank)  # per-rank streams (dropout, augment)
        # built before the checkpoint restores the RNG, as in an uninterrupted run
        self.loader = build_train_loader(cfg, info.rank, info.world_size, self.tokenizer,
                                         seed=self.checkpointer.data_seed)
        self.modality_counts = {m: 0 for m in modalities.names()}
        progress = self.checkpointer.load(self.engine, self.scheduler, self.loader)
        self.step, self.samples_seen = progress.step, progress.samples_seen
        self.modality_counts.update(progress.modality_counts)
        self.nonfinite_total, self.nonfinite_run = progress.nonfinite_total, 0
        # train.max_minutes: the loop's clock (earlier sessions included) and the run's step count
        self.budget = WallClockBudget(cfg.train.max_minutes, cfg.train.steps, progress.train_seconds,
                                      progress.schedule_total)
        self.total_steps = self.budget.total
        self._closed = False
        self.metrics = MetricsLogger(cfg, info.rank, self.total_steps, start_step=self.step)
        self.session_start_samples = self.samples_seen  # the end-of-run summary's samples/s counts this session's
        self.flops = FlopMeter(cfg.train.peak_tflops)
        self._truncation_warned: set = set()  # sources already warned about (_warn_truncation)
        if watcher is None:  # run() installs it first thing (a signal during start-up is kept)
            watcher = preemption.install_early()
        watcher.set_margin(cfg.train.preempt_margin_minutes * 60)
        self.watcher = watcher

    @property
    def model(self):
        return self.engine.module.model

    # ------------------------------------------------------------------ pieces
    def _next_batch(self) -> modalities.Batch:
        batch = next(self.loader).to(self.engine.device, self.dtype)
        faults.point("train.batch", step=self.step + 1, batch=batch, rank=self.info.rank)  # NaN tests poison it
        return batch

    def _grads_finite_stage0(self) -> bool:
        """ZeRO 1-3 skip non-finite gradients themselves; stage 0 hands them to torch."""
        finite = [torch.isfinite(p.grad).all() for p in self.engine.module.parameters() if p.grad is not None]
        bad = bool(finite) and not bool(torch.stack(finite).all())  # one host sync, not one per parameter
        return not D.any_rank(bad)

    def train_step(self) -> Dict[str, float]:
        faults.point("train.step_start", step=self.step + 1, rank=self.info.rank)  # hang tests
        t0 = time.perf_counter()
        data_wait = 0.0
        totals: Dict[str, float] = {}
        bad_terms: List[str] = []
        skipped_before = self.engine.skipped_steps
        grads_ok = True
        cache = None
        if self.cfg.loss.feature_cache:  # exact big-batch contrastive gradient (mmpretrain.feature_cache)
            td = time.perf_counter()
            pending = [self._next_batch() for _ in range(self.cfg.train.grad_accum)]
            data_wait += time.perf_counter() - td
            cache = FeatureCache.build(self.model, pending)
        for micro in range(self.cfg.train.grad_accum):
            td = time.perf_counter()
            batch = cache.batches[micro] if cache is not None else self._next_batch()
            data_wait += time.perf_counter() - td
            with self.flops.counting(len(batch)):  # once per process: FLOPs of a forward + backward
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
                    self.engine.client_optimizer.skip_next_step()  # engine.SkippableAdamW
            self.engine.step()
            # an fp16/bf16 wrapper that skipped on its own never called the inner step: do not carry the flag over
            self.engine.client_optimizer.clear_skip()
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + v / self.cfg.train.grad_accum
            n = len(batch)
            self.samples_seen += n * self.info.world_size
            present = D.all_reduce_sum(torch.stack([batch.masks[m].sum() for m in self.modality_counts]))
            for m, c in zip(self.modality_counts, present.tolist()):
                self.modality_counts[m] += int(c)
        self.step += 1
        nonfinite = bool(bad_terms) or not grads_ok or self.engine.skipped_steps > skipped_before
        if self.ema is not None and not nonfinite:  # a skipped step changed no weight: nor the EMA
            self.ema.update(self.step)
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
                f"{self.checkpointer.latest()}")

    def _record(self, m: Dict[str, float]) -> Dict[str, Any]:
        mb = self.cfg.train.micro_batch_size * self.cfg.train.grad_accum * self.info.world_size
        rec: Dict[str, Any] = {"kind": "train", "step": self.step, "samples_seen": self.samples_seen}
        rec.update(m)
        rec["lr"] = self.scheduler.get_last_lr()[0]
        gn = self.engine.get_global_grad_norm()
        rec["grad_norm"] = float(gn) if gn is not None else None
        rec["samples_per_s"] = mb / max(m["step_time"], 1e-9)
        rec["samples_per_s_per_device"] = rec["samples_per_s"] / self.info.world_size
        rec.update(self.flops.figures(rec["samples_per_s_per_device"]))  # FLOPs / sample, TFLOP/s, MFU
        rec["peak_mem_mib"] = peak_memory_mib(self.engine.device)
        rec["peak_mem_kind"] = "cuda_allocated" if self.engine.device.type == "cuda" else "host_rss"
        stats = self.loader.stats()
        for k, v in stats.items():
            rec[f"data/{k}"] = v
        self._warn_truncation(stats)
        return rec

    TRUNCATION_WARN_SHARE = 0.2  # a source whose captions are cut this often is warned about (once)

    def _warn_truncation(self, stats: Dict[str, Any]) -> None:
        """Captions longer than data.text_max_len are cut at the end; when many are, captions that
        share their opening words all look alike and the contrastive loss can sit at ln(batch)."""
        for name, cut in stats.get("truncated", {}).items():
            seen = stats.get("per_source", {}).get(name, 0)
            if name in self._truncation_warned or seen < 64 or cut <= self.TRUNCATION_WARN_SHARE * seen:
                continue
            self._truncation_warned.add(name)
            hint = (" (data.tokenizer is 'bytes': one token per byte; a BPE tokenizer, tools/train_tokenizer.py, "
                    "fits far more text in the same context)" if self.cfg.data.tokenizer == "bytes" else "")
            log.warning("source '%s': %d of %d captions (%.0f%%) are longer than data.text_max_len=%d tokens and were "
                        "cut at the end; captions that then look alike leave nothing to tell apart: raise "
                        "data.text_max_len%s", name, cut, seen, 100 * cut / seen, self.cfg.data.text_max_len, hint)

    def progress(self) -> ckpt_lib.Progress:
        """The counters a checkpoint carries (the manager adds the rest)."""
        decided = self.budget.total if self.cfg.train.max_minutes > 0 and self.budget.decided else None
        return ckpt_lib.Progress(step=self.step, samples_seen=self.samples_seen,
                                 modality_counts=dict(self.modality_counts), nonfinite_total=self.nonfinite_total,
                                 train_seconds=self.budget.elapsed(), schedule_total=decided)

    def _beat(self) -> None:
        if self.watchdog is not None:
            self.watchdog.beat()

    def evaluate(self) -> Optional[Dict[str, Any]]:
        if not self.cfg.data.eval_urls:
            return None
        t0 = time.perf_counter()
        use_ema = self.ema is not None and self.cfg.eval.use_ema
        with self.ema.swapped_in() if use_ema else contextlib.nullcontext():  # eval.use_ema: score the EMA
            res = EvalSuite(self.model, self.cfg, self.tokenizer, self.engine.device, self.dtype).periodic()
        self.budget.note_eval(time.perf_counter() - t0)
        self._beat()
        if self.info.is_main:
            headline = console.eval_headline(res)  # R@1 of each direction, zero-shot accuracy
            if headline:
                log.info("eval step %d: %s", self.step, headline)
            for line in summary_lines(res):
                log.info("eval step %d: %s", self.step, line)
        self.metrics.log({"kind": "eval", "step": self.step, **res}, console=False)
        return res

    # ------------------------------------------------------------------ loop
    def run(self) -> Dict[str, Any]:
        cfg = self.cfg
        result: Dict[str, Any] = {}
        if self.watchdog is not None:
            self.watchdog.arm()  # train.hang_timeout_minutes counts from here
        if self.watcher.agreed():  # a signal during start-up: nothing new was trained, nothing to save
            self._preempted(saved=False)
        self.budget.start()  # train.max_minutes counts from here (start-up excluded)
        if self.step == 0 and cfg.data.eval_urls:
            result["before"] = self.evaluate()
        while self.step < self.total_steps:
            m = self.train_step()
            self._beat()
            if self.budget.observe():  # the same step on every rank: the decision is collective
                self._apply_budget()
            if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
                self.metrics.log(self._record(m))
            if self.watcher.agreed():  # collective: every rank takes the same branch
                self.checkpointer.save_now(self.step, self.progress)
                self._preempted(saved=True)
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < self.total_steps:
                self.evaluate()
            t0 = time.perf_counter()
            if self.checkpointer.save(self.step, self.progress) is not None:  # collective; when due (train.save_every*)
                self.budget.note_save(time.perf_counter() - t0)
            self._beat()
        self.checkpointer.save(self.step, self.progress, last=True)  # unless this step is saved already
        self._beat()
        result["after"] = self.evaluate()
        return result

    def _apply_budget(self) -> None:
        """train.max_minutes: fix the run's step count from the measured step time and end the LR
        schedule's cosine at it (the total is saved in every checkpoint from now on)."""
        total = self.budget.decide(self.step, self.cfg.train.eval_every, self.cfg.train.save_every)
        if total != self.total_steps:
            set_schedule_total(self.scheduler, self.cfg, total)
            self.total_steps = self.metrics.total = total
        self.metrics.log({"kind": "budget", "step": self.step, "total_steps": total, "train_steps": self.cfg.train.steps,
                          "budget_s": self.budget.budget_s, "elapsed_s": self.budget.elapsed(),
                          "step_s": self.budget.step_s}, console=False)

    def _preempted(self, saved: bool) -> None:
        rec = {"kind": "preempted", "step": self.step, "reason": self.watcher.describe(),
               "signal": self.watcher.source[0] if self.watcher.source else None,
               "signal_rank": self.watcher.source[1] if self.watcher.source else None, "saved": saved}
        self.metrics.log(rec, console=True)
        what = "saved" if saved else f"nothing new trained, not saved (last checkpoint: {self.checkpointer.latest()})"
        raise Preempted(f"preempted at step {self.step} ({self.watcher.describe()}); {what}")

    def summarize(self, status: str) -> None:
        """Rank 0: the end-of-run summary block and metrics.jsonl's summary record (mmpretrain.console).
        A report only: whatever goes wrong in it is logged, never changes how the run ends."""
        try:
            self.metrics.finish(status, self.step, self.samples_seen, self.samples_seen - self.session_start_samples,
                                self.info.world_size, self.checkpointer.latest() if self.info.is_main else None)
        except Exception as e:  # noqa: BLE001 - e.g. a full disk under metrics.jsonl
            log.warning("end-of-run summary failed: %s: %s", type(e).__name__, e)

    def close(self) -> None:
        """Idempotent: signal handlers, metrics file / wandb, loader workers."""
        if self._closed:
            return
        self._closed = True
        # the preemption handlers stay: a TERM during teardown (after the final save) only sets the
        # flag, which nothing reads any more, so the run still ends with its own exit code
        self.checkpointer.close()  # train.async_save: a pending background write is committed first
        self.metrics.close()
        self.loader.close()


def run(cfg: Config) -> int:
    """Every rank: discover the launch, start the process group, train; the process exit code.

    Exit codes: 0 done, 2 refused (launch, run directory in use, unsafe or missing checkpoint),
    3 non-finite, 75 preempted (REQUEUE_EXIT_CODE), 76 a peer rank was lost
    (lifecycle.PEER_LOST_EXIT_CODE), 79 hang watchdog (lifecycle.HANG_EXIT_CODE)."""
    # first: a USR1/TERM from here on is recorded (exit 75 at the first step boundary), not fatal
    watcher = preemption.install_early()
    try:
        info = D.discover()
    except D.LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parent = None
    if info.launcher != "single":  # a launcher started us: die with it (a lone run may outlive its shell)
        lifecycle.die_with_parent(lifecycle.PARENT_AT_IMPORT)
        parent = lifecycle.PARENT_AT_IMPORT
    torch.set_num_threads(max(1, torch.get_num_threads() // max(info.local_world_size, 1)))
    with preemption.exit_on_signal_while_blocked("the rendezvous"):  # a blocked C call: handlers cannot run
        D.init(info, timeout_minutes=cfg.train.dist_timeout_minutes)  # DeepSpeed wants a process group even for one
    out = Path(cfg.run.output_dir)
    lock = lifecycle.RunLock(out)
    busy: Optional[BaseException] = None
    if info.is_main:  # one writer per run directory, taken before anything is written
        try:
            lock.acquire()
        except (lifecycle.RunDirBusy, OSError) as e:
            busy = e
    if D.any_rank(busy is not None):
        if busy is not None:
            print(f"error: {busy}", file=sys.stderr)
        return 2
    try:
        return _run_locked(cfg, info, watcher, lock, parent)
    finally:
        lock.release()


def _run_locked(cfg: Config, info: D.DistInfo, watcher: PreemptionWatcher, lock: lifecycle.RunLock,
                parent: Optional[int]) -> int:
    out = Path(cfg.run.output_dir)
    setup_logging(cfg.run.output_dir, info.rank)
    if cfg.train.keep_host_memory:  # before the model and the loader workers allocate (forked workers inherit it)
        log.info(host_malloc.keep_freed_memory())
    if lock.took_over:
        log.warning("took over the run directory lock of %s: %s", lifecycle.RunLock.describe(lock.took_over),
                    lock.took_over["why"])
    if info.is_main:
        (out / "config.yaml").write_text(to_yaml(cfg))
        save_tower_assets(cfg, out)  # HF towers' configs / tokenizer / processor: checkpoints rebuild without hf_path
        (out / PREEMPTED_MARKER).unlink(missing_ok=True)  # this is the requeued run
    log.info("launcher=%s rank=%d/%d local_rank=%d host=%s master=%s:%s", info.launcher, info.rank, info.world_size,
             info.local_rank, socket.gethostname(), info.master_addr, info.master_port)
    watchdog = lifecycle.Watchdog(info.rank, info.world_size, out / "logs",
                                  hang_timeout_s=cfg.train.hang_timeout_minutes * 60, parent=parent).start()
    trainer: Optional[Trainer] = None
    try:
        faults.point("train.startup", rank=info.rank)
        try:
            trainer = Trainer(cfg, info, watcher=watcher, watchdog=watchdog)
        except (UnsafeCheckpointError, FileNotFoundError) as e:  # every rank raises it together
            log.error("%s", e)
            print(f"error: {e}", file=sys.stderr)
            return 2
        try:
            result = trainer.run()
            if info.is_main and result.get("after"):
                print(format_table(result.get("before"), result["after"]), flush=True)
            trainer.summarize("completed")
        except Preempted as e:
            trainer.summarize("preempted")
            log.warning("%s; exiting with code %d for requeue", e, REQUEUE_EXIT_CODE)
            if info.is_main:
                src = watcher.source or (watcher.flag, info.rank)
                ckpt_lib.atomic_write(out / PREEMPTED_MARKER,
                                      f"step={trainer.step} signal={src[0]} rank={src[1]}\n")
            D.barrier()
            watcher.ignore_from_now()
            return REQUEUE_EXIT_CODE
        except NonFiniteError as e:
            trainer.summarize("stopped: non-finite")
            log.error("%s", e)
            return NONFINITE_EXIT_CODE
        except ckpt_lib.CheckpointWriteError as e:  # every rank raises it together; the partial save is removed
            log.error("%s", e)
            return ckpt_lib.CHECKPOINT_WRITE_EXIT_CODE
        finally:
            trainer.close()
        D.barrier()
        faults.point("train.teardown", rank=info.rank)
        if watcher.flag:
            log.info("%s arrived after the final save; the run is complete", watcher.flag)
        watcher.ignore_from_now()
        return 0
    except Exception as e:  # noqa: BLE001 - a collective failed because a peer is gone: say which, exit 76
        if info.world_size == 1 or not lifecycle.looks_like_peer_loss(e):
            raise
        return _peer_lost(e, info, watchdog, cfg)
    finally:
        watchdog.stop()


def _peer_lost(e: BaseException, info: D.DistInfo, watchdog: lifecycle.Watchdog, cfg: Config) -> int:
    lost = watchdog.lost_ranks()
    if lost is None:
        who = "the rendezvous store is unreachable (rank 0 or the launcher is gone)"
    elif lost:
        who = "lost rank " + ", ".join(map(str, lost)) + " (its heartbeat stopped)"
    else:
        who = "a peer rank failed or stopped answering (every heartbeat is alive)"
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    msg = (f"rank {info.rank}: {who}; a collective failed after at most train.dist_timeout_minutes="
           f"{cfg.train.dist_timeout_minutes:g}: {type(e).__name__}: {first}; exiting with "
           f"{lifecycle.PEER_LOST_EXIT_CODE} (resume from the last checkpoint)")
    log.error("%s", msg)
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return lifecycle.PEER_LOST_EXIT_CODE
