"""The training entry point every launcher starts:
`python -m mmpretrain.train --config FILE [dotted.key=value ...]`.

The config is checked before anything heavy is imported, so a refusal costs a fraction of a
second and writes nothing; the trainer (torch, DeepSpeed, the model) is imported after."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from mmpretrain import preflight
from mmpretrain.cli import CONFIG_EPILOG, add_config_flags
from mmpretrain.config import ConfigError, load_config, to_yaml
from mmpretrain.overrides import parse_cli
from mmpretrain.preemption import install_early


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmpretrain-train", description=__doc__, epilog=CONFIG_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config (configs/*.yaml); without it the schema's defaults")
    add_config_flags(p)
    # the deepspeed launcher appends --local_rank=N; discovery reads LOCAL_RANK instead
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = build_parser()
    return parse_cli(p, argv)  # `key=value` is an override wherever it stands (shared with evaluate, submit)


def main(argv: Optional[Sequence[str]] = None) -> int:
    # first: a USR1/TERM during start-up (config, heavy imports, model, checkpoint load) is recorded
    # and honoured at the first step boundary, not fatal (a requeued job gets it exactly then)
    install_early()
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)  # refused before any process group starts
        if args.print_config:  # the schema's checks only: shards and paths need not exist yet
            sys.stdout.write(to_yaml(cfg))
            return 0
        # shards, tokenizer, resume path, run directory, master port: still nothing built or written
        preflight.check(cfg, args.config)
    except ConfigError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the message holds
        return 2
    # imported only now: torch, DeepSpeed and the model cost seconds, a refusal above does not
    from mmpretrain import trainer

    return trainer.run(cfg)


if __name__ == "__main__":
    sys.exit(main())
