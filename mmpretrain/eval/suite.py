"""The evaluation suite: one embed pass over an eval split (every rank its share, gathered),
shared by retrieval, zero-shot classification and linear probes; captioning decodes the split.
`mmpretrain.evaluate` is its command line and the trainer's periodic eval calls `periodic()`.

Under ZeRO-3 every forward is collective, so ranks with fewer batches run dummy forwards until
all ranks are done."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from mmpretrain import distributed as D
from mmpretrain import modalities as M
from mmpretrain.config import Config, GenerationConfig, SourceConfig
from mmpretrain.data.pipeline import DataError, build_eval_loader
from mmpretrain.data.shards import ShardError
from mmpretrain.eval.captioning import caption_split, captioning_report
from mmpretrain.eval.linear_probe import group_split, linear_probe_report
from mmpretrain.eval.retrieval import gather_features, retrieval_report
from mmpretrain.eval.zeroshot import class_embeddings, load_class_names, zeroshot_report

TASKS = ("retrieval", "zeroshot", "linear_probe", "captioning")
log = logging.getLogger("mmpretrain.eval")


@dataclass
class Embedded:
    """A split's embeddings, gathered over ranks in rank order (fp32, CPU)."""

    embeddings: Dict[str, torch.Tensor]  # modality -> (N, E)
    masks: Dict[str, torch.Tensor]  # modality -> (N,) bool
    labels: torch.Tensor  # (N,), -1 = none
    groups: Optional[torch.Tensor] = None  # (N,) hashed json group (eval.probe_group_key), -1 = none

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def all_labelled(self) -> bool:
        return len(self) > 0 and bool((self.labels >= 0).all())

    def media(self) -> Dict[str, torch.Tensor]:
        return {m: self.embeddings[m] for m in M.media_names() if m in self.embeddings}

    def cat(self, other: "Embedded") -> "Embedded":
        return Embedded({m: torch.cat([v, other.embeddings[m]]) for m, v in self.embeddings.items()},
                        {m: torch.cat([v, other.masks[m]]) for m, v in self.masks.items()},
                        torch.cat([self.labels, other.labels]), torch.cat([self.group_ids(), other.group_ids()]))

    def group_ids(self) -> torch.Tensor:
        return self.groups if self.groups is not None else torch.full_like(self.labels, -1)

    def head(self, n: int) -> "Embedded":
        return Embedded({m: v[:n] for m, v in self.embeddings.items()}, {m: v[:n] for m, v in self.masks.items()},
                        self.labels[:n], self.group_ids()[:n])


@dataclass
class EvalOptions:
    """What to compute; None = the run config's `eval.*` value."""

    tasks: Sequence[str] = TASKS
    batch_size: int = 64
    class_names: Optional[Sequence[str]] = None
    templates: Optional[Sequence[str]] = None
    probe_train_urls: Optional[str] = None  # default: the run's train shards, else a split of the eval data by group
    probe_train_max: Optional[int] = None  # cap on probe training samples (eval.probe_train_max)
    caption_samples: Optional[int] = None
    generation: Optional[GenerationConfig] = None
    caption_attributes: Optional[str] = None


