"""`python -m mmpretrain.evaluate --checkpoint DIR --data URLS [...]`: retrieval, zero-shot
classification, linear probes and captioning of a trained model, printed as a table (--json: as
JSON; --out FILE also writes the JSON).

DIR is an export (model.safetensors + config.json + tokenizer), a training checkpoint
(`checkpoints/step_N`), or a run directory (its latest checkpoint). Runs on one process or
under any launcher (torchrun / deepspeed): each rank embeds its share of the data."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

import torch
from mmpretrain import distributed as D
from mmpretrain.cli import add_config_flags, config_epilog
from mmpretrain.config import Config, ConfigError, apply_overrides, from_dict, to_dict, to_yaml
from mmpretrain.eval.suite import TASKS, EvalOptions, EvalSuite
from mmpretrain.eval.results_table import format_results
from mmpretrain.eval.zeroshot import load_class_names
from mmpretrain.loading import load_model, saved_config
from mmpretrain.overrides import parse_cli

log = logging.getLogger("mmpretrain.evaluate")


# ----------------------------------------------------------------------------- loading


def load_for_eval(path: str, device: Optional[torch.device] = None) -> Tuple[torch.nn.Module, Config, Any]:
    """(model in eval mode, config, tokenizer) from an export, a checkpoint or a run directory
    (mmpretrain.loading.load_model; device None: the CPU). DeepSpeed's checkpoint converter's
    progress goes to stderr (stdout holds only the result)."""
    return load_model(path, device or "cpu")


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmpretrain-evaluate", description=__doc__, epilog=config_epilog("the checkpoint's saved config"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="export dir, checkpoint dir or run dir")
    p.add_argument("--data", help="eval shard URLs (brace patterns, dirs, `a::b`); required")
    add_config_flags(p, "the checkpoint's saved config plus the overrides")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--class-names", help="json list (or text file, one a line) of class names in label order")
    p.add_argument("--templates", nargs="+", help="prompt templates with {} for the class name")
    p.add_argument("--probe-train", help="shard URLs to train the linear probe on (default: the run config's "
                   "data.train shards when readable, else the --data items split by --probe-group-key)")
    p.add_argument("--probe-group-key", help="json field grouping repeated eval items: without train shards the "
                   "probe trains on half of the groups and scores the rest (default eval.probe_group_key)")
    p.add_argument("--probe-train-max", type=_positive, help="most probe training samples read from the train "
                   "shards (default eval.probe_train_max)")
    p.add_argument("--caption-samples", type=int, help="captions per modality (0 = all; default eval.caption_samples)")
    p.add_argument("--caption-attributes", choices=["demo"], help="also score the demo data's attribute words")
    p.add_argument("--num-beams", type=int, help="beam width of the captioning (default eval.generation.num_beams)")
    p.add_argument("--max-new-tokens", type=int, help="longest caption in tokens (default "
                   "eval.generation.max_new_tokens)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.add_argument("--out", help="also write the JSON here (with or without --json)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.num_workers=0 (anywhere on "
                   "the line, as in training: `key=value` is never a template)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = build_parser()
    args = parse_cli(p, argv)
    if args.data is None and not args.print_config:  # --print-config reads no data
        p.error("the following arguments are required: --data")
    return args


def _positive(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _resolve_config(cfg: Config, args: argparse.Namespace) -> Config:
    """The saved config with the command line's overrides and --probe-group-key."""
    cfg = apply_overrides(cfg, args.overrides)  # parsed, merged and refused as mmpretrain.train does
    if args.probe_group_key is not None:  # through the config: the loaders read the field into batches
        d = to_dict(cfg)
        d["eval"]["probe_group_key"] = args.probe_group_key
        cfg = from_dict(d)  # validated: an empty key is refused
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.print_config:  # the config the evaluation would use; no weights read, no model built
        try:
            sys.stdout.write(to_yaml(_resolve_config(saved_config(args.checkpoint), args)))
        except (ConfigError, FileNotFoundError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    info = D.discover()
    if info.world_size > 1:
        D.init(info)
    device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        model, cfg, tok = load_for_eval(args.checkpoint, device)
        cfg = _resolve_config(cfg, args)
    except (ConfigError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # the Triton kernel runs on CPU only under the interpreter: a CPU evaluation of a GPU run picks per call
    model.set_attention_backend(cfg.model.attention_backend if cfg.model.attention_backend != "triton"
                                or device.type == "cuda" else "auto")
    gen = cfg.eval.generation
    if args.num_beams is not None:
        gen = dataclasses.replace(gen, num_beams=args.num_beams)
    if args.max_new_tokens is not None:
        gen = dataclasses.replace(gen, max_new_tokens=args.max_new_tokens)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    names = None
    if args.class_names:
        names = load_class_names(args.class_names)
    opts = EvalOptions(tasks=tasks, batch_size=args.batch_size, class_names=names, templates=args.templates,
                       probe_train_urls=args.probe_train, probe_train_max=args.probe_train_max,
                       caption_samples=args.caption_samples, generation=gen,
                       caption_attributes=args.caption_attributes)
    try:
        res = EvalSuite(model, cfg, tok, device).run(args.data, opts)
    except ValueError as e:  # an unknown task
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = {"checkpoint": args.checkpoint, "data": args.data, **res}
    refused = res.get("linear_probe", {}).get("refused")
    if refused and info.is_main:
        print(f"warning: {refused}", file=sys.stderr)
    if info.is_main:
        text = json.dumps(res, indent=1)
        print(text if args.json else format_results(res), end="\n" if args.json else "")
        if args.out:
            Path(args.out).write_text(text + "\n")
    D.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
