"""What users see of the command lines: every console script's --help is complete (not cut
mid-sentence) and points at --help-config; --help-config lists every schema key with its type,
default and a doc; --print-config prints what load_config resolves; flags are spelled alike.

In process (one torch import for the whole file), except for one check that the installed
scripts start."""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import yaml

from mmpretrain import config as C
from mmpretrain import config_help as H

REPO = Path(__file__).resolve().parents[1]
SENTENCE_END = re.compile(r"[.!?][)\"'`]*$")


def console_scripts() -> Dict[str, Tuple[str, str]]:
    """name -> (module, function), read from setup.py: the list pip installs."""
    text = (REPO / "setup.py").read_text()
    found = re.findall(r'"(mmpretrain-[a-z-]+)=([\w.]+):(\w+)"', text)
    assert len(found) >= 10, found
    return {name: (mod, fn) for name, mod, fn in found}


def run_main(capsys, module: str, argv: List[str], fn: str = "main") -> Tuple[int, str, str]:
    """(exit code, stdout, stderr) of module.fn(argv) in this process; --help exits via SystemExit."""
    main = getattr(importlib.import_module(module), fn)
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return int(code or 0), out.out, out.err


def _words(text: str) -> str:
    return " ".join(text.split())


# ----------------------------------------------------------------------------- --help


@pytest.mark.parametrize("name", sorted(console_scripts()))
def test_help_is_complete(name, capsys):
    module, fn = console_scripts()[name]
    code, out, err = run_main(capsys, module, ["--help"], fn)
    assert code == 0, err
    assert out.startswith(f"usage: {name} "), out[:80]  # prog = the command people type
    last = out.rstrip().splitlines()[-1]
    assert SENTENCE_END.search(last), f"{name} --help ends mid-sentence: {last!r}"
    doc = importlib.import_module(module).__doc__
    if name != "mmpretrain-plot":  # its description is its own summary, checked below
        assert _words(doc) in _words(out), f"{name} --help does not show its whole description"
    # the description ends with a sentence (the old submit / make-shards help stopped mid-line)
    description = re.split(r"\n(?:positional arguments|options|optional arguments):\n", out)[0].split("\n\n", 1)[1]
    assert SENTENCE_END.search(description.rstrip()), description
    assert "--help-config" in out
    if name in ("mmpretrain-train", "mmpretrain-evaluate", "mmpretrain-submit", "mmpretrain-plan"):
        assert "--print-config" in out and "key=value" in out


