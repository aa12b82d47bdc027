"""mmpretrain-submit without a cluster: the rendered sbatch script (both launchers), flag
validation, and submission through a stand-in sbatch that records the job id."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from trainkit import REPO, TINY_CONFIG
from mmpretrain.distributed import SLURM_PORT_BASE, SLURM_PORT_SPAN, slurm_port
from mmpretrain.lifecycle import PEER_LOST_EXIT_CODE
from mmpretrain.preemption import PREEMPTED_MARKER, REQUEUE_EXIT_CODE
from mmpretrain.submit import SubmitError, build_parser, main, parse_time, render_template, spec_from_args, submit


def _shards(root: Path) -> Path:
    """`root` holding the tiny config's train shards (data/tiny/train/train-{000000..000003}.tar,
    relative to the job's directory) as empty files: submit checks that they exist, not their contents."""
    d = root / "data" / "tiny" / "train"
    d.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        (d / f"train-{i:06d}.tar").touch()
    return root


def _spec(tmp_path: Path, *flags: str):
    args = build_parser().parse_args(["--config", str(TINY_CONFIG), "--workdir", str(_shards(tmp_path)),
                                      *flags, f"run.output_dir={tmp_path / 'run'}"])
    return spec_from_args(args)


def _render(tmp_path: Path, *flags: str) -> str:
    return _spec(tmp_path, *flags).render()


def _step_line(script: str) -> str:
    return next(line for line in script.splitlines() if line.startswith("srun "))


def test_default_is_srun_torchrun_with_requeue(tmp_path):
    s = _render(tmp_path, "--nodes", "4", "--gpus-per-node", "8", "--cpus-per-task", "64", "--partition", "gpu",
                "--account", "proj1", "--qos", "high", "--constraint", "a100&ib", "--time", "2-00:00:00",
                "--setup", "module load cuda/12.4", "--sbatch-arg=--exclusive", "optim.lr=3e-4")
    sb = [line[len("#SBATCH "):] for line in s.splitlines() if line.startswith("#SBATCH ")]
    for opt in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=64", "--partition=gpu",
                "--account=proj1", "--qos=high", "--constraint=a100&ib", "--time=2-00:00:00",
                "--signal=B:USR1@300", "--requeue", "--open-mode=append", "--exclusive",
                f"--output={tmp_path / 'run'}/slurm/%x-%j.out", "--job-name=tiny"):
        assert opt in sb, opt
    assert s.index("module load cuda/12.4") < s.index("srun ")
    assert 'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"' in s
    argv = shlex.split(_step_line(s).rstrip(" &"))
    assert argv[:4] == ["srun", "--ntasks-per-node=1", "--cpus-per-task=64", "--wait=120"]
    assert argv[4:8] == [sys.executable, "-u", "-m", "torch.distributed.run"]
    for a in ("--nnodes=$SLURM_NNODES", "--nproc_per_node=8", "--rdzv_backend=c10d",
              "--rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT", "--rdzv_id=$SLURM_JOB_ID"):
        assert a in argv, a
    i = argv.index("mmpretrain.train")
    assert argv[i + 1:i + 3] == ["--config", str(TINY_CONFIG)]
    assert argv[i + 3:] == ["optim.lr=3e-4", f"run.output_dir={tmp_path / 'run'}"]
    assert "PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in s  # torchrun passes USR1 on
    assert "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}" in s  # 64 CPUs / 8 processes
    assert "trap 'forward USR1' USR1" in s and "trap 'forward TERM' TERM" in s
    assert 'scontrol requeue "$SLURM_JOB_ID"' in s
    assert f'[ -f {tmp_path / "run"}/PREEMPTED ]' in s and '[ "$rc" -eq 75 ]' in s
    subprocess.run(["bash", "-n"], input=s, text=True, check=True)  # valid bash


def test_srun_launcher_one_task_per_process(tmp_path):
    s = _render(tmp_path, "--launcher", "srun", "--gpus-per-node", "0", "--procs-per-node", "2",
                "--cpus-per-task", "1", "--signal-seconds", "60", "--time", "10")
    assert "#SBATCH --ntasks-per-node=2" in s and "--gpus-per-node" not in s
    assert "#SBATCH --signal=B:USR1@60" in s
    argv = shlex.split(_step_line(s).rstrip(" &"))
    assert argv[:4] == ["srun", "--ntasks-per-node=2", "--cpus-per-task=1", "--wait=120"]
    assert argv[4:8] == [sys.executable, "-u", "-m", "mmpretrain.train"]
    assert "torch.distributed.run" not in s and "PET_SIGNALS" not in s
    subprocess.run(["bash", "-n"], input=s, text=True, check=True)


