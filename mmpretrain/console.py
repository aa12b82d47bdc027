"""What rank 0's console shows during a run: a progress line (or a tqdm bar) at each logged step,
a retrieval / zero-shot headline for each evaluation, and a summary block at the end.

The formatting functions are pure (tested without a run); `Progress` decides where the progress
goes (`log.progress`: auto | bar | lines | off) and `RunSummary` gathers what the end-of-run block
and the `{"event": "summary"}` record of metrics.jsonl report. The per-rank log files always get
the plain progress lines, whatever the console shows."""
from __future__ import annotations

import logging
import math
import re
import sys
import time
from collections import deque
from typing import Any, Deque, Dict, List, Optional, TextIO

PROGRESS_MODES = ("auto", "bar", "lines", "off")
CONSOLE_HANDLER = "mmpretrain.console"  # name of the stdout handler logging.setup_logging adds on rank 0
FILE_ONLY = {"console": False}  # `extra=` of a log record the console handler drops (the files keep it)
FINAL_LOSS_WINDOW = 10  # the summary's final loss terms: mean of this many last logged steps
MEM_KINDS = {"cuda_allocated": "CUDA max allocated", "host_rss": "process peak RSS"}

log = logging.getLogger("mmpretrain")

# eval keys the summary tracks the best (highest) value of: retrieval R@1 per direction, zero-shot
# and probe accuracy per modality, caption scores
_BEST_KEYS = re.compile(r"^(?:[a-z0-9_]+/R@1|(?:zeroshot|linear_probe)/[a-z0-9_]+/accuracy|captioning/[a-z0-9_]+/CIDEr)$")


# ----------------------------------------------------------------------------- pure formatting


def format_duration(seconds: Optional[float]) -> str:
    """`d h:mm:ss` with the day part only when there is one: 0 -> '0:00:00', 90061 -> '1d 1:01:01';
    None / NaN / inf -> '?' (an ETA before any step)."""
    if seconds is None or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "?"
    s = int(max(0.0, seconds))  # whole seconds, rounded down (as tqdm does)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    core = f"{hours}:{minutes:02d}:{s:02d}"
    return f"{days}d {core}" if days else core


def format_rate(v: Optional[float]) -> str:
    """Samples/s with as many digits as help: 0.123, 12.3, 1234."""
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return "?"
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def memory_text(mib: Optional[float], kind: Optional[str] = None) -> Optional[str]:
    """'peak mem 1234 MiB (CUDA max allocated)' / '(process peak RSS)'; None without a figure."""
    if not isinstance(mib, (int, float)):
        return None
    what = MEM_KINDS.get(kind or "")
    return f"peak mem {mib:.0f} MiB" + (f" ({what})" if what else "")


def _num(v: Any, spec: str) -> str:
    """A number with `spec`; anything else (None, 'NaN' after json sanitising) as it is."""
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def loss_terms(rec: Dict[str, Any]) -> List[str]:
    """'image_text 2.079', 'caption 5.545', ...: each `loss/<term>` of a train record, sorted."""
    return [f"{k[5:]} {_num(rec[k], '.3f')}" for k in sorted(rec) if k.startswith("loss/")]


def progress_line(rec: Dict[str, Any], total: int, elapsed: float, eta: Optional[float]) -> str:
    """The console / log line of one train record: step/total (% done), loss and its terms, lr,
    samples/s in total and per device, throughput, peak memory, elapsed and ETA (`d h:mm:ss`)."""
    step = rec["step"]
    pct = 100.0 * step / total if total > 0 else 100.0
    parts = [f"step {step}/{total} ({pct:.1f}%)", f"loss {_num(rec.get('loss'), '.4f')}", *loss_terms(rec),
             f"lr {_num(rec.get('lr', 0), '.2e')}"]
    rate = f"{format_rate(rec.get('samples_per_s'))} samples/s"
    if rec.get("samples_per_s_per_device") is not None:
        rate += f" ({format_rate(rec['samples_per_s_per_device'])}/device)"
    parts.append(rate)
    if rec.get("tflops_per_device") is not None:
        parts.append(f"{rec['tflops_per_device']:.3g} TFLOP/s/device"
                     + (f" (MFU {100 * rec['mfu']:.1f}%)" if rec.get("mfu") is not None else ""))
    mem = memory_text(rec.get("peak_mem_mib"), rec.get("peak_mem_kind"))
    if mem:
        parts.append(mem)
    parts.append(f"elapsed {format_duration(elapsed)}")
    parts.append(f"ETA {format_duration(eta)}")
    if rec.get("nonfinite_steps"):
        parts.append(f"{rec['nonfinite_steps']} non-finite steps skipped")
    return " | ".join(parts)


