"""Rank 0's console (mmpretrain.console): the progress line with % done and `d h:mm:ss` times,
log.progress (bar / lines / off), the eval headline and the end-of-run summary block + record."""
from __future__ import annotations

import io
import json
import logging
import math

import pytest

from mmpretrain import console as C
from mmpretrain import logging as L
from mmpretrain.config import Config, ConfigError, load_config


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    """A stand-in for the `time` module of console.py / logging.py: time() only moves when told."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.mark.parametrize("seconds,text", [
    (0, "0:00:00"), (59, "0:00:59"), (59.99, "0:00:59"), (60, "0:01:00"), (3599, "0:59:59"), (3600, "1:00:00"),
    (727, "0:12:07"), (86399, "23:59:59"), (86400, "1d 0:00:00"), (90061, "1d 1:01:01"),
    (97445, "1d 3:04:05"), (200000 * 3.5, "8d 2:26:40"), (-5, "0:00:00"),
    (None, "?"), (float("nan"), "?"), (float("inf"), "?")])
def test_format_duration(seconds, text):
    assert C.format_duration(seconds) == text


def test_progress_line_has_percent_times_rates_memory_and_every_loss_term():
    rec = {"step": 50, "loss": 7.6191, "loss/contrastive": 2.0794, "loss/image_text": 2.0794,
           "loss/caption": 5.5452, "lr": 3e-4, "samples_per_s": 512.4, "samples_per_s_per_device": 128.1,
           "peak_mem_mib": 1234.4, "peak_mem_kind": "host_rss", "tflops_per_device": 1.5, "mfu": 0.25}
    line = C.progress_line(rec, 200, elapsed=727, eta=97445)
    assert line.startswith("step 50/200 (25.0%) | loss 7.6191 | caption 5.545 | contrastive 2.079 | image_text 2.079")
    for part in ("lr 3.00e-04", "512 samples/s (128/device)", "1.5 TFLOP/s/device (MFU 25.0%)",
                 "peak mem 1234 MiB (process peak RSS)", "elapsed 0:12:07", "ETA 1d 3:04:05"):
        assert part in line, (part, line)
    gpu = C.progress_line({**rec, "peak_mem_kind": "cuda_allocated"}, 200, 1, 2)
    assert "peak mem 1234 MiB (CUDA max allocated)" in gpu
    assert C.progress_line({"step": 1}, 3, 0, None).endswith("elapsed 0:00:00 | ETA ?")


def test_eval_headline_lists_r1_per_direction_and_zero_shot_accuracy():
    res = {"image_to_text/R@1": 0.25, "text_to_image/R@1": 0.21875, "image_to_text/R@5": 0.5,
           "audio_to_text/R@1": 0.125, "chance": 1 / 64, "zeroshot/image/accuracy": 0.41, "zeroshot/image/macro_f1": 0.3}
    assert C.eval_headline(res) == ("R@1 audio_to_text 0.125, image_to_text 0.250, text_to_image 0.219 (chance 0.016)"
                                    " | zero-shot acc image 0.410")
    assert C.eval_headline({"captioning/image/BLEU": 0.1}) is None


def test_resolve_mode_auto_is_a_bar_only_on_a_terminal():
    assert C.resolve_mode("auto", FakeTTY()) == "bar"
    assert C.resolve_mode("auto", io.StringIO()) == "lines"
    assert C.resolve_mode("auto", object()) == "lines"  # no isatty at all
    assert C.resolve_mode("lines", FakeTTY()) == "lines" and C.resolve_mode("bar", io.StringIO()) == "bar"
    assert C.resolve_mode("off", FakeTTY()) == "off"
    with pytest.raises(ValueError):
        C.resolve_mode("fancy", io.StringIO())


def test_run_summary_keeps_best_eval_with_step_and_means_the_last_losses():
    s = C.RunSummary(window=2)
    for step, loss in ((1, 9.0), (2, 4.0), (3, 2.0)):
        s.add({"kind": "train", "step": step, "loss": loss, "loss/caption": loss / 2, "lr": 1.0})
    s.add({"kind": "eval", "step": 2, "image_to_text/R@1": 0.5, "zeroshot/image/accuracy": 0.3, "image_to_text/R@5": 0.9})
    s.add({"kind": "eval", "step": 3, "image_to_text/R@1": 0.4, "zeroshot/image/accuracy": 0.6})
    assert s.final_losses() == {"loss": 3.0, "loss/caption": 1.5}  # steps 2 and 3
    assert s.best == {"image_to_text/R@1": {"value": 0.5, "step": 2}, "zeroshot/image/accuracy": {"value": 0.6, "step": 3}}


@pytest.fixture
def console_logging(tmp_path, monkeypatch):
    """setup_logging(rank 0) with its console handler on a stream of the test's choosing; the
    clock of console / logging replaced; the handlers closed afterwards."""
    clock = Clock()
    monkeypatch.setattr(C, "time", clock)
    monkeypatch.setattr(L, "time", clock)

    def start(stream):
        monkeypatch.setattr(L.sys, "stdout", stream)
        L.setup_logging(str(tmp_path), 0)
        return clock

    yield start
    root = logging.getLogger("mmpretrain")
    for h in list(root.handlers):
        h.close()
        root.removeHandler(h)


def _drive(tmp_path, mode: str, steps: int = 4, total: int = 2000, evals: bool = True):
    """A MetricsLogger for `steps` logged steps 100 s apart, an eval at step 2, then finish()."""
    cfg = Config()
    cfg.run.output_dir = str(tmp_path)
    cfg.log.progress = mode
    m = L.MetricsLogger(cfg, rank=0, total_steps=total)
    clock = C.time
    for step in range(1, steps + 1):
        clock.now += 100
        m.log({"kind": "train", "step": step, "samples_seen": 8 * step, "loss": 10.0 - step,
               "loss/image_text": 2.0 + step, "loss/caption": 4.0, "lr": 1e-3, "samples_per_s": 8.0,
               "samples_per_s_per_device": 8.0, "peak_mem_mib": 321.0, "peak_mem_kind": "host_rss"})
        if evals and step == 2:
            res = {"image_to_text/R@1": 0.375, "text_to_image/R@1": 0.25, "chance": 0.0625}
            logging.getLogger("mmpretrain.train").info("eval step %d: %s", step, C.eval_headline(res))
            m.log({"kind": "eval", "step": step, **res}, console=False)
    clock.now += 50
    rec = m.finish("completed", steps, 8 * steps, 8 * steps, 1, tmp_path / "checkpoints" / "step_00000004")
    m.close()
    return rec


def test_lines_mode_prints_progress_and_summary_and_writes_the_summary_record(tmp_path, console_logging):
    out = io.StringIO()
    console_logging(out)
    rec = _drive(tmp_path, "lines")
    text = out.getvalue()
    # step 1 at +100 s: ETA from the session's rate (100 s / step x 1999); later from the first logged step on
    assert "step 1/2000 (0.1%)" in text and "elapsed 0:01:40 | ETA 2d 7:31:40" in text
    assert "step 4/2000 (0.2%)" in text and "elapsed 0:06:40 | ETA 2d 7:26:40" in text
    assert "8 samples/s (8/device)" in text and "peak mem 321 MiB (process peak RSS)" in text
    assert "eval step 2: R@1 image_to_text 0.375, text_to_image 0.250 (chance 0.062)" in text
    block = text[text.index("run summary"):]
    for part in ("status", "completed", "4/2000 (4 this session)", "32 (32 this session)", "0:07:30 (this session)",
                 "final loss (mean of last 4)  7.5000 (caption 4.0000, image_text 4.5000)",
                 "image_to_text R@1 0.375 (step 2), text_to_image R@1 0.250 (step 2)",
                 str(tmp_path / "checkpoints" / "step_00000004"), str(tmp_path / "metrics.jsonl")):
        assert part in block, (part, block)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["train", "train", "eval", "train", "train", "summary"]
    last = rows[-1]
    assert last == rec and last["event"] == "summary" and last["status"] == "completed"
    assert last["step"] == 4 and last["samples_seen"] == 32 and last["wall_s"] == 450.0
    assert math.isclose(last["mean_samples_per_s"], 32 / 450)
    assert last["final_loss"] == {"loss": 7.5, "loss/caption": 4.0, "loss/image_text": 4.5}
    assert last["best_eval"] == {"image_to_text/R@1": {"value": 0.375, "step": 2},
                                 "text_to_image/R@1": {"value": 0.25, "step": 2}}
    log_text = (tmp_path / "logs" / "rank0.log").read_text()
    assert "step 4/2000 (0.2%)" in log_text and "run summary" in log_text


def test_bar_mode_draws_a_bar_on_a_terminal_and_keeps_the_lines_in_the_log_file(tmp_path, console_logging):
    tty = FakeTTY()
    console_logging(tty)
    _drive(tmp_path, "auto", steps=4, total=4)  # auto on a terminal: the bar
    text = tty.getvalue()
    assert "train 4/4 100%|" in text and "loss 6.0000" in text and "elapsed 0:06:40, ETA 0:00:00" in text
    assert "step 1/4" not in text  # the lines go to the file only
    assert "eval step 2: R@1 image_to_text 0.375" in text and "run summary" in text  # other lines still shown
    handler = C.console_handler()
    assert handler is not None and handler.stream is tty  # the bar gave the stream back
    log_text = (tmp_path / "logs" / "rank0.log").read_text()
    assert "step 1/4 (25.0%)" in log_text and "step 4/4 (100.0%)" in log_text and "ETA 0:00:00" in log_text


def test_lines_on_a_pipe_off_shows_no_progress_but_the_summary(tmp_path, console_logging):
    pipe = io.StringIO()
    console_logging(pipe)
    _drive(tmp_path, "off", steps=2, total=2, evals=False)
    text = pipe.getvalue()
    assert "step 1/2" not in text and "%|" not in text
    assert "run summary" in text and "no evaluation ran (data.eval_urls unset)" in text
    assert "step 2/2 (100.0%)" in (tmp_path / "logs" / "rank0.log").read_text()


def test_log_progress_choices_and_old_booleans():
    assert load_config(None, []).log.progress == "auto"
    for given, meant in (("true", "auto"), ("false", "off"), ("off", "off"), ("bar", "bar"), ("lines", "lines")):
        assert load_config(None, [f"log.progress={given}"]).log.progress == meant
    with pytest.raises(ConfigError, match=r"'log.progress' = 'fancy' is not allowed; choose one of \['auto', 'bar'"):
        load_config(None, ["log.progress=fancy"])

