"""SLURM submission: render an sbatch script for `python -m mmpretrain.train` (srun torchrun, or
one srun task per GPU) with signal forwarding and self-requeue, print it (--dry-run) or submit
it and record the job id in the run directory. `mmpretrain-submit --help` lists the flags."""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

from mmpretrain.cli import CONFIG_EPILOG, add_config_flags
from mmpretrain.config import ConfigError, load_config, to_yaml
from mmpretrain.distributed import SLURM_PORT_BASE, SLURM_PORT_SPAN
from mmpretrain.lifecycle import PEER_LOST_EXIT_CODE
from mmpretrain.overrides import parse_cli
from mmpretrain.preemption import PREEMPTED_MARKER, REQUEUE_EXIT_CODE

JOBS_FILE = "slurm_jobs.txt"  # in the run directory: one "job_id<TAB>submitted<TAB>script" line per submission
_TIME_FORMS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
_SAFE = re.compile(r"^[A-Za-z0-9_.,:@%+=/\-\[\]&|()!*]+$")  # one #SBATCH value, no spaces or quotes


class SubmitError(ValueError):
    """A flag is invalid; the message names it."""


def parse_time(value: str) -> int:
    """SLURM --time string -> seconds ('90' = 90 min, '1-02' = 26 h); 'UNLIMITED' -> a large number."""
    v = value.strip()
    if v.upper() in ("UNLIMITED", "INFINITE"):
        return 10**9
    m = re.fullmatch(r"(\d+)-(\d+)(?::(\d+))?(?::(\d+))?", v)
    if m is not None:  # D-HH[:MM[:SS]]
        d, h, mi, sec = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0), int(m.group(4) or 0)
        has_h = True
    else:
        parts = v.split(":")
        if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
            raise SubmitError(f"--time {value!r} is not a SLURM time; use {_TIME_FORMS}")
        nums = [int(p) for p in parts]
        d, h, mi, sec = ([0, 0, nums[0], 0], [0, 0, *nums], [0, *nums])[len(nums) - 1]
        has_h = len(nums) == 3
    if sec > 59 or (has_h and mi > 59):
        raise SubmitError(f"--time {value!r}: minutes and seconds must be below 60 ({_TIME_FORMS})")
    total = ((d * 24 + h) * 60 + mi) * 60 + sec
    if total <= 0:
        raise SubmitError(f"--time {value!r} must be longer than 0")
    return total


