"""Config: one typed schema, dotted overrides, errors that name the key and what is allowed,
and refusal before any process group starts."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml

import trainkit as tk
from mmpretrain.config import ConfigError, config_hash, from_dict, load_config, to_dict, to_yaml

DEMO = str(tk.REPO / "configs" / "demo.yaml")


def test_overrides_apply_with_types():
    cfg = load_config(DEMO, ["optim.lr=3e-4", "train.zero_stage=3", "data.audio.clip_seconds=2", "run.name=x"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.train.zero_stage == 3 and cfg.data.audio.clip_seconds == 2.0 and cfg.run.name == "x"
    # round trip: the resolved YAML written to the run dir loads back to the same config
    again = from_dict(yaml.safe_load(to_yaml(cfg)))
    assert to_dict(again) == to_dict(cfg) and config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(DEMO, ["optim.lr=1e-4"])) != config_hash(cfg)


@pytest.mark.parametrize("override, names", [
    ("optim.lrr=1", ["optim.lrr", "allowed keys", "'lr'", "warmup_steps"]),
    ("nosuch.key=1", ["nosuch", "allowed keys", "optim", "train"]),
    ("data.train=[{name: a, urlz: x}]", ["urlz", "SourceConfig", "urls"]),
    ("optim.lr=abc", ["optim.lr", "abc", "Float"]),
    ("train.steps=1.5", ["train.steps", "Integer"]),
    ("optim.lr=-1", ["optim.lr", "-1.0", "out of range", "(0.0, 10.0]"]),
    ("optim.beta2=1.5", ["optim.beta2", "out of range", "[0.0, 1.0]"]),
    ("train.zero_stage=5", ["train.zero_stage", "5", "[0, 1, 2, 3]"]),
    ("train.precision=fp8", ["train.precision", "fp8", "bf16"]),
    ("model.vision.heads=3", ["model.vision", "heads", "3"]),
    ("data.image_size=65", ["data.image_size", "65", "patch_size"]),
])
def test_bad_values_are_refused_naming_key_and_allowed(override, names):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, [override])
    for n in names:
        assert n in str(e.value), f"{n!r} not in: {e.value}"


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  stpes: 10\n")
    with pytest.raises(ConfigError, match=r"config file '.*typo.yaml'.*train.stpes"):
        load_config(str(typo))
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(DEMO, ["optim.lr"])


@pytest.mark.distributed
def test_bad_config_stops_every_launcher_before_a_process_group(tmp_path):
    """Exit 2 with the message, fast, and nothing written to the run directory."""
    out = tmp_path / "run"
    over = [f"run.output_dir={out}", "train.zero_stage=7"]
    for launcher, nproc in (("single", 1), ("torchrun", 2)):
        t0 = time.time()
        res = subprocess.run(tk.launch_cmd(launcher, nproc, over, tk.free_port()), cwd=tk.REPO, env=tk.env(),
                             capture_output=True, text=True, timeout=120)
        text = res.stdout + res.stderr
        assert res.returncode != 0 and "config key 'train.zero_stage' = 7 is not allowed" in text, text[-2000:]
        assert "init_process_group" not in text and "Initializing TorchBackend" not in text
        assert not out.exists()
        assert time.time() - t0 < 60
    res = subprocess.run([sys.executable, "-m", "mmpretrain.train", "--config", DEMO, f"run.output_dir={out}",
                          "optim.lr=-1"], cwd=tk.REPO, env=tk.env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "optim.lr" in res.stderr


def test_a_bare_off_is_the_choice_off_not_false(tmp_path):
    """YAML 1.1 reads `off` as false: `train.compile=off` on the command line or `compile: off` in a
    file must mean the choice 'off' (it was refused as 'False')."""
    from mmpretrain.config import load_config

    assert load_config(None, ["train.compile=off"]).train.compile == "off"
    f = tmp_path / "c.yaml"
    f.write_text("train: {compile: off}\n")
    assert load_config(str(f)).train.compile == "off"
    assert load_config(None, ["train.compile=inductor"]).train.compile == "inductor"
