"""The DeepSpeed engine built from our config: ZeRO stage, precision, accumulation,
clipping, AdamW parameter groups and the warmup + cosine schedule."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from mmpretrain import modalities as M
from mmpretrain.config import Config
from mmpretrain.losses import ContrastiveLoss, caption_loss
from mmpretrain.models.zero3 import full_ndim, full_shape  # a parameter built under zero.Init has an empty .data

# Weight decay by tensor rank (nanoGPT's rule): parameters with ndim >= 2 (linear and conv
# weights) decay, parameters with ndim < 2 (biases, LayerNorm weights, temperatures, logit
# biases) never do. Embeddings are >= 2-D but are looked up or added, not multiplied, so they are
# exempt by name: each entry is matched against the trailing components of a parameter's dotted
# name, component by component ("*" = any one component), so "pos" matches "model.vision.pos"
# but not "model.vision.pos_proj.weight", and nothing matches by substring.
NO_DECAY_EMBEDDINGS = (
    "text.tok.weight",  # token embedding
    "pos",  # positional embeddings (vision, audio, text)
    "cls",  # class tokens
    "decoder.modality_embed.*",  # which modality a caption context token comes from
    "decoder.poolers.*.queries",  # attentional-pooler queries
    # HF towers' embeddings held as bare parameters (nn.Embedding tables are exempt by module type)
    "embeddings.cls_token", "embeddings.position_embeddings", "embeddings.mask_token",
    "embeddings.register_tokens",
)


# train.deepspeed: top-level DeepSpeed keys passed through as given (zero_optimization is checked
# against DeepSpeed's own schema); the keys in OWNED come from other config keys and are refused
PASSTHROUGH = ("zero_optimization", "communication_data_type", "prescale_gradients", "gradient_predivide_factor",
               "sparse_gradients", "wall_clock_breakdown", "memory_breakdown", "flops_profiler", "comms_logger",
               "aio", "zero_force_ds_cpu_optimizer", "steps_per_print", "dump_state", "data_types")
OWNED = {"train_batch_size": "train.micro_batch_size x train.grad_accum x the world size",
         "train_micro_batch_size_per_gpu": "train.micro_batch_size", "gradient_accumulation_steps": "train.grad_accum",
         "gradient_clipping": "train.grad_clip", "bf16": "train.precision", "fp16": "train.precision",
         "optimizer": "optim.*", "scheduler": "optim.* (warmup + cosine)", "checkpoint": "train.resume",
         "zero_allow_untested_optimizer": "the engine (our AdamW)"}


def deepspeed_overrides_problem(overrides: Any) -> Optional[str]:
    """Why `train.deepspeed` cannot be merged (one line naming the key), or None."""
    from collections.abc import Mapping

    if not isinstance(overrides, Mapping):
        return f"config key 'train.deepspeed' = {overrides!r} must be a mapping of DeepSpeed settings"
    for k in overrides:
        if k in OWNED:
            return f"config key 'train.deepspeed.{k}' is set from {OWNED[k]}: set that instead"
        if k not in PASSTHROUGH:
            return f"config key 'train.deepspeed.{k}' is not a DeepSpeed setting passed through; allowed: {list(PASSTHROUGH)}"
    zero = overrides.get("zero_optimization", {})
    if not isinstance(zero, Mapping):
        return f"config key 'train.deepspeed.zero_optimization' = {zero!r} must be a mapping"
    if "stage" in zero:
        return "config key 'train.deepspeed.zero_optimization.stage' is set from train.zero_stage: set that instead"
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**{"stage": 0, **dict(zero)})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()))
        return (f"config key 'train.deepspeed.zero_optimization.{where}' = {err.get('input')!r}: "
                f"{err.get('msg', 'invalid')} (DeepSpeed's zero_optimization schema)")
    return None


def deepspeed_overrides(cfg: Config) -> Dict[str, Any]:
    """`train.deepspeed` as plain dicts ({} when unset)."""
    extra = getattr(cfg.train, "deepspeed", None)
    if not extra:
        return {}
    from omegaconf import OmegaConf

    return OmegaConf.to_container(extra, resolve=True) if OmegaConf.is_config(extra) else dict(extra)


def _merged(base: Dict[str, Any], over: Any) -> Dict[str, Any]:
    out = dict(base)
    for k, v in dict(over).items():
        out[k] = _merged(out[k], v) if isinstance(out.get(k), dict) and hasattr(v, "items") else \
            (dict(v) if hasattr(v, "items") else v)
    return out


# DeepSpeed's default reduce bucket (elements). ZeRO 1-3 allocate it whole on every rank (ZeRO-1/2
# for each backward, ZeRO-3 up front: 2 GB in fp32), however small the model: a model with fewer
# trainable parameters gets a bucket of its own size instead (bench/plan_check.py found it)
DEFAULT_REDUCE_BUCKET = 500_000_000


def deepspeed_config(cfg: Config, world_size: int, load_universal: bool = False,
                     trainable: Optional[int] = None) -> Dict[str, Any]:
    """The DeepSpeed config of the run; `trainable` (the model's trainable parameter count, when
    known) sizes ZeRO's reduce bucket. `train.deepspeed` is merged last: its settings win."""
    t = cfg.train
    ds: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        # our optimizer is a torch one, which DeepSpeed calls "untested"; with offload_optimizer it
        # steps on the CPU partitions (DeepSpeed would otherwise insist on its compiled CPU Adam)
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # True only when resuming a universal checkpoint (a world-size change)
        "checkpoint": {"load_universal": load_universal},
    }
    if t.zero_stage == 3:
        ds["zero_optimization"].update({"stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": False})
    if t.zero_stage >= 1 and trainable:
        ds["zero_optimization"]["reduce_bucket_size"] = reduce_bucket_elements(trainable)
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 100}
    extra = deepspeed_overrides(cfg)
    if extra:
        ds = _merged(ds, extra)  # validated by preflight (deepspeed_overrides_problem)
    return ds