@dataclass
class JobSpec:
    """Everything the sbatch script depends on; `render()` is a pure function of it."""

    config: str  # absolute path
    run_dir: str  # absolute path; logs go to run_dir/slurm/
    overrides: List[str] = field(default_factory=list)
    job_name: str = "mmpretrain"
    nodes: int = 1
    gpus_per_node: int = 1
    procs_per_node: int = 1  # training processes per node (= GPUs per node on GPU machines)
    cpus_per_task: Optional[int] = None
    loader_workers: Optional[int] = None  # data.num_workers, when cpus_per_task was derived from it
    mem: Optional[str] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    time_limit: Optional[str] = None  # SLURM --time
    launcher: str = "torchrun"  # torchrun | srun
    signal_seconds: int = 300
    setup: List[str] = field(default_factory=list)
    sbatch_args: List[str] = field(default_factory=list)
    python: str = sys.executable
    workdir: str = "."
    step_wait: int = 120  # srun --wait: seconds the other tasks may live on after the first one exits
    template: bool = False  # render_template(): CONFIG, RUN_DIR, ... come from the environment at sbatch time

    def validate(self) -> None:
        if self.nodes < 1:
            raise SubmitError(f"--nodes {self.nodes} must be >= 1")
        if self.gpus_per_node < 0:
            raise SubmitError(f"--gpus-per-node {self.gpus_per_node} must be >= 0")
        if self.procs_per_node < 1:
            raise SubmitError(f"--procs-per-node {self.procs_per_node} must be >= 1 (set it when --gpus-per-node is 0)")
        if self.gpus_per_node and self.procs_per_node > self.gpus_per_node:
            raise SubmitError(f"--procs-per-node {self.procs_per_node} exceeds --gpus-per-node {self.gpus_per_node}")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise SubmitError(f"--cpus-per-task {self.cpus_per_task} must be >= 1")
        if self.launcher not in ("torchrun", "srun"):
            raise SubmitError(f"--launcher {self.launcher!r}: choose torchrun or srun")
        if self.signal_seconds < 1:
            raise SubmitError(f"--signal-seconds {self.signal_seconds} must be >= 1")
        if self.time_limit is not None:
            limit = parse_time(self.time_limit)
            if self.signal_seconds >= limit:
                raise SubmitError(
                    f"--signal-seconds {self.signal_seconds} must be shorter than --time {self.time_limit} ({limit} s)")
        for name in ("job_name", "partition", "account", "qos", "constraint", "mem"):
            v = getattr(self, name)
            if v is not None and not _SAFE.match(v):
                raise SubmitError(f"--{name.replace('_', '-')} {v!r} may not hold spaces, quotes or newlines")
        if any(c.isspace() for c in self.run_dir):
            raise SubmitError(f"run.output_dir {self.run_dir!r} may not hold whitespace (it goes into #SBATCH --output)")
        for a in self.sbatch_args:
            if not a.startswith("-") or "\n" in a:
                raise SubmitError(f"--sbatch-arg {a!r} must be one sbatch option such as --exclusive or --mail-type=END")
        if any("\n" in s for s in self.setup):
            raise SubmitError("--setup takes one shell line per flag (use --setup-file for a block)")

    def resources(self) -> str:
        """What the job asks SLURM for, printed before it is submitted."""
        torchrun = self.launcher == "torchrun"
        tasks = (f"1 (torchrun starts {self.procs_per_node} training processes in each)" if torchrun
                 else f"{self.procs_per_node} (one training process each)")
        cpus = str(self.cpus_per_task) if self.cpus_per_task else "SLURM's default"
        if self.loader_workers is not None:
            per = f"data.num_workers {self.loader_workers} + 1"
            cpus += f" ({self.procs_per_node} processes x ({per}))" if torchrun else f" ({per})"
        gpus = f"{self.gpus_per_node} ({self.gpus_per_node * self.nodes} in all)" if self.gpus_per_node else "none"
        rows = [("nodes", str(self.nodes)), ("tasks per node", tasks), ("cpus per task", cpus),
                ("gpus per node", gpus), ("time", self.time_limit or "the partition's default"),
                ("partition", self.partition or "the cluster's default")]
        rows += [(k, v) for k, v in (("mem", self.mem), ("account", self.account), ("qos", self.qos)) if v]
        return "resources asked for:\n" + "\n".join(f"  {k:<16}{v}" for k, v in rows) + "\n"

    # ------------------------------------------------------------------ rendering
    def _header(self) -> List[str]:
        tasks = 1 if self.launcher == "torchrun" else self.procs_per_node
        opts = [f"--job-name={self.job_name}", f"--nodes={self.nodes}", f"--ntasks-per-node={tasks}"]
        if self.gpus_per_node:
            opts.append(f"--gpus-per-node={self.gpus_per_node}")
        for flag, v in (("cpus-per-task", self.cpus_per_task), ("mem", self.mem), ("time", self.time_limit),
                        ("partition", self.partition), ("account", self.account), ("qos", self.qos),
                        ("constraint", self.constraint)):
            if v is not None:
                opts.append(f"--{flag}={v}")
        opts += [f"--signal=B:USR1@{self.signal_seconds}", "--requeue", "--open-mode=append"]
        if not self.template:  # a template's run directory is known only at sbatch time: --output there
            opts.append(f"--output={self.run_dir}/slurm/%x-%j.out")
        opts += self.sbatch_args
        return [f"#SBATCH {o}" for o in opts]

    def _words(self) -> Dict[str, str]:
        """The shell words the script is made of: this spec's values, quoted, or for a template
        (render_template) the environment variables set at sbatch time."""
        torchrun = self.launcher == "torchrun"
        if self.template:
            return {
                "config": '"$CONFIG"', "overrides": '"$@"', "output_dir": '"run.output_dir=$RUN_DIR"',
                "python": '"$PYTHON"', "python_dir": '"$(dirname "$(command -v "$PYTHON")")"',
                "workdir": '"${WORKDIR:-.}"', "marker": f'"$RUN_DIR/{PREEMPTED_MARKER}"', "procs": '"$PROCS_PER_NODE"',
                "cpus": ' --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}"',
                "threads": ("$(( ${SLURM_CPUS_PER_TASK:-$PROCS_PER_NODE} / PROCS_PER_NODE ))" if torchrun
                            else "${SLURM_CPUS_PER_TASK:-1}"),
            }
        q = shlex.quote
        # the run directory goes last and absolute, so logs and checkpoints land where sbatch writes
        kept = [o for o in self.overrides if not o.startswith("run.output_dir=")]
        return {
            "config": q(self.config), "overrides": " ".join(q(o) for o in kept),
            "output_dir": q(f"run.output_dir={self.run_dir}"), "python": q(self.python),
            "python_dir": q(str(Path(self.python).parent)), "workdir": q(self.workdir),
            "marker": q(f"{self.run_dir}/{PREEMPTED_MARKER}"), "procs": str(self.procs_per_node),
            # srun >= 22.05 does not inherit sbatch's --cpus-per-task; ask again
            "cpus": f" --cpus-per-task={self.cpus_per_task}" if self.cpus_per_task else "",
            "threads": str(max(1, (self.cpus_per_task or 1) // (self.procs_per_node if torchrun else 1))),
        }

    def train_command(self) -> str:
        w = self._words()
        args = ["-m", "mmpretrain.train", "--config", w["config"], *([w["overrides"]] if w["overrides"] else []),
                w["output_dir"]]
        if self.launcher == "srun":
            return (f"srun --ntasks-per-node={w['procs']}{w['cpus']} --wait={self.step_wait} {w['python']} -u "
                    + " ".join(args))
        torchrun = (f"{w['python']} -u -m torch.distributed.run --nnodes=\"$SLURM_NNODES\" --nproc_per_node={w['procs']} "
                    "--rdzv_backend=c10d --rdzv_endpoint=\"$MASTER_ADDR:$MASTER_PORT\" --rdzv_id=\"$SLURM_JOB_ID\" "
                    "--max_restarts=0")
        return f"srun --ntasks-per-node=1{w['cpus']} --wait={self.step_wait} {torchrun} " + " ".join(args)

    def render(self) -> str:
        w = self._words()
        if self.template:
            name = "torchrun.sbatch" if self.launcher == "torchrun" else "srun.sbatch"
            intro = [
                f"# Generated by `python -m mmpretrain.submit --template {self.launcher} > launch/slurm/{name}`",
                "# (tests/launch/test_submit.py checks it is current): the script mmpretrain-submit renders, with",
                "# CONFIG, RUN_DIR (required), PYTHON, PROCS_PER_NODE and WORKDIR from the environment. Copy it,",
                "# edit the #SBATCH lines, create $RUN_DIR/slurm (SLURM does not make the --output directory), then",
                "#   CONFIG=configs/base.yaml RUN_DIR=runs/base sbatch --output=runs/base/slurm/%x-%j.out \\",
                f"#       launch/slurm/{name} [key=value ...]",
                ("# One srun task per node runs torchrun (PROCS_PER_NODE workers)." if self.launcher == "torchrun" else
                 "# One srun task per process (SLURM_PROCID/LOCALID/NTASKS become RANK/LOCAL_RANK/WORLD_SIZE)."),
            ]
        else:
            intro = [f"# Rendered by mmpretrain-submit ({time.strftime('%Y-%m-%d %H:%M:%S')}); re-render instead of editing."]
        lines = ["#!/bin/bash", *self._header(), *intro,
                 "# USR1 (--signal, or `scancel --signal=USR1 --batch`) or TERM reach this shell, which forwards them",
                 "# to the training step; the ranks save together and exit with "
                 f"{REQUEUE_EXIT_CODE} (torchrun: 1 plus the {PREEMPTED_MARKER} file),",
                 "# and the script requeues the job, whose next run resumes from the latest checkpoint.",
                 "set -uo pipefail"]
        if self.template:
            procs = self.procs_per_node if self.launcher == "torchrun" else "$SLURM_NTASKS_PER_NODE"
            lines += [': "${CONFIG:?set CONFIG=path/to/config.yaml}" "${RUN_DIR:?set RUN_DIR=the run.output_dir}"',
                      "PYTHON=${PYTHON:-python}", f"PROCS_PER_NODE=${{PROCS_PER_NODE:-{procs}}}"]
        lines.append(f"cd {w['workdir']}")
        if self.setup:
            lines += ["# ---- environment set-up (--setup / --setup-file)", *self.setup, "# ----"]
        lines += [
            f'export PATH={w["python_dir"]}:"$PATH"  # its environment\'s tools (ninja) first',
            'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"',
            f"export MASTER_PORT=$(( {SLURM_PORT_BASE} + SLURM_JOB_ID % {SLURM_PORT_SPAN} ))",
            f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{w['threads']}}}",
        ]
        if self.launcher == "torchrun":
            handled = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"  # torchrun passes these on to its workers
            lines += [f"export PET_SIGNALS_TO_HANDLE={handled} TORCHELASTIC_SIGNALS_TO_HANDLE={handled}",
                      f"export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${{TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-{self.signal_seconds}}}"]
        lines += [
            f'echo "[mmpretrain-submit] job $SLURM_JOB_ID SLURM_RESTART_COUNT=${{SLURM_RESTART_COUNT:-0}} '
            f'nodes=$SLURM_JOB_NODELIST master=$MASTER_ADDR:$MASTER_PORT launcher={self.launcher} start=$(date +%FT%T)"',
            f"rm -f {w['marker']}  # a marker left by an earlier run must not requeue this one",
            "SIGNALLED=''",
            "forward() {",
            '    SIGNALLED=$1',
            '    echo "[mmpretrain-submit] caught SIG$1 at $(date +%T); forwarding it to the training step"',
            '    [ -n "${STEP_PID:-}" ] && kill -s "$1" "$STEP_PID" 2>/dev/null',
            "}",
            "trap 'forward USR1' USR1",
            "trap 'forward TERM' TERM",
            self.train_command() + " &",
            "STEP_PID=$!",
            "while :; do  # a trapped signal interrupts `wait`; keep waiting for the step itself",
            '    wait "$STEP_PID"; rc=$?',
            '    kill -0 "$STEP_PID" 2>/dev/null || break',
            "done",
            'echo "[mmpretrain-submit] training step exited with $rc at $(date +%T)${SIGNALLED:+ after SIG$SIGNALLED}"',
            f'if [ "$rc" -eq {REQUEUE_EXIT_CODE} ] || [ "$rc" -eq {PEER_LOST_EXIT_CODE} ] || [ -f {w["marker"]} ]; then',
            '    echo "[mmpretrain-submit] preempted or a rank was lost (exit $rc): requeueing job $SLURM_JOB_ID"',
            '    scontrol requeue "$SLURM_JOB_ID" && exit 0',
            '    echo "[mmpretrain-submit] scontrol requeue failed"',
            "fi",
            'exit "$rc"',
        ]
        return "\n".join(lines) + "\n"