@torch.no_grad()
def embed_split(model: torch.nn.Module, loader: Any, device: torch.device, dtype: torch.dtype,
                limit: Optional[int] = None) -> Embedded:
    """Every modality's embedding of this rank's samples (its first `limit` when given), then
    gathered over ranks."""
    was_training = model.training
    model.eval()
    names = [m for m in M.names() if m in model.towers]  # the modalities this model has towers for
    emb: Dict[str, List[torch.Tensor]] = {m: [] for m in names}
    masks: Dict[str, List[torch.Tensor]] = {m: [] for m in names}
    labels: List[torch.Tensor] = []
    groups: List[torch.Tensor] = []
    it = iter(loader)
    dummy = None
    seen = 0
    while True:
        batch = next(it, None) if limit is None or seen < limit else None
        done = torch.tensor([0.0 if batch is not None else 1.0])
        if D.all_reduce_sum(done).item() >= D.world_size():
            break
        if batch is not None:
            dummy = batch
        elif dummy is None:
            raise RuntimeError("this rank's eval shard is empty; use fewer processes or more eval shards")
        b = (batch if batch is not None else dummy).to(device, dtype)
        out = {m: model.encode(m, b.inputs[m], b.text_len if m == M.TEXT else None).float() for m in names}
        if batch is not None:
            for m in names:
                emb[m].append(out[m].cpu())
                masks[m].append(batch.masks[m].cpu())
            labels.append(batch.labels.cpu())
            groups.append(batch.groups.cpu() if batch.groups is not None else torch.full_like(labels[-1], -1))
            seen += len(batch)
    model.train(was_training)

    def cat(parts: List[torch.Tensor]) -> torch.Tensor:
        t = torch.cat(parts) if parts else torch.empty(0)
        return gather_features(t[:limit] if limit is not None else t)

    return Embedded({m: cat(v) for m, v in emb.items()}, {m: cat(v).bool() for m, v in masks.items()}, cat(labels),
                    cat(groups).long())