def reduce_bucket_elements(trainable: int) -> int:
    """ZeRO's reduce bucket: DeepSpeed's default, or the trainable parameter count when smaller."""
    return int(min(DEFAULT_REDUCE_BUCKET, max(1_000_000, trainable)))


def is_no_decay_embedding(name: str) -> bool:
    """Whether a parameter name ends with one of NO_DECAY_EMBEDDINGS (whole components)."""
    parts = name.split(".")
    for rule in NO_DECAY_EMBEDDINGS:
        want = rule.split(".")
        tail = parts[-len(want):]
        if len(tail) == len(want) and all(w == "*" or w == t for w, t in zip(want, tail)):
            return True
    return False


def tower_of(name: str) -> Optional[str]:
    """The modality whose tower holds parameter `name` ('...towers.<m>.*'), else None."""
    parts = name.split(".")
    return parts[parts.index("towers") + 1] if "towers" in parts[:-1] else None


def tower_lr_mults(cfg: Config) -> Dict[str, float]:
    """modality -> model.<section>.lr_mult, for towers whose multiplier is not 1."""
    out = {}
    for m in M.all_modalities():
        t = M.tower_section(cfg, m)
        mult = float(getattr(t, "lr_mult", 1.0)) if t is not None else 1.0
        if mult != 1.0:
            out[m.name] = mult
    return out


