"""Plain-text tables of eval results for the console."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from mmpretrain import modalities as M


def directions() -> List[str]:
    """Both directions of every contrastive pair, in pair order."""
    return [d for p in M.pairs() for d in (f"{p.a}_to_{p.b}", f"{p.b}_to_{p.a}")]


def format_table(before: Optional[Dict[str, Any]], after: Dict[str, Any], ks=("R@1", "R@5")) -> str:
    cols = [(f"{k} before", before, k) for k in ks] if before else []
    cols += [(f"{k} after", after, k) for k in ks]
    head = f"{'direction':<16}" + "".join(f"{c[0]:>12}" for c in cols) + f"{'chance R@1':>12}"
    lines = [head, "-" * len(head)]
    for d in directions():
        if f"{d}/R@1" not in after:
            continue
        row = f"{d:<16}" + "".join(f"{src.get(f'{d}/{k}', float('nan')):>12.3f}" for _, src, k in cols)
        row += f"{after.get(f'{d}/chance', float('nan')):>12.3f}"
        lines.append(row)
    return "\n".join(lines)
