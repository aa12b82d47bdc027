"""Exact large-batch contrastive gradients under gradient accumulation (GradCache-style).

A no-grad pass embeds every micro-batch of the optimizer step and caches the features. The
big-batch loss over the cached set (all micro-batches of all ranks) is computed once, with its
gradient with respect to every cached row. Each micro-batch is then recomputed with gradient
and back-propagated through <live features, cached row gradients>: the chain rule gives its
exact share of the big-batch gradient, so the sum over micro-batches is the big-batch
gradient, at the cost of one loss per step instead of one per micro-batch. DeepSpeed divides
each micro-batch's loss by grad_accum; the surrogate is multiplied back, and the temperature
(live in every micro-batch) gets 1/grad_accum of its gradient each time.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Tuple

import torch

from mmpretrain import distributed as D
from mmpretrain import modalities as M
from mmpretrain.losses import caption_token_count
from mmpretrain.models.model import ModelOutput


def _rng_devices() -> List[int]:
    return [torch.cuda.current_device()] if torch.cuda.is_available() else []


@dataclass
class FeatureCache:
    """The micro-batches of one optimizer step and their cached features (this rank's)."""

    batches: List[M.Batch]
    features: Dict[str, torch.Tensor]  # m -> (sum n_i, E) fp32, no grad
    masks: Dict[str, torch.Tensor]  # m -> (sum n_i,) bool
    offsets: List[int]  # row offset of micro-batch i
    rng_states: List[Tuple[torch.Tensor, List[torch.Tensor]]] = field(default_factory=list)
    caption_denominator: torch.Tensor | None = None  # global caption tokens of the step / grad_accum
    grads: Dict[str, torch.Tensor] | None = None  # d(big-batch loss)/d(cached rows, temperatures, biases)
    metrics: Dict[str, torch.Tensor] | None = None  # the step's contrastive metrics

    @property
    def accum(self) -> int:
        return len(self.batches)

    @classmethod
    @torch.no_grad()
    def build(cls, model: torch.nn.Module, batches: List[M.Batch]) -> "FeatureCache":
        """Embed every micro-batch without gradient (same forward, same RNG as the replay)."""
        if not batches:
            raise ValueError("the feature cache needs at least one micro-batch")
        names = list(model.towers) if hasattr(model, "towers") else M.names()  # the towers the model has
        feats: Dict[str, List[torch.Tensor]] = {m: [] for m in names}
        rng_states, offsets, off = [], [], 0
        for b in batches:
            rng_states.append((torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in _rng_devices()]))
            out = model(b, captions=False)
            for m in names:
                feats[m].append(out.embeddings[m].detach().float())
            offsets.append(off)
            off += len(b)
        masks = {m: torch.cat([b.masks[m].bool() for b in batches]) for m in M.names()}
        denom = None
        if getattr(model, "decoder", None) is not None:
            local = torch.stack([caption_token_count(b) for b in batches]).sum().float()
            denom = D.all_reduce_sum(local.to(batches[0].labels.device)) / len(batches)
        return cls(list(batches), {m: torch.cat(v) for m, v in feats.items()}, masks, offsets, rng_states, denom)

    @contextlib.contextmanager
    def replay_rng(self, i: int) -> Iterator[None]:
        """Run the grad forward of micro-batch i with the RNG state of its cached pass (dropout
        masks match); the surrounding RNG stream is left untouched."""
        cpu, cuda = self.rng_states[i]
        with torch.random.fork_rng(devices=_rng_devices()):
            torch.set_rng_state(cpu)
            for d, s in zip(_rng_devices(), cuda):
                torch.cuda.set_rng_state(s, d)
            yield

    def _cached_gradients(self, loss_fn: Callable[..., Tuple[torch.Tensor, Dict[str, torch.Tensor]]],
                          out: ModelOutput) -> None:
        """The big-batch loss once, on the cached features: its gradient with respect to every
        cached row and to the temperatures / biases, and the step's metrics. Collective (the loss
        gathers across ranks), so every rank calls it at the same micro-batch."""
        dev = next(iter(out.embeddings.values())).device
        emb = {m: self.features[m].to(dev).requires_grad_() for m in self.features}
        scales = {p: v.detach().float().clone().requires_grad_() for p, v in out.scales.items()}
        biases = {p: v.detach().float().clone().requires_grad_() for p, v in out.biases.items()}
        masks = {m: self.masks[m].to(dev) for m in self.masks}
        leaves = {**{f"emb/{k}": v for k, v in emb.items()}, **{f"scale/{k}": v for k, v in scales.items()},
                  **{f"bias/{k}": v for k, v in biases.items()}}
        with torch.enable_grad():
            loss, metrics = loss_fn(emb, scales, biases, masks)
            keys = list(leaves)
            grads = torch.autograd.grad(loss, [leaves[k] for k in keys], allow_unused=True)
        self.grads = {k: torch.zeros_like(leaves[k]) if g is None else g.detach() for k, g in zip(keys, grads)}
        self.metrics = {k: v.detach() for k, v in metrics.items()}

    def contrastive(
        self, loss_fn: Callable[..., Tuple[torch.Tensor, Dict[str, torch.Tensor]]], out: ModelOutput, i: int,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """A surrogate whose gradient, through micro-batch i's live features, is that micro-batch's
        share of the big-batch gradient (GradCache): <features_i, dL/dfeatures_i>, plus 1/accum of
        the temperature / bias terms, times accum (DeepSpeed's backward divides by accum). The big-
        batch loss itself is computed once per step (first call); metrics are the whole step's."""
        if self.grads is None:
            self._cached_gradients(loss_fn, out)
        assert self.grads is not None and self.metrics is not None
        s = self.offsets[i]
        surrogate = sum((e.float() * self.grads[f"emb/{m}"][s:s + e.shape[0]]).sum()
                        for m, e in out.embeddings.items())
        shared = sum((v.float() * self.grads[f"scale/{p}"]).sum() for p, v in out.scales.items())
        shared = shared + sum((v.float() * self.grads[f"bias/{p}"]).sum() for p, v in out.biases.items())
        surrogate = surrogate + shared / self.accum
        return surrogate * self.accum, dict(self.metrics)