def param_groups(model: nn.Module, weight_decay: float, lr: Optional[float] = None,
                 lr_mults: Optional[Dict[str, float]] = None) -> List[Dict[str, Any]]:
    """AdamW groups of the trainable parameters (frozen ones, requires_grad=False, are left out: no
    optimizer state): [decayed, not decayed], then the same pair for each tower in `lr_mults`
    (modality -> multiplier) with lr = `lr` x multiplier; the LR schedule scales each group's
    initial lr, so the ratio holds throughout. ndim >= 2 decays unless it is an embedding
    (an nn.Embedding's table or a name in NO_DECAY_EMBEDDINGS); ndim < 2 never decays."""
    lr_mults = {m: v for m, v in (lr_mults or {}).items() if v != 1.0}
    if lr_mults and lr is None:
        raise ValueError("param_groups: lr_mults need the base lr")
    tables = {id(mod.weight) for mod in model.modules() if isinstance(mod, nn.Embedding)}
    buckets: Dict[Tuple[Optional[str], bool], List[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        tower = tower_of(name)
        key = tower if tower in lr_mults else None
        decays = not (full_ndim(p) < 2 or id(p) in tables or is_no_decay_embedding(name))
        buckets.setdefault((key, decays), []).append(p)
    groups = [{"params": buckets.get((None, True), []), "weight_decay": weight_decay},
              {"params": buckets.get((None, False), []), "weight_decay": 0.0}]
    for tower, mult in sorted(lr_mults.items()):
        for decays in (True, False):
            params = buckets.get((tower, decays), [])
            if params:
                groups.append({"params": params, "weight_decay": weight_decay if decays else 0.0,
                               "lr": lr * mult, "name": f"towers.{tower}" + ("" if decays else ".no_decay")})
    return groups


def lr_lambda(cfg: Config, total: Optional[int] = None):
    """Linear warmup to 1, then cosine down to min_lr_ratio at `total` (default train.steps; a
    train.max_minutes budget sets a smaller one: set_schedule_total)."""
    warm, floor = cfg.optim.warmup_steps, cfg.optim.min_lr_ratio
    total = cfg.train.steps if total is None else int(total)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / max(1, warm)
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def set_schedule_total(scheduler: Any, cfg: Config, total: int, move: bool = True) -> None:
    """Make a LambdaLR of lr_lambda end its cosine at step `total` instead of train.steps. The
    schedule functions stay plain closures (LambdaLR saves no state of those), so the total lives in
    the trainer state and is set again on resume. move: also set each group's current lr to the
    new schedule at the scheduler's position (as its next step() would); False after a resume
    whose restored optimizer already holds those lrs."""
    scheduler.lr_lambdas = [lr_lambda(cfg, total) for _ in scheduler.lr_lambdas]
    if move:
        step = scheduler.last_epoch
        lrs = [base * fn(step) for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = list(lrs)


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose next step can be skipped, reported to DeepSpeed the way its fp16 optimizer
    reports an overflow (`overflow`): the engine then counts a skipped step and holds the LR
    schedule. ZeRO 1-3 skip non-finite steps themselves; this gives stage 0 the same."""

    _skip_next: bool = False
    overflow: bool = False  # read by DeepSpeed after each step

    def skip_next_step(self) -> None:
        """The next step() changes nothing and reports an overflow."""
        self._skip_next = True

    def clear_skip(self) -> None:
        """Forget a pending skip (a wrapper that skipped on its own never called step())."""
        self._skip_next = False

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        self.overflow, self._skip_next = self._skip_next, False
        if self.overflow:
            return None
        return super().step(closure)


class TrainModule(nn.Module):
    """What DeepSpeed wraps: batch in, (total loss, metrics) out."""

    def __init__(self, model: nn.Module, cfg: Config) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.contrastive = ContrastiveLoss(cfg)

    def forward(
        self, batch: M.Batch, feature_cache: Any = None, micro_index: int = 0
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """feature_cache (mmpretrain.feature_cache.FeatureCache): score micro-batch `micro_index`
        against every cached micro-batch of the step (exact big-batch contrastive gradient)."""
        if feature_cache is None:
            out = self.model(batch)
            loss_con, metrics = self.contrastive(out.embeddings, out.scales, out.biases, batch.masks, batch.labels)
        else:
            with feature_cache.replay_rng(micro_index):
                out = self.model(batch)
            loss_con, metrics = feature_cache.contrastive(self.contrastive, out, micro_index)
        total = self.cfg.loss.contrastive_weight * loss_con
        if out.caption is not None:
            denom = None if feature_cache is None else feature_cache.caption_denominator
            loss_cap, cap_metrics = caption_loss(out.caption, denominator=denom)
            total = total + self.cfg.loss.caption_weight * loss_cap
            metrics.update(cap_metrics)
        metrics["loss"] = self.cfg.loss.contrastive_weight * metrics.get("loss/contrastive", 0.0) + (
            self.cfg.loss.caption_weight * metrics.get("loss/caption", 0.0)
        )
        return total, metrics


_MUON_MODULES = ("deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.runtime.zero.muon.original_muon")


def _skip_deepspeed_muon() -> None:
    """DeepSpeed's ZeRO optimizers import its Muon optimizer only to ask `isinstance(opt,
    MuonWithAuxAdam)` (and stage 1/2 import `muon_update` on the gradient path, called only for
    Muon parameters), and those imports apply torch.compile to Muon's kernels, which loads
    TorchInductor: ~3-4 s of CPU in every rank's start-up (measured on 2 CPU cores, 12.8 -> 8.9 s
    for a whole 2-step run). Our optimizer is never Muon, so stand in modules whose class nothing
    is an instance of and whose update refuses to run. Modules already imported are left alone."""
    import sys
    import types

    if any(name in sys.modules for name in _MUON_MODULES):
        return

    class MuonWithAuxAdam:  # never instantiated: isinstance checks against it are False
        pass

    def muon_update(*args, **kwargs):
        raise RuntimeError("DeepSpeed's Muon was replaced by a stand-in (mmpretrain.engine): this run never uses Muon")

    for name, attrs in zip(_MUON_MODULES, ({"MuonWithAuxAdam": MuonWithAuxAdam}, {"muon_update": muon_update})):
        stub = types.ModuleType(name, "stand-in set by mmpretrain.engine: this process never uses Muon")
        stub.__dict__.update(attrs)
        sys.modules[name] = stub


def build_engine(cfg: Config, model: nn.Module, world_size: int, load_universal: bool = False):
    """-> (deepspeed engine wrapping TrainModule, optimizer, scheduler)."""
    # lazy: importing DeepSpeed takes seconds and logs to stdout; TrainModule and the schedule need none of it
    import deepspeed

    _skip_deepspeed_muon()

    module = TrainModule(model, cfg)
    # saved into every checkpoint, so ds_to_universal converts it without extra flags
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE

    module.universal_checkpoint_info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    opt = SkippableAdamW(
        param_groups(module, cfg.optim.weight_decay, cfg.optim.lr, tower_lr_mults(cfg)),
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    trainable = sum(math.prod(full_shape(p)) for p in module.parameters() if p.requires_grad)
    engine, opt, _, sched = deepspeed.initialize(
        model=module, optimizer=opt, lr_scheduler=sched,
        config=deepspeed_config(cfg, world_size, load_universal, trainable=trainable),
    )
    return engine, opt, sched