class EvalSuite:
    """Evaluation of one model: `run(urls, options)` (the CLI) or `periodic()` (the trainer)."""

    def __init__(self, model: torch.nn.Module, cfg: Config, tokenizer: Any, device: Optional[torch.device] = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.model, self.cfg, self.tokenizer, self.dtype = model, cfg, tokenizer, dtype
        self.device = device or next(model.parameters()).device

    def loader(self, urls: str, batch_size: int) -> Any:
        return build_eval_loader(urls, self.cfg, self.tokenizer, batch_size=batch_size, rank=D.rank(),
                                 world_size=D.world_size())

    def embed(self, urls: str, batch_size: int, limit: Optional[int] = None, loader: Any = None) -> Embedded:
        """The split's embeddings; `limit`: at most that many samples, each rank its first share."""
        per_rank = None if limit is None else -(-limit // D.world_size())
        e = embed_split(self.model, loader or self.loader(urls, batch_size), self.device, self.dtype, per_rank)
        return e if limit is None else e.head(limit)

    @torch.no_grad()
    def run(self, urls: str, opts: Optional[EvalOptions] = None) -> Dict[str, Any]:
        """Every requested task on the samples of `urls` (call on every rank).

        retrieval: R@1/5/10, median / mean rank per direction, class-level when every sample has a
        label (a hit is any item of the query's class) and instance-level (`retrieval_instance`).
        zeroshot: class names (default: classes.json beside the shards) x templates. linear_probe:
        scored on `urls`, trained on `probe_train_urls`, else on the config's data.train shards, else
        on the eval items of half of the groups (json eval.probe_group_key) and scored on the
        others; refused when none of these exists (a random half would put repeats on both sides).
        captioning: needs a decoder; `caption_samples` per modality (0 = all)."""
        opts = opts or EvalOptions()
        unknown = set(opts.tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)}; choose from {list(TASKS)}")
        was_training = self.model.training
        self.model.eval()
        try:
            return self._run(urls, opts)
        finally:
            self.model.train(was_training)

    def _run(self, urls: str, opts: EvalOptions) -> Dict[str, Any]:
        result: Dict[str, Any] = {}
        emb = self.embed(urls, opts.batch_size) if {"retrieval", "zeroshot", "linear_probe"} & set(opts.tasks) else None
        if emb is not None:
            result["num_samples"] = len(emb)
        if "retrieval" in opts.tasks:
            result["retrieval"] = retrieval_report(emb.embeddings, emb.masks, emb.labels if emb.all_labelled else None)
            if emb.all_labelled:
                result["retrieval_instance"] = retrieval_report(emb.embeddings, emb.masks, None)
        if "zeroshot" in opts.tasks:
            result["zeroshot"] = self._zeroshot(urls, emb, opts)
        if "linear_probe" in opts.tasks:
            result["linear_probe"] = self._probe(emb, opts)
        if "captioning" in opts.tasks:
            result["captioning"] = self._captioning(urls, opts)
        return result

    def _zeroshot(self, urls: str, emb: Embedded, opts: EvalOptions) -> Dict[str, Any]:
        names = list(opts.class_names) if opts.class_names else load_class_names(self.cfg.eval.class_names, urls)
        if not names:
            return {"skipped": "no class names (eval.class_names / --class-names, or classes.json beside the shards)"}
        if not bool((emb.labels >= 0).any()):
            return {"skipped": "no sample has a json label"}
        tmpl = list(opts.templates) if opts.templates else list(self.cfg.eval.templates)
        cls = class_embeddings(self.model, self.tokenizer, names, tmpl, self.cfg.data.text_max_len, self.device)
        rep = zeroshot_report(emb.media(), emb.masks, emb.labels, cls)
        rep["classes"] = names
        rep["templates"] = tmpl
        return rep

    def _probe(self, emb: Embedded, opts: EvalOptions) -> Dict[str, Any]:
        if not bool((emb.labels >= 0).any()):
            return {"skipped": "no sample has a json label"}
        cap = opts.probe_train_max if opts.probe_train_max is not None else self.cfg.eval.probe_train_max
        key = self.cfg.eval.probe_group_key
        if opts.probe_train_urls:
            train: Optional[Embedded] = self.embed(opts.probe_train_urls, opts.batch_size, cap)
            split: Dict[str, Any] = {"kind": "probe_train", "description": f"trained on {opts.probe_train_urls}"}
            if not bool((train.labels >= 0).any()):
                return {"skipped": f"no sample of --probe-train {opts.probe_train_urls} has a json label"}
            why = ""
        else:
            train, why = self._train_shards(opts.batch_size, cap)
            names = ", ".join(s.name for s in self.cfg.data.train)
            split = {"kind": "train_shards", "description": f"trained on the train shards (data.train: {names})"}
            if train is not None and not bool((train.labels >= 0).any()):
                train, why = None, "no sample of the data.train shards has a json label"
        if train is not None:
            both = train.cat(emb)
            tr_idx, te_idx = np.arange(len(train)), np.arange(len(train), len(both))
        else:
            g = emb.group_ids()
            if not bool((g >= 0).any()):
                msg = (f"linear probe refused: it needs training items disjoint from the scored ones, and {why}; "
                       f"no eval item has a json '{key}' field either. Pass --probe-train URLS, give the config "
                       f"readable data.train shards, or a json group field on each eval item (--probe-group-key / "
                       f"eval.probe_group_key; copies of an item share it). A random half of the eval items is not "
                       f"used: items repeated in the eval set would fall on both sides")
                log.warning(msg)
                return {"refused": msg}
            both = emb
            tr_idx, te_idx = group_split(emb.labels.tolist(), g.tolist(), 0.5, seed=self.cfg.run.seed)
            split = {"kind": "group", "description": f"eval items split by json '{key}' ({why})", "group_key": key,
                     "num_groups_train": int(g[tr_idx].unique().numel()),
                     "num_groups_test": int(g[te_idx].unique().numel()), "num_ungrouped": int((g < 0).sum())}
        labelled = (both.labels >= 0).numpy()
        split.update(num_train=int(labelled[tr_idx].sum()), num_test=int(labelled[te_idx].sum()))
        num_classes = max(int(both.labels.max()) + 1, len(opts.class_names or []))
        rep: Dict[str, Any] = linear_probe_report(both.media(), both.masks, both.labels, num_classes, tr_idx, te_idx,
                                                  fuse=list(both.media()))
        rep["split"] = split
        return rep

    def _train_shards(self, batch_size: int, cap: int) -> Tuple[Optional[Embedded], str]:
        """Up to `cap` samples of the config's data.train shards (the cap shared evenly by the
        sources), or (None, why not) when there are none or a source cannot be read here."""
        srcs: List[SourceConfig] = list(self.cfg.data.train)
        if not srcs:
            return None, "the config has no data.train shards"
        loaders, why = [], ""
        for src in srcs:
            try:
                loaders.append(build_eval_loader(src.urls, self.cfg, self.tokenizer, batch_size=batch_size,
                                                 rank=D.rank(), world_size=D.world_size(), source=src))
            except (DataError, ShardError, OSError, ValueError) as e:
                why = f"data.train source '{src.name}' ({src.urls}) cannot be read here: {e}"
                break
        # every rank takes the same branch (each embeds collectively), so one unreadable rank stops all
        if D.all_reduce_sum(torch.tensor([0.0 if why else 1.0])).item() < D.world_size():
            return None, why or "data.train cannot be read on another rank"
        per = -(-cap // len(srcs))
        parts = [self.embed(src.urls, batch_size, per, ld) for src, ld in zip(srcs, loaders)]
        out = parts[0]
        for p in parts[1:]:
            out = out.cat(p)
        return out.head(cap), ""

    def _captioning(self, urls: str, opts: EvalOptions) -> Dict[str, Any]:
        if getattr(self.model, "decoder", None) is None:
            return {"skipped": "model has no caption decoder (model.text.decoder_depth = 0)"}
        ev = self.cfg.eval
        n = ev.caption_samples if opts.caption_samples is None else opts.caption_samples
        recs = caption_split(self.model, self.loader(urls, opts.batch_size), self.tokenizer, self.device, self.dtype,
                             opts.generation or ev.generation, n)
        return captioning_report(recs, opts.caption_attributes or ev.caption_attributes)

    def periodic(self) -> Dict[str, Any]:
        """The eval during training on `data.eval_urls`: retrieval plus what `cfg.eval` turns on
        (zero-shot, linear probe, captioning), flat 'zeroshot/image/accuracy'-style keys with the
        retrieval keys at the top level, plus a few generated captions."""
        ev = self.cfg.eval
        has_decoder = getattr(self.model, "decoder", None) is not None
        tasks = ["retrieval"] + [t for t, on in (("zeroshot", ev.zeroshot), ("linear_probe", ev.linear_probe),
                                                 ("captioning", ev.captioning and has_decoder)) if on]
        res = self.run(self.cfg.data.eval_urls, EvalOptions(tasks=tasks, batch_size=self.cfg.train.micro_batch_size))
        res.pop("num_samples", None)
        res.pop("retrieval_instance", None)
        flat = dict(res.pop("retrieval"))
        flat.update({k: v for k, v in flatten(res).items() if "confusion_matrix" not in k})
        for m, r in res.get("captioning", {}).items():
            if isinstance(r, dict) and r.get("examples"):
                flat[f"captioning/{m}/examples"] = [f"{e['prediction']} | {e['reference']}" for e in r["examples"][:4]]
        return flat


def summary_lines(flat: Dict[str, Any]) -> List[str]:
    """Console lines for a flat eval record: zero-shot / probe accuracy, caption scores and examples."""
    lines = []
    for m in M.media_names():
        parts = [f"{name} {flat[k]:.3f}" for name, k in (
            ("zero-shot acc", f"zeroshot/{m}/accuracy"), ("zero-shot F1", f"zeroshot/{m}/macro_f1"),
            ("probe acc", f"linear_probe/{m}/accuracy"), ("caption BLEU", f"captioning/{m}/BLEU"),
            ("CIDEr", f"captioning/{m}/CIDEr"), ("attributes", f"captioning/{m}/attribute_accuracy/all"))
            if k in flat]
        if parts:
            lines.append(f"{m}: " + ", ".join(parts))
        for ex in flat.get(f"captioning/{m}/examples", [])[:4]:
            lines.append(f"{m} caption: {json.dumps(ex, ensure_ascii=False)}")  # escapes control bytes
    return lines


def flatten(res: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested result -> flat 'a/b/c' keys with numbers only (for metrics.jsonl)."""
    out: Dict[str, Any] = {}
    for k, v in res.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
    return out