def bar_postfix(rec: Dict[str, Any], elapsed: float, eta: Optional[float]) -> str:
    """The shorter text beside a tqdm bar (the bar shows step/total and %)."""
    parts = [f"loss {_num(rec.get('loss'), '.4f')}", f"lr {_num(rec.get('lr', 0), '.2e')}",
             f"{format_rate(rec.get('samples_per_s'))} samples/s"]
    if rec.get("samples_per_s_per_device") is not None:
        parts[-1] += f" ({format_rate(rec['samples_per_s_per_device'])}/dev)"
    if isinstance(rec.get("peak_mem_mib"), (int, float)):
        kind = {"cuda_allocated": "CUDA", "host_rss": "RSS"}.get(rec.get("peak_mem_kind") or "", "")
        parts.append(f"mem {rec['peak_mem_mib']:.0f} MiB {kind}".rstrip())
    parts.append(f"elapsed {format_duration(elapsed)}, ETA {format_duration(eta)}")
    return " | ".join(parts)


def eval_headline(res: Dict[str, Any]) -> Optional[str]:
    """'R@1 image_to_text 0.250, text_to_image 0.219 | zero-shot acc image 0.410': retrieval R@1
    of every direction the eval produced and zero-shot accuracy per modality; None if neither."""
    r1 = [f"{k[:-4]} {res[k]:.3f}" for k in sorted(res)
          if k.endswith("/R@1") and k.count("/") == 1 and isinstance(res[k], (int, float))]
    zs = [f"{k.split('/')[1]} {res[k]:.3f}" for k in sorted(res)
          if re.fullmatch(r"zeroshot/[^/]+/accuracy", k) and isinstance(res[k], (int, float))]
    parts = ([f"R@1 {', '.join(r1)}"] if r1 else []) + ([f"zero-shot acc {', '.join(zs)}"] if zs else [])
    if isinstance(res.get("chance"), (int, float)) and r1:
        parts[0] += f" (chance {res['chance']:.3f})"
    return " | ".join(parts) or None


def resolve_mode(mode: str, stream: Any) -> str:
    """`log.progress` -> what the console does: auto is a bar on a terminal, lines on a file or pipe."""
    if mode not in PROGRESS_MODES:
        raise ValueError(f"log.progress = {mode!r}; choose one of {list(PROGRESS_MODES)}")
    if mode != "auto":
        return mode
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return "lines"


# ----------------------------------------------------------------------------- end-of-run summary


def _finite(v: Any) -> Any:
    """json-safe: NaN / inf as strings (json.dumps would write invalid NaN tokens)."""
    return str(v) if isinstance(v, float) and not math.isfinite(v) else v


class RunSummary:
    """Collects train and eval records as MetricsLogger writes them; `record()` is the summary."""

    def __init__(self, window: int = FINAL_LOSS_WINDOW) -> None:
        self.recent: Deque[Dict[str, float]] = deque(maxlen=window)
        self.best: Dict[str, Dict[str, Any]] = {}
        self.evals = 0

    def add(self, rec: Dict[str, Any]) -> None:
        kind = rec.get("kind", "train")
        if kind == "train":
            self.recent.append({k: v for k, v in rec.items() if (k == "loss" or k.startswith("loss/"))
                                and isinstance(v, (int, float)) and math.isfinite(v)})
        elif kind == "eval":
            self.evals += 1
            for k, v in rec.items():
                if _BEST_KEYS.match(k) and isinstance(v, (int, float)) and math.isfinite(v):
                    if k not in self.best or v > self.best[k]["value"]:
                        self.best[k] = {"value": v, "step": rec.get("step")}

    def final_losses(self) -> Dict[str, float]:
        """Mean of each loss term over the last logged steps (a term missing in some steps: over the rest)."""
        keys = sorted({k for r in self.recent for k in r}, key=lambda k: (k != "loss", k))
        return {k: sum(r[k] for r in self.recent if k in r) / sum(k in r for r in self.recent) for k in keys}

    def record(self, status: str, step: int, total: int, samples_seen: int, session_steps: int,
               session_samples: int, wall_s: float, world_size: int, checkpoint: Optional[str],
               metrics_path: str) -> Dict[str, Any]:
        rate = session_samples / wall_s if wall_s > 0 else float("nan")
        return {"kind": "summary", "event": "summary", "status": status, "step": step, "total_steps": total,
                "samples_seen": samples_seen, "session_steps": session_steps, "session_samples": session_samples,
                "wall_s": round(wall_s, 3), "mean_samples_per_s": _finite(rate),
                "mean_samples_per_s_per_device": _finite(rate / max(world_size, 1)), "world_size": world_size,
                "final_loss": {k: _finite(v) for k, v in self.final_losses().items()},
                "final_loss_window": len(self.recent), "evals": self.evals,
                "best_eval": {k: {"value": _finite(b["value"]), "step": b["step"]} for k, b in sorted(self.best.items())},
                "checkpoint": checkpoint, "metrics": metrics_path}


