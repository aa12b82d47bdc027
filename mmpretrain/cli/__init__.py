"""What every `mmpretrain-*` command line shares: `--help-config`, `--print-config`, the epilog
about config keys, and hidden aliases for renamed flags. The user-facing tools live in this
package too (`mmpretrain-make-shards` = mmpretrain.cli.make_shards, ...); `tools/*.py` are thin
wrappers that keep `python tools/x.py` working. Torch-free."""
from __future__ import annotations

import argparse
import sys
import textwrap
from typing import Any, Optional, Sequence



def config_epilog(base: str = "the --config file") -> str:
    """The --help epilog of a command that takes config overrides on top of `base`."""
    return textwrap.fill(
        f"Config overrides: any config key as a dotted key=value anywhere on the line, applied in order on top "
        f"of {base}, e.g. optim.lr=3e-4 train.steps=1000 data.num_workers=0. "
        "--help-config [PREFIX] lists every key (or those starting with PREFIX, e.g. data.) with its type, "
        "default, allowed values and meaning; --print-config prints the resolved config as YAML and exits.",
        width=95, break_on_hyphens=False, break_long_words=False)


CONFIG_EPILOG = config_epilog()


def tool_epilog(text: str) -> str:
    """An epilog for a tool without a config of its own: `text`, then where the config keys are."""
    return f"{text.rstrip()}\nEvery config key (type, default, allowed values): mmpretrain-train --help-config."


class HelpConfigAction(argparse.Action):
    """`--help-config [PREFIX]`: print the config keys and exit 0 at once, as --help does (so the
    command's required flags need not be given)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: Optional[str] = None) -> None:
        super().__init__(option_strings, dest, nargs="?", const="", default=default, metavar="PREFIX", help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        from mmpretrain.config_help import help_config  # torch-free

        try:
            text = help_config(values or "")
        except ValueError as e:  # a prefix no key starts with
            parser.exit(2, f"{parser.prog}: error: {e}\n")
        sys.stdout.write(text)
        parser.exit(0)


def add_config_flags(p: argparse.ArgumentParser, print_what: str = "the config file plus the overrides") -> None:
    """--print-config and --help-config, the same on every command that takes a config."""
    p.add_argument("--print-config", action="store_true",
                   help=f"print the resolved config ({print_what}) as YAML after validation, then exit "
                        "without starting anything")
    p.add_argument("--help-config", action=HelpConfigAction,
                   help="list every config key (or those starting with PREFIX) with type, default, allowed "
                        "values and a one-line doc, then exit")


def add_alias(p: argparse.ArgumentParser, old: str, new: str, **kwargs: Any) -> None:
    """`old` keeps working as a hidden spelling of the flag `new` (same destination, not in --help)."""
    dest = new.lstrip("-").replace("-", "_")
    p.add_argument(old, dest=dest, help=argparse.SUPPRESS, **kwargs)
