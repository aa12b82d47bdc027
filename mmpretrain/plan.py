"""Capacity planner: what a config costs on a cluster no machine here has.

    mmpretrain-plan --config C --nodes N --gpus-per-node G [--gpu h100] [key=value ...]

The model is built on the `meta` device (shapes only, no memory), so any size plans in seconds:
parameters per tower; FLOPs per sample counted by `torch.utils.flop_counter` over a forward and
backward of every tower, the caption decoder and the contrastive loss (all modalities present:
the worst case); activation memory = the bytes autograd saves for backward at the configured
micro-batch, with and without activation checkpointing; per-rank memory of weights, gradients
and optimizer state under each ZeRO stage and CPU offload; bytes moved per step by the feature
gathers and ZeRO's collectives; and the step time these imply at the device's peak TFLOP/s and
the interconnect's bandwidth (lower bounds: real runs reach 30-60 % of peak).

The state-memory model follows what DeepSpeed 0.19 allocates and is checked against tensors
counted in 2- and 4-process CPU runs (bench/plan_check.py, tests/test_plan.py)."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn

# device: dense bf16 TFLOP/s (vendor, no sparsity), memory GiB, typical intra-node and inter-node
# bandwidth per GPU in GB/s, one direction (NVLink / PCIe; 8 x HDR 200 Gb/s or NDR 400 Gb/s IB per
# node). All overridable: --peak-tflops, --mem-gib, --intra-gbs, --inter-gbs.
GPUS: Dict[str, Dict[str, float]] = {
    "a100": {"tflops": 312.0, "mem_gib": 80.0, "intra_gbs": 300.0, "inter_gbs": 25.0},
    "a100-40g": {"tflops": 312.0, "mem_gib": 40.0, "intra_gbs": 300.0, "inter_gbs": 25.0},
    "h100": {"tflops": 989.0, "mem_gib": 80.0, "intra_gbs": 450.0, "inter_gbs": 50.0},
    "h200": {"tflops": 989.0, "mem_gib": 141.0, "intra_gbs": 450.0, "inter_gbs": 50.0},
    "l40s": {"tflops": 362.0, "mem_gib": 48.0, "intra_gbs": 32.0, "inter_gbs": 25.0},
    "a10g": {"tflops": 125.0, "mem_gib": 24.0, "intra_gbs": 16.0, "inter_gbs": 12.5},
}
VARIANTS = ["zero0", "zero1", "zero2", "zero3", "zero2+offload_opt", "zero3+offload_opt", "zero3+offload_opt+param"]


# ----------------------------------------------------------------------------- measuring the model
def synthetic_batch(cfg: Any, n: int, vocab_size: int, device: Any = "cpu", seed: int = 0) -> Any:
    """n samples with every built modality present, full-length text and captions: the most a
    step computes. On `meta` only the shapes exist."""
    from mmpretrain import modalities as M

    dev = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    L = int(cfg.data.text_max_len)
    active = set(M.active_names(cfg))

    def ints(shape):
        if dev.type == "meta":
            return torch.empty(shape, dtype=torch.long, device=dev)
        return torch.randint(1, max(2, vocab_size), shape, generator=g).to(dev)

    inputs, masks = {}, {}
    for m in M.media():
        masks[m.name] = torch.full((n,), m.name in active, dtype=torch.bool, device=dev)
        if m.name in active:
            shape = (n, *m.sample_shape(cfg.data))
            inputs[m.name] = torch.randn(shape, generator=g).to(dev) if dev.type != "meta" else \
                torch.empty(shape, device=dev)
    inputs[M.TEXT] = ints((n, L))
    masks[M.TEXT] = torch.ones(n, dtype=torch.bool, device=dev)
    full = torch.full((n,), L, dtype=torch.long, device=dev)
    captioned = M.captioned()
    return M.Batch(keys=[f"s{i}" for i in range(n)], sources=["plan"] * n, epochs=[0] * n, inputs=inputs,
                   masks=masks, text_len=full, captions={m: ints((n, L)) for m in captioned},
                   caption_len={m: full.clone() for m in captioned}, labels=torch.zeros(n, dtype=torch.long, device=dev))


def all_present_forward(model: nn.Module, batch: Any) -> Any:
    """The model's forward for a batch where every row has every modality: each tower on all rows,
    every caption row through the decoder. Needs no data-dependent indexing, so it runs on `meta`;
    on real tensors it equals model(batch) (tests/test_plan.py)."""
    from mmpretrain import modalities as M
    from mmpretrain.models.model import CaptionOutput, ModelOutput

    emb, tok = {}, {}
    decoded = set(model.decoder.modalities) if model.decoder is not None else set()
    for name in model.towers:
        lengths = batch.text_len if name == M.TEXT else None
        if name in decoded:
            emb[name], tok[name] = model.encode(name, batch.inputs[name], lengths, return_tokens=True)
        else:  # as the model's forward: the pooled token alone (models.transformer.Encoder pool_index)
            emb[name], tok[name] = model.encode(name, batch.inputs[name], lengths), None
    pairs = model.pair_names
    scales, biases = {p: model.scale(p) for p in pairs}, {p: model.logit_bias[p].squeeze(0) for p in pairs}
    caption = None
    if model.decoder is not None:
        mods = model.decoder.modalities
        toks = torch.cat([batch.captions[m] for m in mods], 0)
        lens = torch.cat([batch.caption_len[m] for m in mods], 0)
        _, states = model.caption_text(toks, lens)
        ctx, ctx_mask = model.decoder.stacked_context({m: tok[m] for m in mods})
        logits = model.decoder(states[:, :-1], ctx, ctx_mask)
        owner = torch.arange(len(mods), device=toks.device).repeat_interleave(toks.shape[0] // len(mods))
        caption = CaptionOutput(mods, logits, toks, lens, torch.ones_like(lens, dtype=torch.bool), owner)
    return ModelOutput(emb, tok, scales, biases, caption)


class SavedBytes:
    """Bytes autograd keeps for backward inside the block (saved_tensors_hooks): one count per
    storage, parameters left out (they are model memory, not activations)."""

    def __init__(self, model: nn.Module) -> None:
        self._params = {p.untyped_storage()._cdata for p in model.parameters()}
        self._seen: Dict[int, int] = {}
        self._keep: List[torch.Tensor] = []

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s._cdata not in self._params and s._cdata not in self._seen:
            self._seen[s._cdata] = s.nbytes()
            self._keep.append(t)  # holds the storage: its address is not reused by a later tensor
        return t

    @contextlib.contextmanager
    def counting(self) -> Iterator["SavedBytes"]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self

    @property
    def total(self) -> int:
        return sum(self._seen.values())


@dataclass
class ModelFigures:
    params: Dict[str, int]  # component -> parameters
    trainable: int
    total: int
    flops_per_sample: float  # forward + backward, towers + decoder + loss at the planned batch
    flops_per_sample_by_part: Dict[str, float]
    activation_bytes: int  # saved for backward at the micro-batch, no checkpointing
    activation_bytes_ckpt: int  # with model.<tower>.grad_checkpointing on every tower
    embed_dim: int
    gathered_modalities: int


def _component(name: str) -> str:
    parts = name.split(".")
    if parts[0] in ("towers", "proj") and len(parts) > 1:
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def measure_model(cfg: Any, vocab_size: int, micro_batch: int, global_batch: int) -> ModelFigures:
    """Parameters, FLOPs and activation bytes of the config's model, built on `meta`."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmpretrain import modalities as M
    from mmpretrain.models import build_model
    from mmpretrain.models.transformer import set_grad_checkpointing
    from mmpretrain.ops.contrastive import contrastive_rows_naive

    with torch.device("meta"):
        model = build_model(cfg, vocab_size)
    params: Dict[str, int] = {}
    for n, p in model.named_parameters():
        params[_component(n)] = params.get(_component(n), 0) + p.numel()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batch = synthetic_batch(cfg, micro_batch, vocab_size, "meta")
    pairs = [p for p in M.active_pairs(cfg) if float(M.pair_weights(cfg).get(p.name, 0.0)) > 0]

    def model_step(count: SavedBytes) -> float:
        """FLOPs of a forward + backward of the model, its saved bytes into `count`."""
        counter = FlopCounterMode(display=False)
        with counter:
            with count.counting():
                out = all_present_forward(model, batch)
                loss = sum(e.sum() for e in out.embeddings.values())
                if out.caption is not None:
                    loss = loss + out.caption.logits.sum()
            loss.backward()
        return counter.get_total_flops()

    # the contrastive loss: micro-batch rows against the global batch's keys, both directions per
    # pair, forward + backward (counted on meta tensors of the global shapes)
    lc = FlopCounterMode(display=False)
    with lc:  # one block: entering a FlopCounterMode again starts its count afresh
        for _ in pairs:
            q = torch.empty(micro_batch, cfg.model.embed_dim, device="meta", requires_grad=True)
            k = torch.empty(global_batch, cfg.model.embed_dim, device="meta", requires_grad=True)
            s = torch.empty((), device="meta", requires_grad=True)
            t = torch.empty(micro_batch, dtype=torch.long, device="meta")
            v = torch.empty(global_batch, dtype=torch.bool, device="meta")
            for _direction in range(2):
                contrastive_rows_naive(q, k, s, t, v).sum().backward()

    plain = SavedBytes(model)
    by_part = {"model": model_step(plain), "contrastive_loss": lc.get_total_flops()}
    model.zero_grad(set_to_none=True)
    set_grad_checkpointing(model, True)
    ckpt = SavedBytes(model)
    model_step(ckpt)
    # while one checkpointed block's backward runs, its recomputed activations live as well
    ckpt_bytes = ckpt.total + _largest_block_bytes(model, plain)
    flops = {k: v / micro_batch for k, v in by_part.items()}
    return ModelFigures(params=params, trainable=trainable, total=sum(params.values()),
                        flops_per_sample=sum(flops.values()), flops_per_sample_by_part=flops,
                        activation_bytes=plain.total, activation_bytes_ckpt=ckpt_bytes,
                        embed_dim=int(cfg.model.embed_dim), gathered_modalities=len(model.towers))