TEMPLATES = ("torchrun", "srun")


def render_template(launcher: str) -> str:
    """launch/slurm/<launcher>.sbatch: the script render() makes, for 2 nodes x 8 GPUs, with the
    config, run directory, python and processes per node read from the environment at sbatch time."""
    if launcher not in TEMPLATES:
        raise SubmitError(f"--template {launcher!r}: choose one of {list(TEMPLATES)}")
    per_node = 8
    spec = JobSpec(config="", run_dir="", nodes=2, gpus_per_node=per_node, procs_per_node=per_node,
                   cpus_per_task=64 if launcher == "torchrun" else 8, time_limit="24:00:00", launcher=launcher,
                   template=True)
    spec.validate()
    return spec.render()


# ---------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    # the whole docstring: its first line alone stopped mid-sentence
    p = argparse.ArgumentParser(prog="mmpretrain-submit", description=__doc__, epilog=CONFIG_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="run config (YAML); validated before anything is submitted (required)")
    add_config_flags(p)
    p.add_argument("overrides", nargs="*", help="dotted config overrides, passed on to mmpretrain.train")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=1, help="0 for CPU nodes (then set --procs-per-node)")
    p.add_argument("--procs-per-node", type=int, default=None, help="training processes per node [gpus-per-node]")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="SLURM CPUs per task: per node with torchrun, per process with --launcher srun "
                        "[data.num_workers + 1 per training process]")
    p.add_argument("--mem", default=None, help="SLURM --mem, e.g. 200G")
    for name in ("partition", "account", "qos", "constraint"):
        p.add_argument(f"--{name}", default=None)
    p.add_argument("--time", default=None, help=f"time limit: {_TIME_FORMS}")
    p.add_argument("--job-name", default=None, help="[run.name of the config]")
    p.add_argument("--launcher", choices=("torchrun", "srun"), default="torchrun",
                   help="torchrun: one srun task per node running torchrun; srun: one srun task per GPU")
    p.add_argument("--signal-seconds", type=int, default=300,
                   help="USR1 this long before the time limit (SLURM checks every 30 s, so it may come earlier)")
    p.add_argument("--setup", action="append", default=[], help="a shell line run first (module load ..., source venv)")
    p.add_argument("--setup-file", default=None, help="a file of shell lines run first")
    p.add_argument("--sbatch-arg", action="append", default=[], help="an extra #SBATCH option; write it with =, e.g. --sbatch-arg=--exclusive")
    p.add_argument("--python", default=sys.executable, help="python on the compute nodes [%(default)s]")
    p.add_argument("--workdir", default=None, help="directory the job starts in [current directory]")
    p.add_argument("--dry-run", action="store_true", help="print the script; submit nothing")
    p.add_argument("--no-shard-check", action="store_true",
                   help="skip checking that data.train's local shards exist here (for data only the compute nodes mount)")
    p.add_argument("--template", choices=TEMPLATES,
                   help="print launch/slurm/<TEMPLATE>.sbatch (CONFIG, RUN_DIR, ... from the environment); needs no --config")
    return p


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    """Validate flags and config; raise SubmitError / ConfigError with the offending name."""
    cfg_path = Path(args.config)
    if not cfg_path.is_file():
        raise SubmitError(f"--config {args.config!r}: no such file")
    workdir = Path(args.workdir or ".").resolve()
    if not workdir.is_dir():
        raise SubmitError(f"--workdir {args.workdir!r}: no such directory")
    cfg = load_config(str(cfg_path), args.overrides)  # refuse a bad config now, not in the queue
    run_dir = Path(cfg.run.output_dir)
    run_dir = run_dir if run_dir.is_absolute() else workdir / run_dir
    setup = list(args.setup)
    if args.setup_file:
        try:
            setup += Path(args.setup_file).read_text().rstrip("\n").splitlines()
        except OSError as e:
            raise SubmitError(f"--setup-file {args.setup_file!r}: {e.strerror}") from None
    gpus = args.gpus_per_node
    procs = args.procs_per_node if args.procs_per_node is not None else gpus
    cpus, workers = args.cpus_per_task, None
    if cpus is None:  # each rank and its loader workers a CPU each (SLURM's default is 1 per task)
        workers = cfg.data.num_workers
        cpus = (workers + 1) * (max(procs, 1) if args.launcher == "torchrun" else 1)
    spec = JobSpec(
        config=str(cfg_path.resolve()), run_dir=str(run_dir), overrides=list(args.overrides),
        job_name=args.job_name or cfg.run.name, nodes=args.nodes, gpus_per_node=gpus, procs_per_node=procs,
        cpus_per_task=cpus, loader_workers=workers, mem=args.mem, partition=args.partition, account=args.account,
        qos=args.qos, constraint=args.constraint, time_limit=args.time, launcher=args.launcher,
        signal_seconds=args.signal_seconds, setup=setup, sbatch_args=list(args.sbatch_arg),
        python=args.python, workdir=str(workdir),
    )
    spec.validate()
    if not args.no_shard_check:
        check_train_shards(cfg.data.train, workdir)
    return spec


