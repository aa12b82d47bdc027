"""Exact large-batch contrastive gradients under gradient accumulation (GradCache-style).

A no-grad pass embeds every micro-batch of the optimizer step and caches the features. Each
micro-batch is then recomputed with gradient and scored against the full cached set (all
micro-batches of all ranks), its own rows live, every other row a cached constant. The
gradient through the live rows is the exact partial derivative of the big-batch loss, so
the sum over micro-batches is the big-batch gradient. DeepSpeed divides each micro-batch's
loss by grad_accum; the cached loss is multiplied back, and the temperature (used live in
every micro-batch) gets 1/grad_accum of its gradient each time, so it too is counted once.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch

from mmpretrain import distributed as D

FEATURES = ("image", "audio", "text")


def _rng_devices() -> List[int]:
    return [torch.cuda.current_device()] if torch.cuda.is_available() else []


@dataclass
class FeatureCache:
    """The micro-batches of one optimizer step and their cached features (this rank's)."""

    batches: List[Dict[str, Any]]
    features: Dict[str, torch.Tensor]  # m -> (sum n_i, E) fp32, no grad
    masks: Dict[str, torch.Tensor]  # m -> (sum n_i,) bool
    offsets: List[int]  # row offset of micro-batch i
    rng_states: List[Tuple[torch.Tensor, List[torch.Tensor]]] = field(default_factory=list)
    caption_denominator: torch.Tensor | None = None  # global caption tokens of the step / grad_accum

    @property
    def accum(self) -> int:
        return len(self.batches)

    @classmethod
    @torch.no_grad()
    def build(cls, model: torch.nn.Module, batches: List[Dict[str, Any]]) -> "FeatureCache":
        """Embed every micro-batch without gradient (same forward, same RNG as the replay)."""
        if not batches:
            raise ValueError("the feature cache needs at least one micro-batch")
        feats: Dict[str, List[torch.Tensor]] = {m: [] for m in FEATURES}
        rng_states, offsets, off = [], [], 0
        for b in batches:
            rng_states.append((torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in _rng_devices()]))
            out = model(b)
            for m in FEATURES:
                feats[m].append(out[m].detach().float())
            offsets.append(off)
            off += int(b["image_mask"].shape[0])
        masks = {m: torch.cat([b[f"{m}_mask"].bool() for b in batches]) for m in FEATURES}
        denom = None
        if getattr(model, "decoder", None) is not None:
            from mmpretrain.losses import caption_token_count

            local = torch.stack([caption_token_count(b) for b in batches]).sum().float()
            denom = D.all_reduce_sum(local) / len(batches)
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

    def splice(self, out: Dict[str, torch.Tensor], i: int) -> Dict[str, torch.Tensor]:
        """Model outputs of micro-batch i (live) -> outputs over the whole step: cached rows with
        rows of micro-batch i replaced by the live features; scale / bias pass 1/accum of their
        gradient (their value is unchanged)."""
        s = self.offsets[i]
        n = out["image"].shape[0]
        full: Dict[str, torch.Tensor] = {}
        for m in FEATURES:
            c = self.features[m].to(out[m].device)
            full[m] = torch.cat([c[:s], out[m].float(), c[s + n:]], 0)
        for k, v in out.items():
            if k.startswith(("scale/", "bias/")):
                full[k] = v.detach() + (v - v.detach()) / self.accum
        return full

    def contrastive(
        self, loss_fn: Callable[..., Tuple[torch.Tensor, Dict[str, torch.Tensor]]],
        out: Dict[str, torch.Tensor], i: int,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The big-batch contrastive loss with micro-batch i live, times accum (DeepSpeed's
        backward divides by accum). Metrics are those of the whole step."""
        full = self.splice(out, i)
        masks = {m: self.masks[m].to(out[m].device) for m in FEATURES}
        loss, metrics = loss_fn(full, masks)
        return loss * self.accum, metrics