def _largest_block_bytes(model: nn.Module, plain: SavedBytes) -> int:
    """An upper estimate of one transformer block's saved bytes: the plain count's share of the
    deepest encoder (its blocks are alike), i.e. total / number of blocks of all encoders."""
    from mmpretrain.models.transformer import Encoder

    blocks = sum(len(m.blocks) for m in model.modules() if isinstance(m, Encoder))
    return plain.total // max(1, blocks)


# ----------------------------------------------------------------------------- the memory model
@dataclass
class StateMemory:
    """Bytes per rank (device) and per node's host (offloaded) for one ZeRO variant."""

    variant: str
    weights: float
    gradients: float
    optimizer: float  # fp32 partition copy + Adam moments
    host: float  # per rank, in host memory (offload)
    buffers: float = 0.0  # DeepSpeed's reduce bucket (ZeRO 1-3), allocated whole

    @property
    def device_total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.buffers


def state_memory(variant: str, total: int, trainable: int, world: int, precision: str,
                 reduce_bucket: Optional[int] = None) -> StateMemory:
    """DeepSpeed's per-rank model state (bytes). `precision` fp32 | bf16 | fp16; weights and
    gradients in it; AdamW's two moments and, for half precision, a fp32 master copy, in fp32.
    ZeRO-1 partitions the optimizer state, ZeRO-2 also the gradients, ZeRO-3 also the weights;
    offload moves the optimizer state (and with +param the weights) to host memory. DeepSpeed's
    ZeRO-1/2/3 optimizers keep their fp32 partition as a copy even for an fp32 model, and ZeRO 1-3
    allocate their reduce bucket (`reduce_bucket`, default engine.reduce_bucket_elements) whole,
    into which ZeRO-1/2 gather the gradients (so those are counted once, in the bucket)."""
    stage = int(variant[4])
    offload_opt, offload_param = "offload_opt" in variant, "param" in variant.split("+")[-1]
    b = 4 if precision == "fp32" else 2
    n = max(1, world)
    from mmpretrain.engine import reduce_bucket_elements

    bucket = (reduce_bucket or reduce_bucket_elements(trainable)) if stage >= 1 else 0
    weights = b * total / (n if stage == 3 else 1)
    if stage == 0:
        grads = b * trainable
    elif stage == 3:
        grads = b * trainable / n
    else:
        # DeepSpeed 0.19 gathers ZeRO-1 and ZeRO-2 gradients into the reduce bucket alike (measured:
        # ZeRO-1 holds what ZeRO-2 does, not the paper's full gradients); a rank keeps its reduced
        # partition beside the bucket only when the bucket does not hold every gradient
        grads = b * trainable / n if trainable > bucket else 0.0
    if stage == 0:
        optimizer = 8.0 * trainable + (4.0 * trainable if b == 2 else 0.0)
    else:
        optimizer = 12.0 * trainable / n  # fp32 partition + m + v
    host = 0.0
    if offload_opt:
        host += optimizer + 4.0 * trainable / n  # and the fp32 gradient partition the CPU Adam reads
        optimizer = 0.0
    if offload_param:
        host += weights
        weights = 0.0
    buffers = float(b * bucket)
    return StateMemory(variant, weights, grads, optimizer, host, buffers)


