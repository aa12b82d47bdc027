"""The evaluation suite: one embed pass over an eval split (every rank its share, gathered),
shared by retrieval, zero-shot classification and linear probes; captioning decodes the split.
`mmpretrain.evaluate` is its command line and the trainer's periodic eval calls `periodic()`.

Under ZeRO-3 every forward is collective, so ranks with fewer batches run dummy forwards until
all ranks are done."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

from mmpretrain import distributed as D
from mmpretrain import modalities as M
from mmpretrain.config import Config, GenerationConfig
from mmpretrain.data.pipeline import build_eval_loader
from mmpretrain.eval.captioning import caption_split, captioning_report
from mmpretrain.eval.linear_probe import linear_probe_report, stratified_split
from mmpretrain.eval.retrieval import gather_features, retrieval_report
from mmpretrain.eval.zeroshot import class_embeddings, load_class_names, zeroshot_report

TASKS = ("retrieval", "zeroshot", "linear_probe", "captioning")


@dataclass
class Embedded:
    """A split's embeddings, gathered over ranks in rank order (fp32, CPU)."""

    embeddings: Dict[str, torch.Tensor]  # modality -> (N, E)
    masks: Dict[str, torch.Tensor]  # modality -> (N,) bool
    labels: torch.Tensor  # (N,), -1 = none

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
                        torch.cat([self.labels, other.labels]))


@dataclass
class EvalOptions:
    """What to compute; None = the run config's `eval.*` value."""

    tasks: Sequence[str] = TASKS
    batch_size: int = 64
    class_names: Optional[Sequence[str]] = None
    templates: Optional[Sequence[str]] = None
    probe_train_urls: Optional[str] = None  # default: a stratified half of the eval split
    caption_samples: Optional[int] = None
    generation: Optional[GenerationConfig] = None
    caption_attributes: Optional[str] = None


@torch.no_grad()
def embed_split(model: torch.nn.Module, loader: Any, device: torch.device, dtype: torch.dtype) -> Embedded:
    """Every modality's embedding of this rank's samples, then gathered over ranks."""
    was_training = model.training
    model.eval()
    names = [m for m in M.names() if m in model.towers]  # the modalities this model has towers for
    emb: Dict[str, List[torch.Tensor]] = {m: [] for m in names}
    masks: Dict[str, List[torch.Tensor]] = {m: [] for m in names}
    labels: List[torch.Tensor] = []
    it = iter(loader)
    dummy = None
    while True:
        batch = next(it, None)
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
    model.train(was_training)

    def cat(parts: List[torch.Tensor]) -> torch.Tensor:
        return gather_features(torch.cat(parts) if parts else torch.empty(0))

    return Embedded({m: cat(v) for m, v in emb.items()}, {m: cat(v).bool() for m, v in masks.items()}, cat(labels))


class EvalSuite:
    """Evaluation of one model: `run(urls, options)` (the CLI) or `periodic()` (the trainer)."""

    def __init__(self, model: torch.nn.Module, cfg: Config, tokenizer: Any, device: Optional[torch.device] = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.model, self.cfg, self.tokenizer, self.dtype = model, cfg, tokenizer, dtype
        self.device = device or next(model.parameters()).device

    def loader(self, urls: str, batch_size: int) -> Any:
        return build_eval_loader(urls, self.cfg, self.tokenizer, batch_size=batch_size, rank=D.rank(),
                                 world_size=D.world_size())

    def embed(self, urls: str, batch_size: int) -> Embedded:
        return embed_split(self.model, self.loader(urls, batch_size), self.device, self.dtype)

    @torch.no_grad()
    def run(self, urls: str, opts: Optional[EvalOptions] = None) -> Dict[str, Any]:
        """Every requested task on the samples of `urls` (call on every rank).

        retrieval: R@1/5/10, median / mean rank per direction, class-level when every sample has a
        label (a hit is any item of the query's class) and instance-level (`retrieval_instance`).
        zeroshot: class names (default: classes.json beside the shards) x templates. linear_probe:
        trained on `probe_train_urls`, else on a stratified half of `urls`, tested on the rest.
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
        if opts.probe_train_urls:
            train = self.embed(opts.probe_train_urls, opts.batch_size)
            both = train.cat(emb)
            tr_idx = torch.arange(len(train)).numpy()
            te_idx = torch.arange(len(train), len(both)).numpy()
            split = f"train on {opts.probe_train_urls}"
        else:
            both = emb
            tr_idx, te_idx = stratified_split(emb.labels.tolist(), 0.5, seed=self.cfg.run.seed)
            split = "stratified 50/50 split of the eval data"
        num_classes = max(int(both.labels.max()) + 1, len(opts.class_names or []))
        rep: Dict[str, Any] = linear_probe_report(both.media(), both.masks, both.labels, num_classes, tr_idx, te_idx,
                                                  fuse=list(both.media()))
        rep["split"] = split
        return rep

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