def test_tool_wrappers_keep_names_and_help(capsys):
    """tools/*.py run the packaged code and still expose its names (`import train_tokenizer`)."""
    from mmpretrain.cli import train_tokenizer

    spec = importlib.util.spec_from_file_location("tt_wrapper", REPO / "tools" / "train_tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.captions is train_tokenizer.captions and mod.main is train_tokenizer.main
    for tool in ("make_realsignal_data", "realsignal_report", "make_tiny_hf", "make_tiny_hf_audio"):
        spec = importlib.util.spec_from_file_location(f"_{tool}", REPO / "tools" / f"{tool}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        with pytest.raises(SystemExit) as e:
            mod.main(["--help"])
        assert e.value.code == 0
        assert _words(mod.__doc__) in _words(capsys.readouterr().out), f"tools/{tool}.py --help is cut"


def test_installed_scripts_start():
    """The console scripts exist beside this python (pip install -e . after adding one) and run."""
    bindir = Path(sys.executable).parent
    missing = [n for n in console_scripts() if not (bindir / n).exists()]
    assert not missing, f"not installed (run pip install -e .): {missing}"
    res = subprocess.run([str(bindir / "mmpretrain-make-shards"), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "mmpretrain-make-shards" in res.stdout, res.stderr
    res = subprocess.run([str(bindir / "mmpretrain-train"), "--help-config", "train.ema."], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "train.ema.decay: float = 0.999" in res.stdout and "optim.lr" not in res.stdout


# ----------------------------------------------------------------------------- --help-config


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    """Leaf keys of a config dict (the two mapping-valued keys are leaves, as in the schema)."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and f"{prefix}{k}" not in ("loss.pairs", "train.deepspeed"):  # a section
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_help_config_lists_every_key(capsys):
    code, out, _ = run_main(capsys, "mmpretrain.train", ["--help-config"])
    assert code == 0
    # independent of config_help: the keys and defaults a default Config serialises to
    flat = _flatten(C.to_dict(C.Config()))
    flat.update({f"data.train[].{f.name}": (f.default if f.default is not dataclasses.MISSING else "???")
                 for f in dataclasses.fields(C.SourceConfig)})
    assert len(flat) > 150
    lines = out.splitlines()
    for key, default in flat.items():
        hit = [ln for ln in lines if ln.strip().startswith(f"{key}: ")]
        assert len(hit) == 1, f"--help-config lists {key} {len(hit)} times"
        shown = "(required)" if default == "???" else H.yaml_value(default)
        assert f" = {shown}" in hit[0], (key, hit[0])
        type_text = hit[0].strip()[len(key) + 2:].split(" = ")[0]
        assert type_text and type_text[0].isupper() or type_text in ("int", "float", "str", "bool"), hit[0]
    assert "  train.precision: str = fp32   allowed: fp32 | bf16 | fp16" in lines
    assert "  optim.lr: float = 0.001   allowed: (0.0, 10.0]" in lines
    assert any(ln.startswith("  model.text.pooling: str = auto   allowed: auto | cls | mean | eos") for ln in lines)


def test_help_config_prefix(capsys):
    code, out, _ = run_main(capsys, "mmpretrain.submit", ["--help-config", "optim."])
    assert code == 0
    keys = [ln.split(":")[0].strip() for ln in out.splitlines() if re.match(r"^  [a-z]", ln)]
    assert keys == [f"optim.{f.name}" for f in dataclasses.fields(C.OptimConfig)]
    code, _, err = run_main(capsys, "mmpretrain.evaluate", ["--help-config", "optimm"])  # no --checkpoint needed
    assert code == 2 and "no config key starts with 'optimm'" in err


def test_every_key_has_a_doc():
    """The schema's comments are the docs: a key added without one fails here."""
    keys = H.schema_keys()
    undocumented = [k.key for k in keys if len(k.doc.split()) < 2]
    assert not undocumented, f"config keys without a comment in mmpretrain/config.py: {undocumented}"
    docs = {k.key: k.doc for k in keys}
    assert docs["train.steps"] == "optimizer steps of the run"  # a comment at the end of the line
    assert docs["data.hflip"].startswith("off by default, as in OpenCLIP")  # the block above the field
    assert docs["model.audio.patch_size"] == docs["model.vision.patch_size"] != ""  # inherited when not redocumented


# ----------------------------------------------------------------------------- --print-config


OVERRIDES = ["train.steps=7", "optim.lr=0.002", "data.train=[{name: a, urls: 'nowhere/x-{000..003}.tar'}]"]


@pytest.mark.parametrize("module", ["mmpretrain.train", "mmpretrain.submit", "mmpretrain.plan"])
def test_print_config_round_trips(module, capsys, tmp_path):
    run_dir = tmp_path / "run"
    argv = ["--config", str(REPO / "configs/demo.yaml"), "--print-config", *OVERRIDES, f"run.output_dir={run_dir}"]
    code, out, err = run_main(capsys, module, argv)
    assert code == 0, err
    expected = C.load_config(str(REPO / "configs/demo.yaml"), [*OVERRIDES, f"run.output_dir={run_dir}"])
    assert yaml.safe_load(out) == C.to_dict(expected)
    assert expected.train.steps == 7 and expected.data.train[0].name == "a"
    (tmp_path / "printed.yaml").write_text(out)  # the printed YAML is itself a config that loads the same
    assert C.config_hash(C.load_config(str(tmp_path / "printed.yaml"))) == C.config_hash(expected)
    assert not run_dir.exists()  # nothing started: no run directory, the shards were never looked for


def test_print_config_refuses_bad_values(capsys):
    code, out, err = run_main(capsys, "mmpretrain.train", ["--config", str(REPO / "configs/demo.yaml"),
                                                            "--print-config", "optim.lr=-1"])
    assert code == 2 and out == "" and "optim.lr" in err


def test_evaluate_print_config(capsys, tmp_path):
    """The checkpoint's saved config plus the overrides, without reading weights or building a model."""
    saved = C.load_config(str(REPO / "configs/demo.yaml"))
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"config": C.to_dict(saved)}))
    (export / "model.safetensors").write_bytes(b"not read")  # --print-config must not open the weights
    code, out, err = run_main(capsys, "mmpretrain.evaluate", ["--checkpoint", str(export), "--print-config",
                                                               "eval.caption_samples=5", "--probe-group-key", "g2"])
    assert code == 0, err
    got = yaml.safe_load(out)
    assert got["eval"]["caption_samples"] == 5 and got["eval"]["probe_group_key"] == "g2"
    want = C.to_dict(saved)
    want["eval"].update(caption_samples=5, probe_group_key="g2")
    for tower in ("vision", "audio", "text"):  # a saved model rebuilds with random init: weights come from the file
        want["model"][tower]["init"] = "random"
    assert got == want


# ----------------------------------------------------------------------------- flag spellings


def _options(help_text: str) -> List[str]:
    return sorted(set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", help_text.split("\n\n", 2)[-1])))


def test_flag_spellings_agree(capsys):
    opts = {}
    for name, (module, fn) in console_scripts().items():
        _, out, _ = run_main(capsys, module, ["--help"], fn)
        opts[name] = _options(out)
    everything = {o for v in opts.values() for o in v}
    assert not [o for o in everything if "_" in o], "flags are spelled with dashes"
    assert not everything & {"--output", "--output-dir", "--outdir", "--shards", "--urls", "--ckpt", "--cfg",
                             "--config-file", "--bs", "--input-dir"}
    for name in ("mmpretrain-evaluate", "mmpretrain-caption", "mmpretrain-train-tokenizer", "mmpretrain-inspect-shards"):
        assert "--data" in opts[name], name  # shard URLs to read
    for name in ("mmpretrain-evaluate", "mmpretrain-export", "mmpretrain-caption"):
        assert "--checkpoint" in opts[name], name  # a trained model
    for name in ("mmpretrain-export", "mmpretrain-make-shards", "mmpretrain-make-demo-data", "mmpretrain-train-tokenizer"):
        assert "--out" in opts[name], name  # where results go
    for name in ("mmpretrain-train", "mmpretrain-submit", "mmpretrain-plan"):
        assert "--config" in opts[name], name


def test_old_spellings_still_work():
    from mmpretrain.cli import caption, inspect_shards
    from mmpretrain.train import parse_args

    assert caption.parse_args(["--checkpoint", "x", "--shards", "a.tar"]).data == "a.tar"  # hidden alias
    assert inspect_shards.build_parser().parse_args(["a.tar"]).urls == "a.tar"  # positional as before
    assert parse_args(["--local_rank=3", "--config", "c.yaml", "train.steps=2"]).overrides == ["train.steps=2"]
