"""Issue 13 item 11: an export whose model.safetensors is not a safetensors file is refused with
one line naming the file (inference.load raises ExportFileError; the evaluate CLI exits 2),
not safetensors' bare 'header too large'."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_loading import fake_run  # noqa: E402

from mmpretrain import inference  # noqa: E402
from mmpretrain.export import export  # noqa: E402
from mmpretrain.loading import EXPORT_WEIGHTS, ExportFileError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def damaged_export(tmp_path):
    fake_run(tmp_path / "run")
    exp = export(tmp_path / "run", tmp_path / "exports" / "tiny")
    (exp / EXPORT_WEIGHTS).write_bytes(b"this is a text file, not tensors\n" * 40)
    return exp


def test_inference_load_names_the_file(damaged_export):
    with pytest.raises(ExportFileError) as ei:
        inference.load(damaged_export, device="cpu")
    msg = str(ei.value)
    assert str(damaged_export / EXPORT_WEIGHTS) in msg and "not a safetensors file" in msg
    assert "\n" not in msg


def test_evaluate_cli_one_line_exit_2(damaged_export, tmp_path):
    res = subprocess.run([sys.executable, "-m", "mmpretrain.evaluate", "--checkpoint", str(damaged_export),
                          "--data", str(tmp_path / "none-{0..1}.tar")], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in res.stderr and len(lines) == 1, res.stderr[-2000:]
    assert str(damaged_export / EXPORT_WEIGHTS) in lines[0] and "not a safetensors file" in lines[0]
