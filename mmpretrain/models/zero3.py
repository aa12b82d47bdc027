"""Building the model already partitioned under ZeRO-3 (`deepspeed.zero.Init`), so that no rank
ever holds the whole model: each module's parameters are split across the ranks as soon as its
constructor returns, and transformers' `from_pretrained` / `from_config` (told through its
`HfDeepSpeedConfig`) load a pretrained tower shard by shard.

After construction a parameter's `.data` is an empty placeholder; what we do to weights outside a
module's constructor (our initialisation, `init` paths, weights-only resumes) runs on one module's
parameters at a time, gathered (`gathered`, `load_state_dict`), and shapes are read from
`full_shape`. Every rank runs the same code on the same RNG stream; rank 0's result is the one
kept (DeepSpeed broadcasts it when the gathered block ends), as zero.Init itself does."""
from __future__ import annotations

import contextlib
import importlib
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Tuple

import torch
import torch.nn as nn

from mmpretrain import modalities as M


def is_partitioned(p: torch.Tensor) -> bool:
    """Whether `p` is a ZeRO-3 parameter (its data lives in per-rank shards)."""
    return hasattr(p, "ds_id")


def full_shape(p: torch.Tensor) -> Tuple[int, ...]:
    """The parameter's real shape (a partitioned one's `.shape` is its empty placeholder's)."""
    return tuple(p.ds_shape) if is_partitioned(p) else tuple(p.shape)


def full_ndim(p: torch.Tensor) -> int:
    return len(full_shape(p))


def local_and_full_numel(module: nn.Module) -> Tuple[int, int]:
    """(elements this rank holds, elements of the whole model) over unique parameters."""
    seen, local, full = set(), 0, 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if is_partitioned(p):
            local += p.ds_tensor.numel()
            full += p.ds_numel
        else:
            local += p.numel()
            full += p.numel()
    return local, full


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int = 0) -> Iterator[None]:
    """Inside: the partitioned ones among `params` hold their full data on every rank; writes of
    rank `modifier_rank` are kept when the block ends. A no-op for ordinary parameters."""
    parts = [p for p in params if is_partitioned(p)]
    if not parts:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parts, modifier_rank=modifier_rank):
        yield


def load_state_dict(module: nn.Module, sd: Mapping[str, torch.Tensor]) -> Tuple[List[str], List[str]]:
    """`module.load_state_dict(sd, strict=False)` -> (missing, unexpected), also for a module built
    under zero.Init: one submodule's own parameters gathered at a time (never the whole model)."""
    if not any(is_partitioned(p) for p in module.parameters()):
        missing, unexpected = module.load_state_dict(dict(sd), strict=False)
        return list(missing), list(unexpected)
    expected = set(module.state_dict().keys())
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    for name, sub in module.named_modules():
        pre = f"{name}." if name else ""
        own: Dict[str, Any] = {n: p for n, p in sub.named_parameters(recurse=False) if pre + n in sd}
        own.update({n: b for n, b in sub.named_buffers(recurse=False) if b is not None and pre + n in sd})
        if not own:
            continue
        with gathered(list(sub.parameters(recurse=False))), torch.no_grad():
            for n, t in own.items():
                src = sd[pre + n]
                if tuple(src.shape) != full_shape(t):
                    raise RuntimeError(f"weights for '{pre + n}' have shape {tuple(src.shape)}, the model's is "
                                       f"{full_shape(t)}")
                t.data.copy_(src.to(t.dtype))
    return missing, unexpected


def _deepspeed_zero3_enabled(cfg: Any) -> bool:
    return cfg.train.zero_stage == 3 and bool(getattr(cfg.train, "zero3_init", True))


@contextlib.contextmanager
def construction(cfg: Any, world_size: int) -> Iterator[bool]:
    """Build the model inside this block: under `deepspeed.zero.Init` (and transformers'
    ZeRO-3 loading) when train.zero_stage is 3 and train.zero3_init is on; yields whether it is."""
    if not _deepspeed_zero3_enabled(cfg):
        yield False
        return
    import deepspeed

    from mmpretrain.engine import _skip_deepspeed_muon, deepspeed_config

    _skip_deepspeed_muon()
    # zero.Init patches torch.Tensor.__new__ while it is active; torch._dynamo checks that signature
    # when first imported (transformers' model modules import it): import it before the patch
    importlib.import_module("torch._dynamo")  # the optimizer imports it anyway: nothing extra is paid

    ds = deepspeed_config(cfg, world_size)
    with _transformers_told(cfg, ds), deepspeed.zero.Init(config_dict_or_path=ds):
        yield True


@contextlib.contextmanager
def _transformers_told(cfg: Any, ds: Dict[str, Any]) -> Iterator[None]:
    """transformers' from_pretrained / from_config load shard-wise while an HfDeepSpeedConfig of
    ZeRO-3 lives (it holds it by a weak reference); imported only for HF towers (~1 s)."""
    if all(M.tower_kind(cfg, m) != "hf" for m in M.all_modalities()):
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    hf_ds = HfDeepSpeedConfig(ds)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del hf_ds