def test_master_port_matches_discovery(tmp_path):
    s = _render(tmp_path)
    line = next(x for x in s.splitlines() if x.startswith("export MASTER_PORT="))
    for job in ("7", "123456", "40000"):
        out = subprocess.run(["bash", "-c", f"{line}; echo $MASTER_PORT"], env={"SLURM_JOB_ID": job},
                             capture_output=True, text=True, check=True).stdout
        assert int(out) == slurm_port(int(job))


def test_overrides_with_quotes_survive(tmp_path):
    (tmp_path / "a b").mkdir()
    for i in range(4):
        (tmp_path / "a b" / f"{i:03d}.tar").touch()
    tricky = "data.train=[{name: demo, urls: 'a b/{000..003}.tar'}]"
    argv = shlex.split(_step_line(_render(tmp_path, tricky)).rstrip(" &"))
    assert tricky in argv


@pytest.mark.parametrize("value, seconds", [("90", 5400), ("1:30", 90), ("01:00:00", 3600), ("1-02", 93600),
                                            ("1-02:30", 95400), ("1-00:00:10", 86410)])
def test_parse_time(value, seconds):
    assert parse_time(value) == seconds


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--time", "1h"], r"--time '1h' is not a SLURM time; use MM, MM:SS, HH:MM:SS"),
        (["--time", "1:75"], r"--time '1:75': minutes and seconds must be below 60"),
        (["--time", "0"], r"--time '0' must be longer than 0"),
        (["--nodes", "0"], r"--nodes 0 must be >= 1"),
        (["--gpus-per-node", "0"], r"--procs-per-node 0 must be >= 1 \(set it when --gpus-per-node is 0\)"),
        (["--gpus-per-node", "4", "--procs-per-node", "8"], r"--procs-per-node 8 exceeds --gpus-per-node 4"),
        (["--cpus-per-task", "0"], r"--cpus-per-task 0 must be >= 1"),
        (["--time", "5", "--signal-seconds", "300"], r"--signal-seconds 300 must be shorter than --time 5 \(300 s\)"),
        (["--partition", "gpu; rm -rf /"], r"--partition 'gpu; rm -rf /' may not hold spaces"),
        (["--sbatch-arg", "exclusive"], r"--sbatch-arg 'exclusive' must be one sbatch option"),
        (["--setup-file", "/nonexistent/setup.sh"], r"--setup-file '/nonexistent/setup.sh': No such file"),
    ],
)
def test_bad_flags_are_refused_with_the_flag_named(tmp_path, flags, message):
    with pytest.raises(SubmitError, match=message):
        _spec(tmp_path, *flags)


def test_run_dir_with_whitespace_is_refused():
    args = build_parser().parse_args(["--config", str(TINY_CONFIG), "run.output_dir=/tmp/my run"])
    with pytest.raises(SubmitError, match=r"run.output_dir '/tmp/my run' may not hold whitespace"):
        spec_from_args(args)


def test_cli_errors_exit_2_and_submit_nothing(tmp_path, capsys):
    assert main(["--config", str(TINY_CONFIG), "--dry-run", "train.stepz=3"]) == 2
    assert "train.stepz" in capsys.readouterr().err
    assert main(["--config", str(TINY_CONFIG), "--dry-run", "--nodes", "-1"]) == 2
    assert not (tmp_path / "run").exists()


def test_missing_config_message(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "missing.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"--config '{tmp_path / 'missing.yaml'}': no such file" in err


def test_dry_run_prints_the_script(tmp_path, capsys):
    assert main(["--config", str(TINY_CONFIG), "--workdir", str(_shards(tmp_path)), "--dry-run",
                 f"run.output_dir={tmp_path / 'run'}"]) == 0
    cap = capsys.readouterr()
    out = cap.out
    assert out.startswith("#!/bin/bash\n#SBATCH ") and "mmpretrain.train" in out
    assert "cpus per task" in cap.err and "cpus per task" not in out  # stdout stays the script alone
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_empty_or_missing_train_shards_are_refused_before_queueing(tmp_path, capsys):
    """The job would queue, start and stop at once: data.train empty, or a local shard missing as
    seen from the job's directory (brace patterns expanded as the data code does); remote URLs are
    the nodes' to reach."""
    with pytest.raises(SubmitError, match=r"config key 'data.train' lists no sources"):
        _spec(tmp_path, "data.train=[]")
    work = _shards(tmp_path / "job")
    (work / "data" / "tiny" / "train" / "train-000002.tar").unlink()
    with pytest.raises(SubmitError, match=r"config key 'data.train\[0\].urls': shard "
                       r"'data/tiny/train/train-000002.tar' does not exist \(seen from .*; 1 of 4 shards missing\)"):
        spec_from_args(build_parser().parse_args(["--config", str(TINY_CONFIG), "--workdir", str(work)]))
    assert main(["--config", str(TINY_CONFIG), "--workdir", str(work), "--dry-run", "--nodes", "2",
                 f"run.output_dir={tmp_path / 'run'}"]) == 2
    cap = capsys.readouterr()
    assert "train-000002.tar' does not exist" in cap.err and cap.out == ""
    absent = tmp_path / "nowhere"
    with pytest.raises(SubmitError, match=f"shard '{absent}/b-000.tar' does not exist"):
        _spec(tmp_path, f"data.train=[{{name: b, urls: '{absent}/b-{{000..001}}.tar'}}]")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SubmitError, match=r"'empty' matches no shards"):
        _spec(tmp_path, "data.train=[{name: c, urls: empty}]")
    # remote shards are not looked at; --no-shard-check for data this host does not mount
    remote = ("data.train=[{name: r, urls: 'pipe:curl -s http://h/r-{000..009}.tar'}, "
              "{name: s, urls: 's3://bucket/s-{000..009}.tar::https://h/t-000.tar'}]")
    assert _spec(tmp_path, remote).render().count("pipe:curl") == 1
    assert _spec(tmp_path, "--no-shard-check").nodes == 1


