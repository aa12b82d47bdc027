"""Pictures of one or more runs from their metrics.jsonl, without writing a script.

    mmpretrain-plot RUN_DIR [RUN_DIR ...] [--out report.html | report.png]

Panels (only those some run has data for): total and contrastive loss, loss per modality pair,
captioning loss, temperature per pair (1 / logit scale), learning rate, throughput, data wait
against step time, and from the eval records retrieval recall per direction (R@1, R@5, ...) and
zero-shot accuracy. Several runs are overlaid, each labelled by its directory name.

`.html`: one self-contained page (inline SVG drawn by matplotlib, no script, nothing fetched).
`.png`: one image, a grid of the panels. Both carry the plotted series as JSON (HTML: a
`<script type="application/json" id="mmpretrain-series">` block; PNG: the `mmpretrain-series`
text chunk, `PIL.Image.open(p).text["mmpretrain-series"]`), so what is drawn can be read back.

A step logged twice (a resumed run repeats the steps after its last checkpoint) keeps its last
record; a pair's loss is left out at steps whose batch had no row with both modalities (`pairs/<pair>`
0: the 0 logged there is no loss); lines that are not JSON objects (a record cut short by a crash) are skipped and counted."""
from __future__ import annotations

import argparse
import html
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

SERIES_ID = "mmpretrain-series"  # the HTML script id and the PNG text-chunk key
FORMAT = "mmpretrain-series/1"

# panel id -> (title, y label); the order is the page's
PANELS: Dict[str, Tuple[str, str]] = {
    "loss": ("Loss: total and contrastive", "loss"),
    "loss_pairs": ("Contrastive loss per modality pair", "loss"),
    "caption_loss": ("Captioning loss", "loss"),
    "temperature": ("Temperature per pair (1 / logit scale)", "temperature"),
    "lr": ("Learning rate", "lr"),
    "throughput": ("Throughput (all ranks)", "samples/s"),
    "data_wait": ("Data wait vs step time", "seconds per step"),
    # "recall/<direction>" panels go here, one per direction
    "zeroshot": ("Zero-shot accuracy (eval)", "accuracy"),
}
_DIRECTION = re.compile(r"^([A-Za-z0-9]+_to_[A-Za-z0-9]+)/R@(\d+)$")


class PlotError(Exception):
    """A run that cannot be plotted: the message names the path."""


def _train_key(key: str) -> Optional[Tuple[str, str]]:
    """A train record's key -> (panel, series name), or None when not plotted."""
    if key == "loss":
        return "loss", "total"
    if key == "loss/contrastive":
        return "loss", "contrastive"
    if key == "loss/caption":
        return "caption_loss", "all"
    if key.startswith("loss/caption_"):
        return "caption_loss", key[len("loss/caption_"):]
    if key.startswith("loss/"):
        return "loss_pairs", key[5:]
    if key.startswith("temperature/"):
        return "temperature", key[len("temperature/"):]
    return {"lr": ("lr", "lr"), "samples_per_s": ("throughput", "samples/s"),
            "data_wait": ("data_wait", "data wait"), "step_time": ("data_wait", "step time")}.get(key)


def _eval_key(key: str) -> Optional[Tuple[str, str]]:
    m = _DIRECTION.match(key)
    if m:
        return f"recall/{m.group(1)}", f"R@{m.group(2)}"
    parts = key.split("/")
    if parts[0] == "zeroshot" and parts[-1] == "accuracy":
        return "zeroshot", parts[1] if len(parts) == 3 else "accuracy"
    return None


KINDS: Dict[str, Callable[[str], Optional[Tuple[str, str]]]] = {"train": _train_key, "eval": _eval_key}


@dataclass
class Run:
    path: Path  # the metrics file
    given: str  # as named on the command line
    label: str = ""
    records: int = 0
    skipped: List[int] = field(default_factory=list)  # line numbers that were not JSON objects
    # (panel, name) -> {step: value}; the key a series came from, for the JSON
    data: Dict[Tuple[str, str], Dict[int, float]] = field(default_factory=dict)
    keys: Dict[Tuple[str, str], str] = field(default_factory=dict)