def summary_lines(s: Dict[str, Any]) -> List[str]:
    """The console block of a summary record (RunSummary.record)."""
    rows = [("status", s["status"]),
            ("steps", f"{s['step']}/{s['total_steps']} ({s['session_steps']} this session)"),
            ("samples seen", f"{s['samples_seen']:,} ({s['session_samples']:,} this session)"),
            ("wall time", f"{format_duration(s['wall_s'])} (this session)"),
            ("mean samples/s", f"{format_rate(s['mean_samples_per_s'])} "
                               f"({format_rate(s['mean_samples_per_s_per_device'])} per device, {s['world_size']} "
                               f"device{'s' if s['world_size'] != 1 else ''})")]
    fl = s["final_loss"]
    if fl:
        terms = ", ".join(f"{k[5:]} {_num(v, '.4f')}" for k, v in fl.items() if k != "loss")
        rows.append((f"final loss (mean of last {s['final_loss_window']})",
                     f"{_num(fl.get('loss'), '.4f')}" + (f" ({terms})" if terms else "")))
    if s["best_eval"]:
        rows.append(("best eval", ", ".join(f"{_metric_name(k)} {_num(b['value'], '.3f')} (step {b['step']})"
                                            for k, b in s["best_eval"].items())))
    elif s["evals"] == 0:
        rows.append(("best eval", "no evaluation ran (data.eval_urls unset)"))
    rows.append(("last checkpoint", s["checkpoint"] or "none"))
    rows.append(("metrics", s["metrics"]))
    width = max(len(k) for k, _ in rows)
    title = " run summary "
    rule = "=" * 24
    return [f"{rule}{title}{rule}", *(f"{k:<{width}}  {v}" for k, v in rows), "=" * (2 * len(rule) + len(title))]


def _metric_name(key: str) -> str:
    """'image_to_text/R@1' -> 'image_to_text R@1', 'zeroshot/image/accuracy' -> 'zero-shot acc image'."""
    parts = key.split("/")
    if len(parts) == 2:
        return f"{parts[0]} {parts[1]}"
    label = {"zeroshot": "zero-shot acc", "linear_probe": "probe acc", "captioning": "CIDEr"}.get(parts[0], parts[0])
    return f"{label} {parts[1]}"


# ----------------------------------------------------------------------------- where progress goes


class _AroundBar:
    """The console handler's stream while a bar is shown: a log line clears the bar, is written,
    and the bar is drawn again below it (tqdm's own `write` does the same)."""

    def __init__(self, stream: TextIO, bar: Any) -> None:
        self.stream, self.bar = stream, bar

    def write(self, s: str) -> int:
        if self.bar.disable:  # closed
            return self.stream.write(s)
        self.bar.clear()
        n = self.stream.write(s)
        self.bar.refresh()
        return n

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())


def console_handler() -> Optional[logging.StreamHandler]:
    for h in log.handlers:
        if h.get_name() == CONSOLE_HANDLER and isinstance(h, logging.StreamHandler):
            return h
    return None


class Progress:
    """Rank 0's progress display: `log.progress` lines (through the log, console and file), a bar
    (tqdm on the console handler's stream; the line goes to the file only), or off (file only)."""

    def __init__(self, mode: str, start_step: int, total: int, stream: Optional[TextIO] = None) -> None:
        self.handler = console_handler()
        self.stream = stream if stream is not None else (self.handler.stream if self.handler else sys.stdout)
        self.mode = resolve_mode(mode, self.stream)
        self.start_step = start_step
        self.t0 = time.time()
        self.first: Optional[tuple] = None  # (step, time) of the first logged step: the ETA's rate starts there
        self.bar: Any = None
        self._swapped: Optional[TextIO] = None
        if self.mode == "bar":
            from tqdm import tqdm

            # the text beside the bar goes in `desc` (tqdm puts ', ' before a postfix)
            self.bar = tqdm(total=total, initial=start_step, file=self.stream, dynamic_ncols=True,
                            bar_format="train {n_fmt}/{total_fmt} {percentage:3.0f}%|{bar}| {desc}",
                            mininterval=0, leave=True)
            if self.handler is not None:  # other log lines go above the bar, not through it
                self._swapped = self.handler.setStream(_AroundBar(self.handler.stream, self.bar))

    def timing(self, step: int, total: int) -> tuple:
        """(elapsed, eta) in seconds; the ETA's rate is measured from the first logged step on (start-up
        and the first, slower steps left out) once there are two, else over the whole session."""
        now = time.time()
        if self.first is None:
            self.first = (step, now)
        elapsed = now - self.t0
        f_step, f_time = self.first
        if step > f_step:
            per_step = (now - f_time) / (step - f_step)
        else:
            per_step = elapsed / max(step - self.start_step, 1)
        return elapsed, per_step * max(total - step, 0)

    def show(self, rec: Dict[str, Any], total: int) -> None:
        elapsed, eta = self.timing(rec["step"], total)
        line = progress_line(rec, total, elapsed, eta)
        if self.mode == "lines":
            log.info(line)
            return
        log.info(line, extra=FILE_ONLY)  # the per-rank log keeps every line
        if self.bar is not None:
            if self.bar.total != total:  # train.max_minutes decided a new step count
                self.bar.total = total
            self.bar.set_description_str(bar_postfix(rec, elapsed, eta), refresh=False)
            self.bar.update(rec["step"] - self.bar.n)
            if rec["step"] >= total:
                self.close()

    def close(self) -> None:
        """End the bar (left on screen) and give the console handler its stream back; idempotent."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._swapped is not None and self.handler is not None:
            self.handler.setStream(self._swapped)
            self._swapped = None
