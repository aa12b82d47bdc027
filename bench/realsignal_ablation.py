"""The real-signal benchmark's ablation (issue 16): `configs/realsignal.yaml` trained as `make realsignal`
trains it (DeepSpeed, 2 CPU processes, `train.max_minutes` budget), once per variant, each variant one
change of config overrides; prints class-level R@1 on the unseen-voice split and the zero-shot accuracy
of audio, for the EMA weights and (from the same run) the raw ones.

    python bench/realsignal_ablation.py                      # every variant (~11 min each on 2 cores)
    python bench/realsignal_ablation.py full no_audio_aug    # some of them
    python bench/realsignal_ablation.py --table runs/rs-ablation   # print the table of finished runs

The data must exist (`python tools/make_realsignal_data.py --out data/realsignal`). Run on an idle
machine: the budget turns a slower step into fewer steps.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: Dict[str, List[str]] = {
    "full": [],  # configs/realsignal.yaml as it is
    "same_label_negative": ["loss.same_label=negative"],  # CLIP's loss: classmates are negatives
    # the waveform augmentation the config had first (off now: it hurt the unseen voices)
    "with_audio_aug": ["data.audio_augment.placement=random", "data.audio_augment.gain_db=[-6,6]",
                       "data.audio_augment.noise_prob=0.5", "data.audio_augment.noise_snr_db=[10,30]",
                       "data.audio_augment.speed=[0.8,1.25]"],
    "no_spec_augment": ["model.audio.spec_augment.time_masks=0", "model.audio.spec_augment.freq_masks=0"],
    "speed_wide": ["data.audio_augment.placement=random", "data.audio_augment.gain_db=[-6,6]",  # a trial
                   "data.audio_augment.noise_prob=0.5", "data.audio_augment.noise_snr_db=[10,30]",
                   "data.audio_augment.speed=[0.7,1.4]"],
    "vtlp": ["model.audio.freq_warp=[0.85,1.15]"],  # a trial, not an ablation
    "per_bin_norm": ["model.audio.mel_norm=per_bin"],  # a trial, not an ablation
    "patch_stem": ["model.vision.stem=patch"],  # one patchify conv, as the config had before its conv stem
    "first_caption": ["data.caption_sampling=false"],  # always the first of the json's caption templates
    "no_image_aug": ["data.image_augment.rotate_deg=0", "data.image_augment.scale=[1,1]",
                     "data.image_augment.shear_deg=0", "data.image_augment.translate=0",
                     "data.image_augment.brightness=0", "data.image_augment.contrast=0",
                     "data.image_augment.blur_prob=0", "data.image_augment.erase_prob=0"],
}
DIRECTIONS = ("image_to_audio", "image_to_text", "audio_to_text")


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    venv = ROOT / ".venv"
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    env.setdefault("TORCH_EXTENSIONS_DIR", str(venv / "torch_extensions"))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("WANDB_MODE", "disabled")
    return env


def run_variant(name: str, overrides: List[str], data: Path, out: Path) -> None:
    run_dir = out / name
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    cmd = ["deepspeed", "--num_accelerators", "2", "--module", "mmpretrain.train",
           "--config", "configs/realsignal.yaml", f"run.output_dir={run_dir}",
           f"data.train=[{{name: realsignal, urls: '{data}/train/train-{{000000..000005}}.tar'}}]",
           f"data.eval_urls={data}/eval/eval-000000.tar", *overrides]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{run_dir}.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT, check=True)
    # the raw (non-EMA) weights of the same run, for the EMA on / off row
    res = subprocess.run([sys.executable, "-m", "mmpretrain.evaluate", "--checkpoint", str(run_dir), "--data",
                          f"{data}/eval/eval-000000.tar", "--json", "eval.use_ema=false"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, check=True)
    (run_dir / "eval_raw.json").write_text(res.stdout)


def _flat(d: Dict, prefix: str = "") -> Dict[str, float]:
    out: Dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "/"))
        elif isinstance(v, (int, float)):
            out[key] = float(v)
    return out


def _pick(flat: Dict[str, float], direction: str) -> Optional[float]:
    hits = [v for k, v in flat.items() if k.endswith(f"{direction}/R@1")]
    return hits[0] if hits else None


def _zeroshot_audio(flat: Dict[str, float]) -> Optional[float]:
    hits = [v for k, v in flat.items() if "zeroshot" in k and "audio" in k and k.endswith("accuracy")]
    return hits[0] if hits else None


def row(run_dir: Path) -> Optional[Dict[str, object]]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return None
    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    evals = [r for r in recs if r.get("kind") == "eval"]
    steps = max((r.get("step", 0) for r in recs if r.get("kind") == "train"), default=0)
    if not evals:
        return None
    ema = _flat(evals[-1])
    out: Dict[str, object] = {"run": run_dir.name, "steps": steps}
    for d in DIRECTIONS:
        out[d] = _pick(ema, d)
    out["zeroshot_audio"] = _zeroshot_audio(ema)
    raw_file = run_dir / "eval_raw.json"
    if raw_file.exists() and raw_file.read_text().strip():
        raw = _flat(json.loads(raw_file.read_text()))
        out["raw"] = {d: _pick(raw, d) for d in DIRECTIONS} | {"zeroshot_audio": _zeroshot_audio(raw)}
    return out


def table(out: Path) -> str:
    def f(v: object) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = ["| run | weights | steps | image→audio | image→text | audio→text | zero-shot audio |",
             "|---|---|---|---|---|---|---|"]
    for d in sorted(p for p in out.iterdir() if p.is_dir()):
        r = row(d)
        if r is None:
            continue
        lines.append(f"| {r['run']} | EMA | {r['steps']} | " + " | ".join(f(r[k]) for k in (*DIRECTIONS, "zeroshot_audio"))
                     + " |")
        if "raw" in r:
            raw = r["raw"]
            lines.append(f"| {r['run']} | raw | {r['steps']} | "
                         + " | ".join(f(raw[k]) for k in (*DIRECTIONS, "zeroshot_audio")) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="*", help=f"of {', '.join(VARIANTS)} (default: all)")
    ap.add_argument("--data", default="data/realsignal", type=Path)
    ap.add_argument("--out", default="runs/rs-ablation", type=Path)
    ap.add_argument("--suffix", default="", help="appended to each run's directory name (repeat runs)")
    ap.add_argument("--table", type=Path, help="only print the table of the runs under this dir")
    a = ap.parse_args(argv)
    if a.table:
        print(table(a.table))
        return 0
    unknown = [v for v in a.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    data, out = a.data.resolve(), a.out.resolve()
    for name in a.variants or list(VARIANTS):
        run_variant(name + a.suffix, VARIANTS[name], data, out)
        print(table(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