def _number(v: Any) -> Optional[float]:
    """A finite number, else None ('NaN' strings, None, bools, dicts are not drawn)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def metrics_file(given: str) -> Path:
    p = Path(given)
    if p.is_file():
        return p  # a metrics.jsonl named directly
    if not p.exists():
        raise PlotError(f"run directory not found: {given}")
    if not p.is_dir():
        raise PlotError(f"not a run directory: {given}")
    f = p / "metrics.jsonl"
    if not f.is_file():
        raise PlotError(f"no metrics.jsonl in {given} (is it a run directory? run.output_dir of a training run)")
    return f


def read_run(given: str) -> Run:
    run = Run(path=metrics_file(given), given=given)
    with open(run.path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if not isinstance(rec, dict):
                run.skipped.append(n)
                continue
            run.records += 1
            step, kind = rec.get("step"), rec.get("kind", "train")  # MetricsLogger's default kind
            if isinstance(step, bool) or not isinstance(step, int) or kind not in KINDS:
                continue
            for key, value in rec.items():
                where, v = KINDS[kind](key), _number(value)
                if where is not None and where[0] == "loss_pairs" and rec.get(f"pairs/{where[1]}") == 0:
                    continue  # no row of the batch had both modalities: the 0 logged is no loss
                if where is not None and v is not None:
                    run.data.setdefault(where, {})[step] = v  # a repeated step: the last record wins
                    run.keys[where] = key
    if run.records == 0:
        what = f"only {len(run.skipped)} line(s) that are not JSON" if run.skipped else "no records"
        raise PlotError(f"{run.path} holds {what}: nothing to plot")
    return run


def _labels(paths: Sequence[Path]) -> List[str]:
    """The run directory's name; more of the path where two names clash, #k where paths do."""
    dirs = [(p.parent if p.name == "metrics.jsonl" else p.with_suffix("")).resolve() for p in paths]
    for depth in range(1, max(len(d.parts) for d in dirs) + 1):
        labels = ["/".join(d.parts[-depth:]) for d in dirs]
        if len(set(labels)) == len(labels):
            return labels
    seen: Dict[str, int] = {}
    out = []
    for d in dirs:
        seen[d.name] = seen.get(d.name, 0) + 1
        out.append(d.name if seen[d.name] == 1 else f"{d.name}#{seen[d.name]}")
    return out


def _panel_order(pid: str, first_seen: Dict[str, int]) -> Tuple[float, int]:
    """The PANELS order; recall panels (in order of appearance) just before zero-shot accuracy."""
    order = list(PANELS)
    if pid.startswith("recall/"):
        return order.index("zeroshot") - 0.5, first_seen[pid]
    return order.index(pid), 0


def _series_order(name: str, first_seen: int) -> Tuple[int, int]:
    if name in ("total", "all"):
        return -1, 0  # the sum first, then its terms
    m = re.match(r"R@(\d+)$", name)
    return (int(m.group(1)), 0) if m else (first_seen, 0)


def build_series(runs: Sequence[Run]) -> Dict[str, Any]:
    """Everything drawn, as the JSON embedded in the outputs."""
    first_seen: Dict[str, int] = {}
    names: Dict[str, Dict[str, int]] = {}
    for run in runs:
        for pid, name in run.data:
            first_seen.setdefault(pid, len(first_seen))
            names.setdefault(pid, {}).setdefault(name, len(names[pid]))
    panels = []
    for pid in sorted(first_seen, key=lambda p: _panel_order(p, first_seen)):
        if pid.startswith("recall/"):
            title, ylabel = f"Recall {pid[len('recall/'):]} (eval)", "recall"
        else:
            title, ylabel = PANELS[pid]
        series = []
        for name in sorted(names[pid], key=lambda n: _series_order(n, names[pid][n])):
            for run in runs:
                pts = run.data.get((pid, name))
                if pts:
                    steps = sorted(pts)
                    series.append({"run": run.label, "name": name, "key": run.keys[(pid, name)],
                                   "steps": steps, "values": [pts[s] for s in steps]})
        panels.append({"id": pid, "title": title, "ylabel": ylabel, "x": "step", "series": series})
    return {"format": FORMAT,
            "runs": [{"label": r.label, "path": r.given, "records": r.records, "skipped_lines": len(r.skipped)}
                     for r in runs],
            "panels": panels}