def test_cpus_per_task_defaults_to_loader_workers_plus_one(tmp_path):
    """8 ranks with 7 loader workers each: 8 CPUs a rank, asked for in #SBATCH and on the srun line."""
    s = _render(tmp_path, "--launcher", "srun", "--gpus-per-node", "8", "data.num_workers=7")
    assert "#SBATCH --cpus-per-task=8" in s and "#SBATCH --ntasks-per-node=8" in s
    assert "--cpus-per-task=8" in shlex.split(_step_line(s).rstrip(" &"))
    # torchrun: one task per node runs all 8 ranks
    s = _render(tmp_path, "--gpus-per-node", "8", "data.num_workers=7")
    assert "#SBATCH --cpus-per-task=64" in s and "#SBATCH --ntasks-per-node=1" in s
    assert "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}" in s
    s = _render(tmp_path, "--launcher", "srun", "--cpus-per-task", "3", "data.num_workers=7")
    assert "#SBATCH --cpus-per-task=3" in s and "--cpus-per-task=8" not in s


def test_submission_prints_the_resources_first(tmp_path, capsys, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\necho 777\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert main(["--config", str(TINY_CONFIG), "--workdir", str(_shards(tmp_path)), "--nodes", "2",
                 "--gpus-per-node", "8", "--time", "2:00:00", "--partition", "gpu", "data.num_workers=3",
                 f"run.output_dir={tmp_path / 'run'}"]) == 0
    out = capsys.readouterr().out.splitlines()
    i = out.index("resources asked for:")
    assert out[i + 1:i + 7] == ["  nodes           2",
                                "  tasks per node  1 (torchrun starts 8 training processes in each)",
                                "  cpus per task   32 (8 processes x (data.num_workers 3 + 1))",
                                "  gpus per node   8 (16 in all)",
                                "  time            2:00:00",
                                "  partition       gpu"]
    assert out[-1].startswith("submitted job 777;") and i < len(out) - 1


def test_submit_records_the_job_id(tmp_path):
    fake = tmp_path / "sbatch"
    fake.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/sbatch_args"\necho "4242;cluster1"\n')
    fake.chmod(0o755)
    spec = _spec(tmp_path)
    job = submit(spec, spec.render(), sbatch=str(fake))
    assert job == "4242"
    line = (tmp_path / "run" / "slurm_jobs.txt").read_text().splitlines()
    assert len(line) == 1 and line[0].split("\t")[0] == "4242"
    script = Path(line[0].split("\t")[2])
    assert script.parent == tmp_path / "run" / "slurm" and "mmpretrain.train" in script.read_text()
    assert (tmp_path / "sbatch_args").read_text().split() == ["--parsable", str(script)]
    fake.write_text("#!/bin/sh\necho 'sbatch: error: invalid partition' >&2\nexit 1\n")
    with pytest.raises(SubmitError, match="sbatch failed \\(1\\): sbatch: error: invalid partition"):
        submit(spec, spec.render(), sbatch=str(fake))
    assert len((tmp_path / "run" / "slurm_jobs.txt").read_text().splitlines()) == 1


def test_launch_scripts_are_valid_bash():
    for script in sorted((REPO / "launch").rglob("*.sh")) + sorted((REPO / "launch").rglob("*.sbatch")):
        subprocess.run(["bash", "-n", str(script)], check=True)
        assert os.access(script, os.X_OK) or script.suffix == ".sbatch", script


@pytest.mark.parametrize("template", ["torchrun.sbatch", "srun.sbatch"])
def test_sbatch_templates_carry_the_requeue_loop(template):
    s = (REPO / "launch" / "slurm" / template).read_text()
    for piece in ("#SBATCH --signal=B:USR1@", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                  "trap 'forward USR1' USR1", "trap 'forward TERM' TERM", '[ "$rc" -eq 75 ]',
                  '[ -f "$RUN_DIR/PREEMPTED" ]', 'scontrol requeue "$SLURM_JOB_ID"',
                  "export MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))", "-m mmpretrain.train"):
        assert piece in s, piece


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_sbatch_templates_are_the_renderers_output(launcher, capsys):
    """launch/slurm/*.sbatch are generated by the one renderer (constants included), so they cannot drift."""
    want = render_template(launcher)
    path = REPO / "launch" / "slurm" / f"{launcher}.sbatch"
    assert path.read_text() == want, (
        f"{path} is stale; regenerate: python -m mmpretrain.submit --template {launcher} > launch/slurm/{launcher}.sbatch")
    assert main(["--template", launcher]) == 0 and capsys.readouterr().out == want
    # its exit code and port come from the code, and it is the script mmpretrain-submit renders
    assert (f'[ "$rc" -eq {REQUEUE_EXIT_CODE} ] || [ "$rc" -eq {PEER_LOST_EXIT_CODE} ] '
            f'|| [ -f "$RUN_DIR/{PREEMPTED_MARKER}" ]') in want
    assert f"MASTER_PORT=$(( {SLURM_PORT_BASE} + SLURM_JOB_ID % {SLURM_PORT_SPAN} ))" in want


def _fake_slurm(bin_dir: Path, step_rc: int) -> None:
    """srun records its argv and exits step_rc; scontrol answers `show hostnames` and records requeues."""
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > "$FAKE_LOG/srun_args"\n'
                                  f'echo "MASTER_PORT=$MASTER_PORT OMP_NUM_THREADS=$OMP_NUM_THREADS" > "$FAKE_LOG/srun_env"\n'
                                  f"exit {step_rc}\n")
    (bin_dir / "scontrol").write_text('#!/bin/bash\nif [ "$1" = show ]; then echo node7; echo node8; '
                                      'else echo "$@" >> "$FAKE_LOG/scontrol"; fi\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
@pytest.mark.parametrize("step_rc", [0, REQUEUE_EXIT_CODE])
def test_templates_run_the_training_step_and_requeue(tmp_path, launcher, step_rc):
    """The committed template under bash with stand-in srun / scontrol: the step gets the config, the
    extra overrides and the run directory from the environment; exit 75 requeues, 0 does not."""
    _fake_slurm(tmp_path / "bin", step_rc)
    run_dir = tmp_path / "run"
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "FAKE_LOG": str(tmp_path), "CONFIG": "configs/x.yaml",
           "RUN_DIR": str(run_dir), "PYTHON": sys.executable, "WORKDIR": str(tmp_path), "SLURM_JOB_ID": "123",
           "SLURM_JOB_NODELIST": "node[7-8]", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4",
           "SLURM_CPUS_PER_TASK": "16"}
    res = subprocess.run(["bash", str(REPO / "launch" / "slurm" / f"{launcher}.sbatch"), "optim.lr=3e-4",
                          "data.train=[{name: a, urls: 'a b.tar'}]"], env=env, capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert res.returncode == (0 if step_rc == REQUEUE_EXIT_CODE else step_rc), res.stderr
    argv = (tmp_path / "srun_args").read_text().splitlines()
    i = argv.index("mmpretrain.train")
    assert argv[i + 1:] == ["--config", "configs/x.yaml", "optim.lr=3e-4", "data.train=[{name: a, urls: 'a b.tar'}]",
                            f"run.output_dir={run_dir}"]
    assert argv[argv.index("-u") - 1] == sys.executable
    port = slurm_port(123)
    if launcher == "torchrun":
        assert {"--nnodes=2", "--nproc_per_node=8", f"--rdzv_endpoint=node7:{port}", "--rdzv_id=123"} <= set(argv)
        threads = 16 // 8
    else:
        assert "--ntasks-per-node=4" in argv and "torch.distributed.run" not in argv
        threads = 16
    assert "--cpus-per-task=16" in argv
    assert (tmp_path / "srun_env").read_text().split() == [f"MASTER_PORT={port}", f"OMP_NUM_THREADS={threads}"]
    requeued = (tmp_path / "scontrol").read_text() if (tmp_path / "scontrol").exists() else ""
    assert requeued == ("requeue 123\n" if step_rc == REQUEUE_EXIT_CODE else ""), res.stdout
    # without CONFIG / RUN_DIR the template stops before starting anything
    env.pop("RUN_DIR")
    (tmp_path / "srun_args").unlink()
    res = subprocess.run(["bash", str(REPO / "launch" / "slurm" / f"{launcher}.sbatch")], env=env,
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode != 0 and "set RUN_DIR" in res.stderr and not (tmp_path / "srun_args").exists()
