"""Command lines with dotted config overrides (`section.key=value`), shared by mmpretrain.train,
mmpretrain.evaluate and mmpretrain-submit: a `key=value` token is an override wherever it stands,
so a list option (`--templates "a photo of {}" data.num_workers=0`) never swallows one. Torch-free:
train.py parses its command line before the heavy imports."""
from __future__ import annotations

import argparse
import re
import sys
from typing import List, Optional, Sequence, Tuple

# a dotted config key (list items as `.0` or `[0]`), then '=': `optim.lr=3e-4`, `data.train=[...]`
_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+|\[\d+\])*=")


def is_override(token: str) -> bool:
    return bool(_OVERRIDE.match(token))


def _values_taken(parser: argparse.ArgumentParser, token: str) -> int:
    """How many following tokens the option `token` takes for sure: 1 for a plain option, N for
    nargs=N, 0 for flags, `--opt=value` and list options (nargs '*', '+', '?'), which stop at an
    override. Unique prefixes resolve as argparse's abbreviations do."""
    if not token.startswith("-") or "=" in token:
        return 0
    actions = parser._option_string_actions  # argparse keeps no public map of option strings
    action = actions.get(token)
    if action is None and parser.allow_abbrev and token.startswith("--"):
        hits = {a for s, a in actions.items() if s.startswith(token)}
        action = hits.pop() if len(hits) == 1 else None
    if action is None:
        return 0
    if action.nargs is None:  # store / append: one value (flags have nargs=0)
        return 1
    return action.nargs if isinstance(action.nargs, int) else 0


def split_overrides(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(the other tokens, the overrides in order) of `argv`."""
    rest: List[str] = []
    overrides: List[str] = []
    pending = 0  # values the previous option still takes: `--out a=b.json` keeps its value
    for tok in argv:
        if pending:
            rest.append(tok)
            pending -= 1
        elif is_override(tok):
            overrides.append(tok)
        else:
            rest.append(tok)
            pending = _values_taken(parser, tok)
    return rest, overrides


def parse_cli(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """`parser.parse_args` with the overrides taken out first and put in `args.overrides` (the
    parser's positional `overrides` catches anything else, which config.parse_overrides refuses)."""
    rest, overrides = split_overrides(parser, list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(rest)
    args.overrides = overrides + list(getattr(args, "overrides", None) or [])
    return args