# ----------------------------------------------------------------------------- drawing
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf"]  # matplotlib's tab10
STYLES = ["-", "--", ":", "-."]


def _draw(ax: Any, panel: Dict[str, Any], run_labels: List[str]) -> None:
    names = list(dict.fromkeys(s["name"] for s in panel["series"]))
    runs_here = list(dict.fromkeys(s["run"] for s in panel["series"]))
    many_runs, many_names = len(run_labels) > 1, len(names) > 1
    evalish = panel["id"].startswith("recall/") or panel["id"] == "zeroshot"
    for s in panel["series"]:
        r, n = run_labels.index(s["run"]), names.index(s["name"])
        # several runs: a colour per run, a line style per series; one run: a colour per series
        color = COLORS[(r if many_runs else n) % len(COLORS)]
        style = STYLES[n % len(STYLES)] if many_runs else "-"
        label = f"{s['run']}: {s['name']}" if many_runs and many_names else s["run"] if many_runs else s["name"]
        ax.plot(s["steps"], s["values"], style, color=color, label=label, linewidth=1.3,
                marker="o" if evalish or len(s["steps"]) == 1 else None, markersize=3)
    ax.set_title(panel["title"], fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel(panel["ylabel"], fontsize=8)
    ax.tick_params(labelsize=7)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)  # lr: 2e-3, not 0.00200
    ax.grid(True, alpha=0.3)
    if many_names or len(runs_here) > 1 or many_runs:
        points = sum(len(s["steps"]) for s in panel["series"])
        ax.legend(fontsize=7, loc="best" if points < 2000 else "upper right")  # "best" scans every point


def _figure(figsize: Tuple[float, float]) -> Any:
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no display backend
    except ImportError as e:
        raise PlotError("matplotlib is not installed: pip install 'mmpretrain[plot]'") from e
    # fixed margins, no layout engine: a constrained layout draws every figure twice
    return Figure(figsize=figsize)


def render_png(series: Dict[str, Any], out: Path) -> None:
    panels = series["panels"]
    labels = [r["label"] for r in series["runs"]]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _figure((5.2 * cols, 3.6 * rows))
    w, h = 5.2 * cols, 3.6 * rows
    fig.subplots_adjust(left=0.7 / w, right=1 - 0.15 / w, bottom=0.5 / h, top=1 - 0.8 / h, wspace=0.3, hspace=0.42)
    for i, panel in enumerate(panels):
        _draw(fig.add_subplot(rows, cols, i + 1), panel, labels)
    fig.suptitle("mmpretrain: " + ", ".join(labels), fontsize=11, y=1 - 0.12 / h)
    # the series as a PNG text chunk (ASCII JSON: always a plain tEXt, readable by PIL)
    fig.savefig(out, format="png", dpi=90, metadata={"Software": "mmpretrain-plot", SERIES_ID: json.dumps(series)})


def _svg(panel: Dict[str, Any], labels: List[str], prefix: str) -> str:
    fig = _figure((6.4, 4.0))
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.12, top=0.92)
    _draw(fig.add_subplot(1, 1, 1), panel, labels)
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]  # inline: no XML declaration or DOCTYPE
    text = re.sub(r"<metadata>.*?</metadata>", "", text, count=1, flags=re.S)
    # every figure names its groups figure_1, axes_1, ...: one page needs ids unique across figures
    return re.sub(r'(\bid="|url\(#|href="#)', rf"\g<1>{prefix}-", text)


