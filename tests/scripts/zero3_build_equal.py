"""Run by tests under torchrun: build the model of `--config FILE [overrides]` under
`deepspeed.zero.Init` (the trainer's `zero3.construction`) and as a whole, from the same seed, and
compare every weight; each `--variant` adds overrides for one more model, built in the same
process group. Writes OUT.json on rank 0: per variant, per rank (local, full) parameter counts,
whether every parameter was partitioned, and the names of weights that differ.
Usage: zero3_build_equal.py OUT.json --config FILE [overrides] [--variant overrides ...]..."""
from __future__ import annotations

import json
import sys

import torch

from mmpretrain import distributed as D
from mmpretrain.config import load_config
from mmpretrain.data.hf_tokenizer import tokenizer_for
from mmpretrain.models import build_model, zero3
from mmpretrain.preflight import check_towers
from mmpretrain.trainer import seed_everything


def compare(cfg, info) -> dict:
    check_towers(cfg)  # fills what preflight fills (image statistics, the audio front end)
    vocab = tokenizer_for(cfg).vocab_size
    seed_everything(cfg.run.seed)
    with zero3.construction(cfg, info.world_size) as partitioned:
        model = build_model(cfg, vocab)
    counts = zero3.local_and_full_numel(model)
    all_partitioned = all(zero3.is_partitioned(p) for p in model.parameters())
    with zero3.gathered(list(model.parameters()), modifier_rank=None):
        sharded = {k: v.detach().clone() for k, v in model.state_dict().items()}
    seed_everything(cfg.run.seed)
    whole = build_model(cfg, vocab).state_dict()
    # under bf16 zero.Init makes bf16 shards; the whole model is cast by the engine later: compare cast
    differ = sorted(k for k in whole if k not in sharded or not torch.equal(whole[k].to(sharded[k].dtype), sharded[k]))
    dtypes = sorted({str(v.dtype) for v in sharded.values() if v.is_floating_point()})
    # largest difference relative to the weight's scale, over the differing weights
    rel = [float((whole[k].to(sharded[k].dtype).float() - sharded[k].float()).abs().max()
                 / whole[k].float().abs().max().clamp(min=1e-12)) for k in differ if k in sharded]
    gathered = [None] * info.world_size
    torch.distributed.all_gather_object(gathered, counts)
    return {"partitioned": partitioned and all_partitioned, "counts": gathered, "differ": differ, "keys": len(whole),
            "dtypes": dtypes, "max_rel": max(rel, default=0.0)}


def main() -> int:
    out_file, _, config, *rest = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    variants, cur = [], []
    for a in rest + ["--variant"]:
        if a == "--variant":
            variants.append(cur)
            cur = []
        else:
            cur.append(a)
    info = D.discover()
    D.init(info)
    base = variants[0]
    results = [compare(load_config(config, base + extra), info) for extra in [[]] + variants[1:]]
    if info.rank == 0:
        with open(out_file, "w") as f:
            json.dump(results, f)
    torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