# ----------------------------------------------------------------------------- communication and time
@dataclass
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu: str
    tflops: float
    mem_gib: float
    intra_gbs: float
    inter_gbs: float

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def bottleneck_gbs(self) -> float:
        """A ring across nodes runs at the inter-node rate per GPU; inside one node at NVLink's."""
        return self.inter_gbs if self.nodes > 1 else self.intra_gbs


def comm_bytes(variant: str, total: int, trainable: int, world: int, precision: str, micro_batch: int,
               grad_accum: int, embed_dim: int, modalities: int) -> Dict[str, float]:
    """Bytes each rank sends per optimizer step (ring collectives: (n-1)/n of the buffer per pass)."""
    n = max(1, world)
    b = 4 if precision == "fp32" else 2
    ring = (n - 1) / n
    stage = int(variant[4])
    # features: every modality's embeddings gathered in forward, their gradients reduced in backward
    features = 2 * ring * micro_batch * n * embed_dim * 4 * modalities * grad_accum
    grads = b * trainable
    if stage <= 2:  # all-reduce (or reduce-scatter + all-gather of the updated partitions): 2 passes
        zero = 2 * ring * grads
    else:  # weights gathered for forward and again for backward, gradients reduce-scattered
        zero = ring * (2 * b * total * grad_accum + grads)
    return {"feature_gathers": features, "zero_collectives": zero}