def render_html(series: Dict[str, Any], out: Path) -> None:
    labels = [r["label"] for r in series["runs"]]
    rows = "".join(
        f"<tr><td>{html.escape(r['label'])}</td><td><code>{html.escape(r['path'])}</code></td>"
        f"<td>{r['records']}</td><td>{r['skipped_lines']}</td></tr>" for r in series["runs"])
    figures = "".join(f'<figure id="{html.escape(p["id"])}">{_svg(p, labels, f"p{i}")}</figure>\n'
                      for i, p in enumerate(series["panels"]))
    # "</" inside a script block would end it: JSON allows "\/" for "/"
    data = json.dumps(series).replace("</", "<\\/")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>mmpretrain: {html.escape(", ".join(labels))}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }}
td, th {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 0.5em; }}
figure {{ margin: 0; }} figure svg {{ width: 100%; max-width: 640px; height: auto; }}
</style></head><body>
<h1>mmpretrain runs</h1>
<table><tr><th>run</th><th>path</th><th>records</th><th>lines skipped (not JSON)</th></tr>{rows}</table>
<p>The plotted series are embedded as JSON in the script block <code>#{SERIES_ID}</code>.</p>
<div class="grid">
{figures}</div>
<script type="application/json" id="{SERIES_ID}">{data}</script>
</body></html>
"""
    out.write_text(page, encoding="utf-8")


def read_series(path: str) -> Dict[str, Any]:
    """The series a report embeds (HTML or PNG): for tests and for users' own analysis."""
    p = Path(path)
    if p.suffix.lower() == ".png":
        from PIL import Image

        with Image.open(p) as im:
            return json.loads(im.text[SERIES_ID])
    text = p.read_text(encoding="utf-8")
    m = re.search(rf'<script type="application/json" id="{SERIES_ID}">(.*?)</script>', text, flags=re.S)
    if m is None:
        raise PlotError(f"{path} embeds no {SERIES_ID} block")
    return json.loads(m.group(1))


RENDERERS = {".html": render_html, ".htm": render_html, ".png": render_png}


def plot(run_dirs: Sequence[str], out: str) -> Dict[str, Any]:
    """Read the runs, draw them to `out` (.html or .png); returns the series written."""
    out_path = Path(out)
    render = RENDERERS.get(out_path.suffix.lower())
    if render is None:
        raise PlotError(f"--out {out}: the suffix chooses the output, .html or .png")
    runs = [read_run(d) for d in run_dirs]
    for run, label in zip(runs, _labels([r.path for r in runs])):
        run.label = label
        if run.skipped:
            shown = ", ".join(map(str, run.skipped[:5])) + (", ..." if len(run.skipped) > 5 else "")
            print(f"mmpretrain-plot: warning: {run.path}: skipped {len(run.skipped)} line(s) that are not JSON "
                  f"records (line {shown}; a record cut short by a crash?)", file=sys.stderr)
    series = build_series(runs)
    if not series["panels"]:
        raise PlotError(f"no train or eval metrics to plot in {', '.join(str(r.path) for r in runs)}")
    if not out_path.parent.is_dir():
        raise PlotError(f"--out {out}: directory {out_path.parent} does not exist")
    render(series, out_path)
    return series


def _epilog() -> str:
    from mmpretrain.cli import tool_epilog  # the --help ending every mmpretrain-* command shares

    return tool_epilog("How often points are logged: train.log_every and train.eval_every.")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mmpretrain-plot",
        description="Plot runs' metrics.jsonl: losses per pair, captioning loss, temperatures, lr, throughput, "
                    "data wait, eval recall per direction and zero-shot accuracy; several runs overlaid.",
        epilog=_epilog())
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run directories (run.output_dir, holding metrics.jsonl) or metrics.jsonl files")
    p.add_argument("--out", default=None,
                   help="report.html (self-contained page) or report.png (one image); the suffix chooses. "
                        "Default: RUN_DIR/report.html of the first run")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    out = a.out
    if out is None:
        first = Path(a.runs[0])
        out = str((first.parent if first.is_file() else first) / "report.html")
    try:
        series = plot(a.runs, out)
    except PlotError as e:
        print(f"mmpretrain-plot: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({len(series['panels'])} panels, {len(series['runs'])} run(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
