"""Issue 13 item 12: disk full during a save. A 1-process run on a 1 MiB tmpfs with
train.save_every=1 (one tiny checkpoint is ~0.6 MB): the second save cannot be written. The run
must stop with CHECKPOINT_WRITE_EXIT_CODE and one line saying "no space left on device", naming
the directory, the bytes needed and free and the last good checkpoint, with no traceback; the
partial step directory is removed, `latest` still names step 1, and a resume from a copy of the
run in a bigger directory continues bit-exactly (its step-2 loss equals the failed run's)."""
from __future__ import annotations

import shutil
import subprocess

import pytest

import trainkit as tk
from mmpretrain.checkpoint import CHECKPOINT_WRITE_EXIT_CODE, tag_for

pytestmark = pytest.mark.distributed


@pytest.fixture
def small_disk(tmp_path):
    d = tmp_path / "small"
    d.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {res.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_disk_full_during_save_stops_with_one_line_and_resumes(tmp_path, tiny_data, small_disk):
    out, log = small_disk / "run", tmp_path / "run.log"
    over = tk.tiny_overrides(out, tiny_data, "train.steps=4", "train.save_every=1", "train.log_every=1")
    rc = tk.run("single", 1, over, log)
    text = log.read_text()
    ckpts = out / "checkpoints"
    assert rc == CHECKPOINT_WRITE_EXIT_CODE, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    lines = [ln for ln in text.splitlines() if "no space left on device" in ln]
    assert lines, text[-4000:]
    line = lines[-1]
    assert f"in {ckpts};" in line and "bytes free" in line and "needs ~" in line, line
    assert f"last good checkpoint is {ckpts / tag_for(1)}" in line, line
    # the partial save is gone and `latest` is untouched
    assert (ckpts / "latest").read_text().strip() == tag_for(1)
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == [tag_for(1)]
    failed_rows = {r["step"]: r["loss"] for r in tk.train_rows(out)}
    assert 2 in failed_rows  # step 2 trained; its save failed

    big = tmp_path / "big"
    shutil.copytree(out, big)
    log2 = tmp_path / "resume.log"
    assert tk.run("single", 1, tk.tiny_overrides(big, tiny_data, "train.steps=3", "train.save_every=1",
                                                 "train.log_every=1"), log2) == 0, log2.read_text()[-4000:]
    rows = {r["step"]: r["loss"] for r in tk.train_rows(big)}
    assert rows[2] == failed_rows[2] and 3 in rows  # resumed from step 1, bit-exact
    assert (big / "checkpoints" / "latest").read_text().strip() == tag_for(3)
