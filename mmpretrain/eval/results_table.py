"""The readable form of `mmpretrain.evaluate`'s result (its default output; --json prints the
dict itself): retrieval R@K per direction, zero-shot and linear-probe accuracy / macro recall /
macro F1, captioning scores, in aligned columns."""
from __future__ import annotations

import json
import re
from typing import Any, List, Mapping, Optional, Sequence

from mmpretrain.eval.report import directions

_GAP = "  "


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    """Lines of an aligned table: the first column left-aligned, the others right-aligned, columns
    two spaces apart (so a header such as 'median rank' stays one column)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return _GAP.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return str(v)
    return "nan" if v != v else f"{v:.{digits}f}"


def _not_run(name: str, part: Any) -> Optional[str]:
    """'zero-shot: skipped (why)' for a task that gave no figures, else None."""
    if not isinstance(part, Mapping):
        return None
    for why in ("skipped", "refused"):
        if why in part:
            return f"{name}: {why}: {part[why]}"
    return None


def _retrieval(title: str, r: Mapping[str, Any]) -> List[str]:
    found = list(dict.fromkeys(k.split("/")[0] for k in r if "/" in k))
    dirs = [d for d in directions() if d in found] + [d for d in found if d not in directions()]  # pair by pair
    ks = sorted({int(m.group(1)) for k in r for m in [re.search(r"/R@(\d+)$", k)] if m})
    if not dirs or not ks:
        return [f"{title}: no direction had samples with both modalities"]
    header = ["direction", *(f"R@{k}" for k in ks), "median rank", "queries", "chance R@1"]
    rows = [[d, *(_num(r.get(f"{d}/R@{k}")) for k in ks), _num(r.get(f"{d}/median_rank"), 1),
             _num(r.get(f"{d}/num_queries")), _num(r.get(f"{d}/chance"))] for d in dirs]
    return [title, *table(header, rows)]


def _classification(title: str, part: Mapping[str, Any], first: str, extra: Sequence[tuple]) -> List[str]:
    names = [k for k, v in part.items() if isinstance(v, Mapping) and "accuracy" in v]
    if not names:
        return [f"{title}: no figures"]
    header = [first, "accuracy", "macro recall", "macro F1", *(h for h, _ in extra)]
    rows = [[n, *(_num(part[n].get(k)) for k in ("accuracy", "macro_recall", "macro_f1")),
             *(_num(part[n].get(k)) for _, k in extra)] for n in names]
    return [title, *table(header, rows)]


def _captioning(part: Mapping[str, Any], examples: int) -> List[str]:
    mods = [m for m, v in part.items() if isinstance(v, Mapping) and "num_samples" in v]
    if not mods:
        return ["captioning: no figures"]
    cols = [c for c in ("BLEU", "CIDEr", "exact_match") if any(c in part[m] for m in mods)]
    attrs = any(isinstance(part[m].get("attribute_accuracy"), Mapping) for m in mods)
    header = ["modality", *(c.replace("_", " ") for c in cols), *(["attributes"] if attrs else []), "samples"]
    rows = []
    for m in mods:
        a = part[m].get("attribute_accuracy")
        rows.append([m, *(_num(part[m].get(c)) for c in cols),
                     *([_num(a.get("all")) if isinstance(a, Mapping) else "-"] if attrs else []),
                     _num(part[m].get("num_samples"))])
    out = ["captioning", *table(header, rows)]
    for m in mods:
        for ex in (part[m].get("examples") or [])[:examples]:  # json.dumps escapes control bytes
            out.append(f"  {m}: {json.dumps(ex.get('prediction', ''), ensure_ascii=False)}"
                       f"  (reference {json.dumps(ex.get('reference', ''), ensure_ascii=False)})")
    return out


def format_results(res: Mapping[str, Any], examples: int = 2) -> str:
    """`mmpretrain.evaluate`'s result dict as text: a block per task that ran."""
    head = [[label, str(res[k])] for k, label in (("checkpoint", "checkpoint"), ("data", "data"),
                                                  ("num_samples", "samples")) if k in res]
    blocks: List[List[str]] = [[f"{k:<12}{v}" for k, v in head]] if head else []
    if "retrieval" in res:
        labelled = "retrieval_instance" in res  # class-level when every sample has a label
        blocks.append(_retrieval("retrieval (a hit is any item of the query's class)" if labelled else
                                 "retrieval (a hit is the paired item)", res["retrieval"]))
        if labelled:
            blocks.append(_retrieval("retrieval, instance level (a hit is the paired item)", res["retrieval_instance"]))
    if "zeroshot" in res:
        z = res["zeroshot"]
        lines = [_not_run("zero-shot", z)] if _not_run("zero-shot", z) else _classification(
            "zero-shot classification", z, "modality", [("samples", "num_samples")])
        if isinstance(z, Mapping) and z.get("templates"):
            lines.append(f"  {len(z.get('classes') or [])} classes; templates: "
                         + ", ".join(json.dumps(t, ensure_ascii=False) for t in z["templates"]))
        blocks.append(lines)
    if "linear_probe" in res:
        p = res["linear_probe"]
        lines = [_not_run("linear probe", p)] if _not_run("linear probe", p) else _classification(
            "linear probe", p, "features", [("train", "num_train"), ("test", "num_samples")])
        if isinstance(p, Mapping) and isinstance(p.get("split"), Mapping) and p["split"].get("description"):
            lines.append(f"  {p['split']['description']}")
        blocks.append(lines)
    if "captioning" in res:
        c = res["captioning"]
        blocks.append([_not_run("captioning", c)] if _not_run("captioning", c) else _captioning(c, examples))
    return "\n\n".join("\n".join(b) for b in blocks) + "\n"
