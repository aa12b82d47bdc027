"""Exponential moving average of the trainable weights (train.ema): an fp32 copy on the device,
updated after each optimizer step that was taken, saved in every checkpoint (`ema.pt`, written by
rank 0: ZeRO 0-2 keep whole parameters on every rank, so every rank's EMA is the same), swapped in
for evaluation (eval.use_ema) and exported on request (mmpretrain.export --ema)."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch
import torch.nn as nn

log = logging.getLogger("mmpretrain.ema")

EMA_FILE = "ema.pt"  # in a checkpoint's step directory; keys are the model's parameter names


class WeightEMA:
    """ema = d x ema + (1 - d) x weights after every `every`-th step, with d = `decay`, or with
    `warmup` d = min(decay, (1 + n) / (10 + n)) after n updates (early weights, still near the random
    init, fade fast). Only the trainable parameters (requires_grad) are tracked, in fp32 whatever the
    training precision."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True, every: int = 1) -> None:
        self.decay, self.warmup, self.every = float(decay), bool(warmup), int(every)
        self.params: Dict[str, nn.Parameter] = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow: Dict[str, torch.Tensor] = {n: p.detach().float().clone() for n, p in self.params.items()}
        self.updates = 0  # EMA updates applied so far (the warm-up's n)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """After optimizer step `step` (1-based) was taken; updates on every `every`-th step. The
        caller skips steps the optimizer skipped (non-finite). Returns whether it updated."""
        if step % self.every:
            return False
        d = self.current_decay()
        for name, p in self.params.items():
            self.shadow[name].mul_(d).add_(p.detach().float(), alpha=1.0 - d)
        self.updates += 1
        return True

    def state_dict(self) -> Dict[str, Any]:
        """CPU tensors and plain values: loads with weights_only=True."""
        return {"shadow": {n: t.detach().cpu() for n, t in self.shadow.items()}, "updates": self.updates}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        saved = state["shadow"]
        missing, unexpected = sorted(set(self.shadow) - set(saved)), sorted(set(saved) - set(self.shadow))
        if missing or unexpected:
            raise RuntimeError(f"EMA state does not fit the model's trainable parameters (missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]})")
        for n, t in saved.items():
            self.shadow[n].copy_(t)
        self.updates = int(state["updates"])

    @contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """Inside the block the model's trainable parameters hold the EMA weights (cast to their
        dtype); the training weights are restored exactly afterwards, also on an exception."""
        backup = {n: p.detach().clone() for n, p in self.params.items()}
        try:
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
            yield
        finally:
            for n, p in self.params.items():
                p.copy_(backup[n])

    # ------------------------------------------------------------------ files
    def save(self, ckpt: Path) -> None:
        torch.save(self.state_dict(), Path(ckpt) / EMA_FILE)

    def load(self, ckpt: Path) -> bool:
        """Restore from a checkpoint's ema.pt; False (EMA kept at the current weights) when it has none."""
        path = Path(ckpt) / EMA_FILE
        if not path.is_file():
            log.warning("%s holds no EMA (train.ema was off when it was saved): the EMA starts from the "
                        "current weights", ckpt)
            return False
        from mmpretrain.safe_load import safe_load

        state = safe_load(path)
        dev = next(iter(self.shadow.values())).device if self.shadow else torch.device("cpu")
        self.load_state_dict({"shadow": {n: t.to(dev) for n, t in state["shadow"].items()},
                              "updates": state["updates"]})
        return True


def ema_state_dict(ckpt: "str | Path") -> Optional[Dict[str, torch.Tensor]]:
    """The EMA weights saved in checkpoint `ckpt` (model parameter names, fp32), or None."""
    path = Path(ckpt) / EMA_FILE
    if not path.is_file():
        return None
    from mmpretrain.safe_load import safe_load

    return {n: t.float() for n, t in safe_load(path)["shadow"].items()}


def with_ema(sd: Dict[str, torch.Tensor], ckpt: "str | Path") -> Dict[str, torch.Tensor]:
    """`sd` (a consolidated model state dict) with its trainable weights replaced by the EMA of
    checkpoint `ckpt`; FileNotFoundError when the checkpoint has no EMA."""
    ema = ema_state_dict(ckpt)
    if ema is None:
        raise FileNotFoundError(f"{ckpt} holds no {EMA_FILE}: it was trained without train.ema.enabled")
    unknown = sorted(set(ema) - set(sd))
    if unknown:
        raise RuntimeError(f"{Path(ckpt) / EMA_FILE}: EMA weights not in the model: {unknown[:5]}")
    return {**sd, **ema}
