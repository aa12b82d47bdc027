"""Train and eval loaders: each (rank, worker) slot yields whole batches tagged with its
state; the main process consumes workers round-robin, so its state_dict is exact."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .. import modalities as M
from ..config import Config, DataConfig, SourceConfig
from . import audio_augment
from .decode import DecodeError
from .samples import SampleProcessor, SourceSpec, collate, parse_source
from .shards import expand_urls, local_path, shard_problem, shard_sizes
from .streams import EpochLayout, ResampledLayout, WindowedStream, _rng
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)
STATE_VERSION = 1


class DataError(RuntimeError):
    """Too many bad samples, or a loader state that does not fit this run."""


@dataclass
class SourcePlan:
    spec: SourceSpec
    weight: float
    urls: List[str]
    sizes: List[Optional[int]]


@dataclass
class Plan:
    """Everything a worker needs (picklable; computed once in the main process)."""

    data: DataConfig
    tokenizer: Tokenizer
    sources: List[SourcePlan]
    seed: int
    batch_size: int
    rank: int
    world_size: int
    workers: int  # logical workers per rank (>= 1)
    train: bool
    resampled: bool
    window: int
    # the modalities the run has towers for (modalities.active): others are neither decoded nor batched
    active: Optional[Tuple[str, ...]] = None
    group_key: str = "group"  # the json field batched as `groups` (eval.probe_group_key)


def _plan_sources(sources: List[SourceConfig], resampled: bool) -> List[SourcePlan]:
    out = []
    for i, src in enumerate(sources):
        urls = expand_urls(src.urls)
        if not urls:
            raise DataError(f"source '{src.name}': urls '{src.urls}' match no shards")
        problems = []
        for u in urls:
            lp = local_path(u)
            p = shard_problem(lp) if lp is not None else None
            if p:
                problems.append((u, p))
        if problems and len(problems) == len(urls):
            u, p = problems[0]
            raise DataError(f"source '{src.name}': shard '{u}' {p}"
                            + (f" (and {len(problems) - 1} more shards like it)" if len(problems) > 1 else ""))
        for u, p in problems:  # read on: each epoch counts them as skipped 'not_a_tar'
            log.warning("source '%s': shard '%s' %s; its samples are skipped and counted as not_a_tar", src.name, u, p)
        sizes = shard_sizes(urls, getattr(src, "sizes", None), required=not resampled)
        if not resampled and sum(sizes) == 0:  # type: ignore[arg-type]
            raise DataError(f"source '{src.name}': its {len(urls)} shards hold no samples")
        out.append(SourcePlan(parse_source(src, i), float(src.weight), urls, sizes))
    return out


class SlotWorker:
    """One (rank, logical worker) slot: per-source streams, weighted mixing, filter ->
    tokenize -> decode, batching, skip counting and the error-rate ceiling."""

    def __init__(self, plan: Plan, worker: int, state: Optional[Dict[str, Any]] = None):
        self.plan, self.worker = plan, worker
        self.slot = plan.rank * plan.workers + worker
        n_slots = plan.world_size * plan.workers
        self.proc = SampleProcessor(plan.data, plan.tokenizer, plan.train, plan.active, group_key=plan.group_key)
        self.streams: List[WindowedStream] = []
        for sp in plan.sources:
            i = sp.spec.index
            if plan.resampled:
                layout: Any = ResampledLayout(sp.urls, sp.sizes, plan.seed, i, self.slot)
            else:
                layout = EpochLayout(sp.urls, sp.sizes, plan.seed, i, self.slot, n_slots,  # type: ignore[arg-type]
                                     shuffle=plan.train and plan.data.shard_shuffle, exact=not plan.train)
            self.streams.append(WindowedStream(layout, plan.window, plan.seed, i, self.slot, loop=plan.train))
        names = [sp.spec.name for sp in plan.sources]
        self.batch_idx = 0
        self.stats: Dict[str, Any] = {"seen": {n: 0 for n in names}, "samples": {n: 0 for n in names},
                                      "skipped": {n: {} for n in names}, "truncated": {n: 0 for n in names}}
        if state:
            self.batch_idx = int(state["batch"])
            for sp, st in zip(plan.sources, self.streams):
                st.load_state_dict(state["streams"][sp.spec.name])
            self.stats = _copy_stats(state["stats"])
        w = np.array([sp.weight for sp in plan.sources], dtype=np.float64)
        self.probs = w / w.sum()

    def state(self) -> Dict[str, Any]:
        return {"batch": self.batch_idx,
                "streams": {sp.spec.name: s.state_dict() for sp, s in zip(self.plan.sources, self.streams)},
                "epoch": {sp.spec.name: s.epoch for sp, s in zip(self.plan.sources, self.streams)},
                "stats": _copy_stats(self.stats)}

    def _next_example(self, k: int):
        name, stream, data = self.plan.sources[k].spec.name, self.streams[k], self.plan.data
        while True:
            item = next(stream)  # StopIteration ends an eval pass
            self.stats["seen"][name] += 1
            try:
                prep = self.proc.prepare(item.raw, self.plan.sources[k].spec)
                ex = self.proc.decode(prep, item.epoch, item.aug_seed)
            except DecodeError as e:
                skipped = self.stats["skipped"][name]
                skipped[e.reason] = skipped.get(e.reason, 0) + 1
                seen, bad = self.stats["seen"][name], sum(skipped.values())
                if seen >= data.min_samples_for_error_rate and bad > data.max_error_rate * seen:
                    raise DataError(
                        f"source '{name}': {bad} of {seen} samples bad ({skipped}) > data.max_error_rate="
                        f"{data.max_error_rate}; last bad sample '{item.raw.key}' in shard '{item.raw.url}' "
                        f"({e.reason}: {e.detail})") from None
                continue
            self.stats["samples"][name] += 1
            if prep.truncated:  # counted, never silent: a cut caption can make every caption look alike
                self.stats["truncated"][name] += 1
            return ex

    def batches(self) -> Iterator[Tuple[Optional[Dict[str, Any]], Dict[str, Any]]]:
        """Train: endless full batches. Eval: one pass, last batch partial, then (None, state)."""
        p = self.plan
        while True:
            if len(p.sources) == 1:
                choice = np.zeros(p.batch_size, dtype=np.int64)
            else:  # seeded by batch index so a resumed slot draws the same mix
                choice = _rng(p.seed, 41, self.slot, self.batch_idx).choice(len(p.sources), p.batch_size, p=self.probs)
            examples = []
            audio_augment.begin_batch()  # clips mix only within a batch: resume-exact
            try:
                for k in choice:
                    examples.append(self._next_example(int(k)))
            except StopIteration:
                if examples:
                    self.batch_idx += 1
                    yield collate(examples, p.data, p.tokenizer.pad_id, p.active), self.state()
                yield None, self.state()
                return
            self.batch_idx += 1
            yield collate(examples, p.data, p.tokenizer.pad_id, p.active), self.state()


def _copy_stats(s: Dict[str, Any]) -> Dict[str, Any]:
    return {"seen": dict(s["seen"]), "samples": dict(s["samples"]),
            "skipped": {k: dict(v) for k, v in s["skipped"].items()},
            "truncated": dict(s.get("truncated") or {k: 0 for k in s["seen"]})}  # older states lack it


class _SlotDataset(IterableDataset):
    """DataLoader process j runs logical worker (j + rotation) % W, so that after a resume
    the round-robin continues with the worker whose batch is due next."""

    def __init__(self, plan: Plan, states: List[Optional[Dict[str, Any]]], rotation: int):
        self.plan, self.states, self.rotation = plan, states, rotation

    def __iter__(self):
        info = get_worker_info()
        wid = info.id if info is not None else 0
        logical = (wid + self.rotation) % self.plan.workers
        worker = SlotWorker(self.plan, logical, self.states[logical])
        for batch, state in worker.batches():
            yield batch, logical, state


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding is per-sample work; many threads per worker only contend


def _make_loader(plan: Plan, states, rotation: int, num_workers: int) -> DataLoader:
    # its own generator: starting an iterator draws the workers' base seed, and from the global RNG
    # that draw came after a resume restored it, putting every later draw (dropout) one ahead
    gen = torch.Generator().manual_seed(int(plan.seed))
    return DataLoader(_SlotDataset(plan, states, rotation), batch_size=None, num_workers=num_workers,
                      worker_init_fn=_worker_init if num_workers else None, generator=gen,
                      prefetch_factor=2 if num_workers else None, collate_fn=_identity)


def _identity(x):
    return x


def _sum_stats(states: List[Optional[Dict[str, Any]]], names: List[str]) -> Dict[str, Any]:
    seen = {n: 0 for n in names}
    samples = {n: 0 for n in names}
    skipped: Dict[str, Dict[str, int]] = {n: {} for n in names}
    truncated = {n: 0 for n in names}
    epochs: Dict[str, int] = {n: 0 for n in names}
    first = True
    for st in states:
        if not st:
            continue
        for n in names:
            seen[n] += st["stats"]["seen"][n]
            samples[n] += st["stats"]["samples"][n]
            for r, c in st["stats"]["skipped"][n].items():
                skipped[n][r] = skipped[n].get(r, 0) + c
            truncated[n] += st["stats"].get("truncated", {}).get(n, 0)
            e = st.get("epoch", {}).get(n, 0)
            epochs[n] = e if first else min(epochs[n], e)
        first = False
    return {"samples": sum(samples.values()), "per_source": samples, "seen": seen, "skipped": skipped,
            "skipped_total": sum(sum(v.values()) for v in skipped.values()),
            "truncated": truncated, "truncated_total": sum(truncated.values()),
            "epoch": epochs[names[0]] if names else 0, "epoch_per_source": epochs}


def _fingerprint(cfg: Config, seed: int) -> Dict[str, Any]:
    d = cfg.data
    return {"sources": [{k: v for k, v in dataclasses.asdict(s).items()} for s in d.train],
            "seed": seed, "micro_batch_size": cfg.train.micro_batch_size,
            "shuffle_buffer": d.shuffle_buffer, "shard_shuffle": d.shard_shuffle, "resampled": d.resampled}


class TrainLoader:
    """Endless iterator of training batches for one rank, with exact resume.

    state_dict() is per rank (small, JSON-serializable): gather all ranks' dicts and save
    them, or save each rank's own; load_state_dict accepts either one rank's dict or
    {"ranks": [dict per rank]}. A state from another world size, worker count or data
    config is refused (DataError) - positions would not mean the same samples.

    `seed` seeds the data stream (shard order, shuffle buffers, mixing, augmentation); default
    cfg.run.seed. A trainer resuming on another world size passes a moved-on seed."""

    def __init__(self, cfg: Config, rank: int, world_size: int, tokenizer: Tokenizer, seed: Optional[int] = None):
        if not cfg.data.train:
            raise DataError("config key 'data.train' lists no sources")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.num_workers = int(cfg.data.num_workers)
        self.workers = max(1, self.num_workers)
        self.seed = int(cfg.run.seed if seed is None else seed)
        self.plan = Plan(data=cfg.data, tokenizer=tokenizer,
                         sources=_plan_sources(cfg.data.train, cfg.data.resampled), seed=self.seed,
                         batch_size=int(cfg.train.micro_batch_size), rank=rank, world_size=world_size,
                         workers=self.workers, train=True, resampled=bool(cfg.data.resampled),
                         window=int(cfg.data.shuffle_buffer), active=tuple(M.active_names(cfg)))
        self.names = [sp.spec.name for sp in self.plan.sources]
        self._states: List[Optional[Dict[str, Any]]] = [None] * self.workers
        self._consumed = 0
        self._it: Optional[Iterator] = None
        self._loader: Optional[DataLoader] = None

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> Dict[str, Any]:
        if self._it is None:
            self._loader = _make_loader(self.plan, list(self._states), self._consumed % self.workers, self.num_workers)
            self._it = iter(self._loader)
        batch, logical, state = next(self._it)
        expected = self._consumed % self.workers
        if logical != expected:  # would break exact resume; DataLoader order is round-robin
            raise DataError(f"batch came from worker {logical}, expected {expected}")
        self._states[logical] = state
        self._consumed += 1
        return batch

    def state_dict(self) -> Dict[str, Any]:
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                "num_workers": self.workers, "consumed": self._consumed, "config": _fingerprint(self.cfg, self.seed),
                "workers": [None if s is None else {k: s[k] for k in ("batch", "streams", "epoch", "stats")}
                            for s in self._states]}

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        if "ranks" in d:
            if len(d["ranks"]) != self.world_size:
                raise DataError(f"loader state was saved with world size {len(d['ranks'])}, this run has "
                                f"{self.world_size}; exact resume needs the same world size")
            d = d["ranks"][self.rank]
        if d.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {d.get('version')} is not {STATE_VERSION}")
        if d["world_size"] != self.world_size:
            raise DataError(f"loader state was saved with world size {d['world_size']}, this run has "
                            f"{self.world_size}; exact resume needs the same world size (or start the data fresh)")
        if d["num_workers"] != self.workers:
            raise DataError(f"loader state was saved with {d['num_workers']} data workers, this run has "
                            f"{self.workers} (data.num_workers); exact resume needs the same count")
        if d["rank"] != self.rank:
            raise DataError(f"loader state belongs to rank {d['rank']}, not rank {self.rank}")
        now = _fingerprint(self.cfg, self.seed)
        changed = [k for k in now if d["config"].get(k) != now[k]]
        if changed:
            raise DataError(f"data config changed since the loader state was saved ({', '.join(changed)}); "
                            f"exact resume is not possible")
        self.close()
        self._states = [None if s is None else dict(s) for s in d["workers"]]
        self._consumed = int(d["consumed"])

    def stats(self) -> Dict[str, Any]:
        """Cumulative over consumed batches: samples, per-source counts, skips per source and reason, epoch."""
        return _sum_stats(self._states, self.names)

    def close(self) -> None:
        it, self._it, self._loader = self._it, None, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def build_train_loader(cfg: Config, rank: int, world_size: int, tokenizer: Tokenizer, seed: Optional[int] = None) -> TrainLoader:
    """Endless batches of cfg.train.micro_batch_size for this rank (see TrainLoader); `seed`:
    the data seed, default cfg.run.seed."""
    return TrainLoader(cfg, rank, world_size, tokenizer, seed)


class EvalLoader:
    """One deterministic pass: no shuffle, eval transforms. Samples are split by index
    across ranks and workers (floor split): each sample exactly once overall; ranks may get
    counts differing by one sample, and the last batch of each worker may be partial."""

    def __init__(self, urls: str, cfg: Config, tokenizer: Tokenizer, batch_size: int, rank: int = 0,
                 world_size: int = 1, source: Optional[SourceConfig] = None):
        # `source`: optional SourceConfig giving member keys / required modalities / sizes
        src = dataclasses.replace(source, name="eval", urls=urls) if source is not None \
            else SourceConfig(name="eval", urls=urls)
        self.num_workers = int(cfg.data.num_workers)
        self.plan = Plan(data=cfg.data, tokenizer=tokenizer, sources=_plan_sources([src], False),
                         seed=int(cfg.run.seed), batch_size=int(batch_size), rank=rank, world_size=world_size,
                         workers=max(1, self.num_workers), train=False, resampled=False, window=1,
                         active=tuple(M.active_names(cfg)), group_key=cfg.eval.probe_group_key)
        self._states: List[Optional[Dict[str, Any]]] = [None] * self.plan.workers

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        self._states = [None] * self.plan.workers
        for batch, logical, state in _make_loader(self.plan, list(self._states), 0, self.num_workers):
            self._states[logical] = state
            if batch is not None:
                yield batch

    def stats(self) -> Dict[str, Any]:
        return _sum_stats(self._states, ["eval"])


def build_eval_loader(urls: str, cfg: Config, tokenizer: Tokenizer, batch_size: int, rank: int = 0,
                      world_size: int = 1, source: Optional[SourceConfig] = None) -> EvalLoader:
    """One deterministic pass over `urls` (see EvalLoader); iterate it again for another pass."""
    return EvalLoader(urls, cfg, tokenizer, batch_size, rank, world_size, source)