@contextlib.contextmanager
def _in_dir(path: str) -> Iterator[None]:
    """chdir for a block (contextlib.chdir needs Python 3.11; clusters may run 3.9)."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def check_train_shards(sources: Sequence[object], workdir: Path) -> None:
    """data.train lists sources, and each local shard exists as the job will see it (relative to
    `workdir`; brace patterns, `a::b`, directories and globs expanded as the data code does). Only
    existence: the job's own preflight reads them. Remote URLs (pipe:, http, s3) are not looked at."""
    from mmpretrain.data.shards import expand_urls, local_path  # torch-free

    if not sources:
        raise SubmitError("config key 'data.train' lists no sources: the job would queue, start and stop at "
                          "once; give e.g. data.train=[{name: a, urls: 'shards/a-{000000..000009}.tar'}]")
    for i, src in enumerate(sources):
        key, urls_value = f"data.train[{i}].urls", getattr(src, "urls")
        with _in_dir(workdir):  # relative paths, directories and globs as the job resolves them
            try:
                urls = expand_urls(urls_value)
            except ValueError as e:  # unbalanced braces and other expansion errors
                raise SubmitError(f"config key '{key}' = {urls_value!r} cannot be expanded: {e}") from None
            local = [p for p in map(local_path, urls) if p is not None]
            missing = [p for p in local if not os.path.isfile(p)]
        if not urls:
            raise SubmitError(f"config key '{key}' = {urls_value!r} matches no shards (seen from {workdir})")
        if missing:
            raise SubmitError(f"config key '{key}': shard '{missing[0]}' does not exist (seen from {workdir} on "
                              f"this host; {len(missing)} of {len(urls)} shards missing); fix the path, or pass "
                              "--no-shard-check when only the compute nodes mount the data")