def plan(cfg: Any, cluster: Cluster, vocab_size: int) -> Dict[str, Any]:
    t = cfg.train
    world = cluster.world
    global_batch = t.micro_batch_size * world
    fig = measure_model(cfg, vocab_size, t.micro_batch_size, global_batch)
    samples_per_rank = t.micro_batch_size * t.grad_accum
    compute_s = fig.flops_per_sample * samples_per_rank / (cluster.tflops * 1e12)
    act_scale = 2 if t.precision == "fp32" else 1  # measured in fp32 on meta; bf16 halves it
    from mmpretrain.engine import deepspeed_overrides

    reduce_bucket = deepspeed_overrides(cfg).get("zero_optimization", {}).get("reduce_bucket_size")
    rows = []
    for v in VARIANTS:
        mem = state_memory(v, fig.total, fig.trainable, world, t.precision, reduce_bucket)
        comm = comm_bytes(v, fig.total, fig.trainable, world, t.precision, t.micro_batch_size, t.grad_accum,
                          fig.embed_dim, fig.gathered_modalities)
        comm_s = sum(comm.values()) / (cluster.bottleneck_gbs * 1e9)
        if "offload" in v:  # the CPU Adam's partition crosses PCIe (~25 GB/s) twice a step
            comm_s += 2 * 4 * fig.trainable / world / 25e9
        act = fig.activation_bytes / act_scale
        act_ck = fig.activation_bytes_ckpt / act_scale
        rows.append({
            "variant": v, "weights": mem.weights, "gradients": mem.gradients, "optimizer": mem.optimizer,
            "buffers": mem.buffers,
            "state": mem.device_total, "host_per_rank": mem.host, "activations": act, "activations_ckpt": act_ck,
            "total": mem.device_total + act, "total_ckpt": mem.device_total + act_ck,
            **comm, "comm_s": comm_s, "step_s_overlap": max(compute_s, comm_s), "step_s_serial": compute_s + comm_s,
        })
    return {"cluster": asdict(cluster), "world": world, "micro_batch": t.micro_batch_size, "grad_accum": t.grad_accum,
            "global_batch": global_batch * t.grad_accum, "precision": t.precision, "model": asdict(fig),
            "compute_s_at_peak": compute_s, "variants": rows}


# ----------------------------------------------------------------------------- printing
def _gib(x: float) -> str:
    return f"{x / 2**30:8.2f}"


