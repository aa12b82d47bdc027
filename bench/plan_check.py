"""The capacity planner's per-rank model-state memory (`mmpretrain-plan`) against what real
DeepSpeed runs hold: each case trains 2 steps under torchrun on CPU, then every rank counts the
bytes of every live tensor storage (weights or their ZeRO-3 shards, gradients and DeepSpeed's
flat buffers, fp32 partitions, Adam moments), once per storage. Also P5 of issue 15: under ZeRO-3
the weights + optimizer state a rank holds vs (the whole model's) / world size.

Usage: python bench/plan_check.py [--procs 2 4] [--variants zero1 zero2 zero3] [--config configs/tiny_test.yaml]
       [--width 256] [key=value ...]   (prints a table; exits 1 when a figure is off by more than 15 %;
       PLAN_CHECK_DEBUG=1 also prints each rank's largest storages)
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def live_bytes() -> dict:
    """Bytes of every live tensor storage of this process, once per storage, split into weights
    (parameters or their ZeRO-3 shards) and the total."""
    import torch

    seen, weights = {}, set()
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type == "meta":
                continue
            s = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - half-built objects during collection
            continue
        if s.nbytes() == 0:
            continue
        seen[s.data_ptr()] = s.nbytes()
        if isinstance(obj, torch.nn.Parameter):
            shard = getattr(obj, "ds_tensor", None)
            weights.add((shard if shard is not None else obj).untyped_storage().data_ptr())
    if os.environ.get("PLAN_CHECK_DEBUG"):
        print("largest storages (bytes):", sorted(seen.values())[-6:], file=sys.stderr)
    return {"total": sum(seen.values()), "weights": sum(seen[p] for p in weights if p in seen),
            "_seen": seen}


def child(out: str, config: str, overrides: list) -> None:
    import torch

    from mmpretrain import distributed as D
    from mmpretrain.config import load_config
    from mmpretrain.data.hf_tokenizer import tokenizer_for
    from mmpretrain.engine import build_engine
    from mmpretrain.models import build_model, zero3
    from mmpretrain.plan import synthetic_batch
    from mmpretrain.trainer import seed_everything

    info = D.discover()
    D.init(info)
    cfg = load_config(config, overrides)
    vocab = tokenizer_for(cfg).vocab_size
    seed_everything(0)
    with zero3.construction(cfg, info.world_size):
        model = build_model(cfg, vocab)
    engine, opt, _ = build_engine(cfg, model, info.world_size)
    # the peak of model state: when the last gradient of step 2 is accumulated (ZeRO-0/1 hold every
    # gradient then, before their reduction) or after the backward (reduced partitions), whichever
    # holds more; the optimizer state exists from step 1 on
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    marks = {"armed": False, "left": 0, "held": []}

    def on_grad(_p):
        if marks["armed"]:
            marks["left"] -= 1
            if marks["left"] == 0:
                gc.collect()
                marks["held"].append(live_bytes())

    hooks = [p.register_post_accumulate_grad_hook(on_grad) for p in trainable_params]
    for step in range(2):
        batch = synthetic_batch(cfg, cfg.train.micro_batch_size, vocab, "cpu", seed=step + 10 * info.rank)
        marks["armed"], marks["left"] = step == 1, len(trainable_params)
        loss, _ = engine(batch)
        engine.backward(loss)
        del batch, loss
        if step == 1:
            gc.collect()
            marks["held"].append(live_bytes())
        engine.step()
    for h in hooks:
        h.remove()
    held = max(marks["held"], key=lambda h: h["total"])
    inner = getattr(opt, "optimizer", opt)  # DeepSpeed's wrapper -> the torch optimizer
    state = {t.untyped_storage().data_ptr() for st in inner.state.values() for t in st.values()
             if torch.is_tensor(t) and t.dim() > 0}
    held["adam_moments"] = sum(held["_seen"].get(p, 0) for p in state)
    del held["_seen"]
    full = sum(math.prod(zero3.full_shape(p)) for p in model.parameters())
    trainable = sum(math.prod(zero3.full_shape(p)) for p in model.parameters() if p.requires_grad)
    rows = [None] * info.world_size
    torch.distributed.all_gather_object(rows, held)
    if info.rank == 0:
        with open(out, "w") as f:
            json.dump({"ranks": rows, "total_params": full, "trainable": trainable}, f)


def run_case(nproc: int, variant: str, config: str, overrides: list) -> dict:
    stage = int(variant[4])
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.json")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.abspath(__file__), "--child", out, config, *overrides,
               f"train.zero_stage={stage}", f"run.output_dir={d}/run", "train.zero3_init=true"]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, start_new_session=True)
        if os.environ.get("PLAN_CHECK_DEBUG"):
            print(res.stderr[-2000:])
        if res.returncode != 0:
            raise RuntimeError(f"{variant} x {nproc} failed:\n{res.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], [a for a in sys.argv[4:] if not a.startswith("--local_rank")])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--variants", nargs="+", default=["zero1", "zero2", "zero3"])
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny_test.yaml"))
    ap.add_argument("--width", type=int, default=256, help="width of every tower (size of the model)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    from mmpretrain.plan import state_memory

    w = a.width
    sizes = [f"model.{t}.width={w}" for t in ("vision", "audio", "text")] + [
        "model.embed_dim=128", "train.precision=fp32", "train.micro_batch_size=4", "data.num_workers=0"]
    overrides = sizes + list(a.overrides)
    print(f"per-rank model state, MiB: planner vs counted live tensors (CPU, fp32, towers width {w})")
    print(f"{'variant':<8}{'procs':>6}{'planned':>10}{'counted':>10}{'ratio':>7}   P5 weights+optimizer vs whole/world")
    worst = 0.0
    for variant in a.variants:
        for n in a.procs:
            r = run_case(n, variant, a.config, overrides)
            plan = state_memory(variant, r["total_params"], r["trainable"], n, "fp32").device_total
            counted = max(x["total"] for x in r["ranks"])
            ratio = counted / plan
            worst = max(worst, abs(ratio - 1))
            p5 = ""
            if variant == "zero3":
                # weights + Adam state one rank holds, against the whole model's over the world size
                whole = (4 + 12) * r["total_params"] / n
                held = max(x["weights"] + x["adam_moments"] + 4 * r["trainable"] / n for x in r["ranks"])
                p5 = f"{held / whole:.3f}x"
            print(f"{variant:<8}{n:>6}{plan / 2**20:10.1f}{counted / 2**20:10.1f}{ratio:7.2f}   {p5}", flush=True)
    print(f"largest planner error: {worst:.1%} (target <= 15 %)")
    return 0 if worst <= 0.15 else 1


if __name__ == "__main__":
    sys.exit(main())