def submit(spec: JobSpec, script: str, sbatch: str = "sbatch") -> str:
    """Write the script under run_dir/slurm/, run sbatch, append the job id to run_dir/slurm_jobs.txt."""
    slurm_dir = Path(spec.run_dir) / "slurm"
    slurm_dir.mkdir(parents=True, exist_ok=True)  # SLURM does not create the --output directory
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = slurm_dir / f"{spec.job_name}-{stamp}.sbatch"
    path.write_text(script)
    try:
        out = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True, cwd=spec.workdir)
    except FileNotFoundError:
        raise SubmitError(f"'{sbatch}' not found: run this on a SLURM login node, or use --dry-run") from None
    if out.returncode != 0:
        raise SubmitError(f"sbatch failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    job_id = out.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SubmitError(f"sbatch printed no job id: {out.stdout!r}")
    with open(Path(spec.run_dir) / JOBS_FILE, "a") as f:
        f.write(f"{job_id}\t{time.strftime('%Y-%m-%dT%H:%M:%S')}\t{path}\n")
    return job_id


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parse_cli(parser, argv)  # `key=value` anywhere is an override, as in mmpretrain.train
    if args.template:
        sys.stdout.write(render_template(args.template))
        return 0
    if args.config is None:
        parser.error("the following arguments are required: --config")
    if args.print_config:  # what the job will train with; nothing rendered or submitted
        try:
            sys.stdout.write(to_yaml(load_config(args.config, args.overrides)))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        spec = spec_from_args(args)
        script = spec.render()
        if args.dry_run:
            sys.stderr.write(spec.resources())  # stdout stays the script alone
            sys.stdout.write(script)
            return 0
        sys.stdout.write(spec.resources())
        sys.stdout.flush()
        job_id = submit(spec, script)
    except (SubmitError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"submitted job {job_id}; logs: {spec.run_dir}/slurm/{spec.job_name}-{job_id}.out; "
          f"job ids: {spec.run_dir}/{JOBS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