def format_plan(p: Dict[str, Any]) -> str:
    c, m = p["cluster"], p["model"]
    out = [f"cluster: {c['nodes']} node(s) x {c['gpus_per_node']} {c['gpu']} = {p['world']} ranks; peak "
           f"{c['tflops']:.0f} TFLOP/s, {c['mem_gib']:.0f} GiB, {c['intra_gbs']:.0f} GB/s in a node, "
           f"{c['inter_gbs']:.0f} GB/s across nodes (per GPU)",
           f"batch: micro {p['micro_batch']} x accum {p['grad_accum']} x {p['world']} ranks = {p['global_batch']}; "
           f"precision {p['precision']}", "", "parameters:"]
    for k, v in sorted(m["params"].items(), key=lambda kv: -kv[1]):
        out.append(f"  {k:<24} {v / 1e6:10.2f} M")
    out.append(f"  {'total':<24} {m['total'] / 1e6:10.2f} M ({m['trainable'] / 1e6:.2f} M trainable)")
    out.append("")
    out.append(f"FLOPs per sample (forward + backward, every modality present): {m['flops_per_sample'] / 1e9:.2f} G"
               + "".join(f"; {k} {v / 1e9:.2f} G" for k, v in m["flops_per_sample_by_part"].items()))
    out.append(f"compute per step at peak: {p['compute_s_at_peak'] * 1e3:.1f} ms (a lower bound; 40 % MFU: "
               f"{p['compute_s_at_peak'] / 0.4 * 1e3:.1f} ms)")
    out.append("")
    out.append("per-rank memory, GiB (device); activations at the micro-batch without / with checkpointing:")
    out.append(f"  {'variant':<24}{'weights':>9}{'grads':>9}{'optim':>9}{'buffers':>9}{'acts':>9}{'acts_ck':>9}{'total':>9}"
               f"{'total_ck':>9}{'host':>9}  fits   comm GB  comm ms  step ms")
    for r in p["variants"]:
        fits = "yes" if r["total"] <= c["mem_gib"] * 2**30 * 0.9 else (
            "ckpt" if r["total_ckpt"] <= c["mem_gib"] * 2**30 * 0.9 else "no")
        comm = r["feature_gathers"] + r["zero_collectives"]
        out.append(f"  {r['variant']:<24}{_gib(r['weights'])} {_gib(r['gradients'])}{_gib(r['optimizer'])} {_gib(r['buffers'])}"
                   f"{_gib(r['activations'])}{_gib(r['activations_ckpt'])} {_gib(r['total'])}{_gib(r['total_ckpt'])} "
                   f"{_gib(r['host_per_rank'])}  {fits:<5}{comm / 1e9:9.2f}{r['comm_s'] * 1e3:9.1f}"
                   f"{r['step_s_overlap'] * 1e3:9.1f}")
    out.append("  (fits: within 90 % of the device's memory, 'ckpt' with checkpointing; buffers: ZeRO's reduce bucket; "
               "step ms: compute at peak overlapped with communication)")
    return "\n".join(out)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from mmpretrain.cli import CONFIG_EPILOG, add_config_flags

    p = argparse.ArgumentParser(prog="mmpretrain-plan", description=__doc__, epilog=CONFIG_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the run's YAML config")
    add_config_flags(p)
    p.add_argument("--nodes", type=int, default=1, help="nodes of the cluster (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node, one rank each (default 8)")
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="device table entry (default h100)")
    p.add_argument("--peak-tflops", type=float, help="override the device's peak TFLOP/s")
    p.add_argument("--mem-gib", type=float, help="override the device's memory")
    p.add_argument("--intra-gbs", type=float, help="override the in-node bandwidth per GPU, GB/s")
    p.add_argument("--inter-gbs", type=float, help="override the across-node bandwidth per GPU, GB/s")
    p.add_argument("--vocab-size", type=int, help="the tokenizer's vocabulary size, when data.tokenizer is not on "
                                                  "this machine (default: read from the tokenizer)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.micro_batch_size=64")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mmpretrain.config import ConfigError, load_config

    a = parse_args(argv)
    if a.nodes < 1 or a.gpus_per_node < 1:
        print("error: --nodes and --gpus-per-node must be >= 1", file=sys.stderr)
        return 2
    try:
        cfg = load_config(a.config, a.overrides)
        if a.print_config:  # what would be planned; nothing built
            from mmpretrain.config import to_yaml

            sys.stdout.write(to_yaml(cfg))
            return 0
        if a.vocab_size:
            vocab = a.vocab_size
        else:
            from mmpretrain.data.hf_tokenizer import tokenizer_for

            vocab = tokenizer_for(cfg).vocab_size
    except (ConfigError, FileNotFoundError, OSError, ValueError) as e:
        hint = "" if a.vocab_size or isinstance(e, ConfigError) else " (tokenizer not on this machine? give --vocab-size)"
        print(f"error: {e}{hint}", file=sys.stderr)
        return 2
    g = GPUS[a.gpu]
    cluster = Cluster(a.nodes, a.gpus_per_node, a.gpu, a.peak_tflops or g["tflops"], a.mem_gib or g["mem_gib"],
                      a.intra_gbs or g["intra_gbs"], a.inter_gbs or g["inter_gbs"])
    result = plan(cfg, cluster, vocab)
    print(json.dumps(result, indent=1) if a.json else format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
