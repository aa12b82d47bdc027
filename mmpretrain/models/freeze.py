"""Locking a tower (`model.<tower>.lock`, `unlock_last_n_layers`, `unlock_layernorm`), native or
HF alike: frozen parameters get requires_grad=False, so engine.param_groups leaves them out of the
optimizer (no optimizer state, nothing for ZeRO to partition) and a wholly frozen tower runs its
forward without autograd (MultimodalModel.encode)."""
from __future__ import annotations

from typing import Any, List, Tuple

import torch.nn as nn

# names of the layer stack in the families we build: ours (encoder.blocks), BERT / ViT / DINOv2
# (encoder.layer), CLIP / SigLIP (encoder.layers)
_STACK_NAMES = ("blocks", "layer", "layers")


def layer_stack(tower: nn.Module) -> Tuple[str, nn.ModuleList]:
    """(name, the ModuleList of encoder layers): the longest ModuleList called blocks / layer / layers."""
    best: Tuple[str, Any] = ("", None)
    for name, mod in tower.named_modules():
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] in _STACK_NAMES:
            if best[1] is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best[1] is None:
        raise ValueError(f"{type(tower).__name__} has no encoder layer list ({' / '.join(_STACK_NAMES)})")
    return best


def head_parameter_names(tower: nn.Module, stack: str) -> List[str]:
    """Parameters registered after the layer stack (final norms, pooling heads): the top of the tower."""
    names = [n for n, _ in tower.named_parameters()]
    inside = [i for i, n in enumerate(names) if n.startswith(stack + ".")]
    return names[inside[-1] + 1:] if inside else []


def apply_lock(tower: nn.Module, t: Any) -> None:
    """Freeze `tower` per its config section `t` (lock / unlock_last_n_layers / unlock_layernorm)."""
    if not getattr(t, "lock", False):
        return
    for p in tower.parameters():
        p.requires_grad_(False)
    n = int(getattr(t, "unlock_last_n_layers", 0) or 0)
    if n > 0:
        stack, layers = layer_stack(tower)
        for layer in list(layers)[-n:]:
            for p in layer.parameters():
                p.requires_grad_(True)
        params = dict(tower.named_parameters())
        for name in head_parameter_names(tower, stack):  # the top of the tower trains with its last layers
            params[name].requires_grad_(True)
    if getattr(t, "unlock_layernorm", False):
        for mod in tower.modules():
            if isinstance(mod, nn.LayerNorm):
                for p in mod.parameters():
                    p.requires_grad_(True)


def is_frozen(module: nn.Module) -> bool:
    """No parameter of `module` trains."""
    return not any(p.requires_grad for p in module.parameters())
