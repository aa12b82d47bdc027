"""Checks a training run makes before anything is built or written: shards, tokenizer, resume
path, run directory, master port. Each failure is a ConfigError with one line naming the key (or
the shard / file) and the value; `python -m mmpretrain.train` prints it and exits 2, before any
process group and without creating the run directory.

Called from `mmpretrain.train.main()` after `load_config`, never inside it: evaluate and export
load saved configs whose data or run directory may be long gone."""
from __future__ import annotations

import errno
import os
import socket
import stat
from typing import Mapping, Optional

from mmpretrain.config import Config, ConfigError

# pseudo file systems where nothing can be created even by root (os.access says yes there)
_PSEUDO_FS = {"proc", "sysfs", "cgroup", "cgroup2", "devpts", "debugfs", "tracefs", "securityfs", "pstore",
              "bpf", "configfs", "fusectl", "mqueue", "binfmt_misc", "efivarfs", "autofs"}


def check(cfg: Config, config_path: Optional[str] = None, env: Optional[Mapping[str, str]] = None) -> None:
    """Every check below; raises ConfigError with the first problem."""
    env = os.environ if env is None else env
    check_output_dir(cfg.run.output_dir)
    check_data(cfg, config_path)
    check_tokenizer(cfg.data.tokenizer)
    check_towers(cfg)
    check_deepspeed(cfg)
    check_resume(cfg.train.resume)
    check_report_to(cfg, env)
    check_port(env)


# ----------------------------------------------------------------------------- data


def check_data(cfg: Config, config_path: Optional[str] = None) -> None:
    """Every source lists shards that exist and that a tar reader can read; counted, they hold samples."""
    # lazy: shard helpers are only needed here (they stay torch-free: webdataset loads only for pipes)
    import braceexpand

    from mmpretrain.data.shards import ShardError, expand_urls, local_path, shard_problem, shard_sizes

    if not cfg.data.train:
        why = ("no --config was given" if config_path is None else
               f"config file '{config_path}' sets none" if not _has_data(config_path) else "")
        raise ConfigError("config key 'data.train' lists no sources" + (f" ({why})" if why else "")
                          + "; give e.g. data.train=[{name: a, urls: 'shards/a-{000000..000009}.tar'}]")
    for i, src in enumerate(cfg.data.train):
        key = f"data.train[{i}].urls"
        try:
            urls = expand_urls(src.urls)
        except braceexpand.UnbalancedBracesError:
            raise ConfigError(f"config key '{key}' = {src.urls!r} has unbalanced braces") from None
        except ValueError as e:  # other brace-expansion errors
            raise ConfigError(f"config key '{key}' = {src.urls!r} cannot be expanded: {e}") from None
        if not urls:
            raise ConfigError(f"config key '{key}' = {src.urls!r} matches no shards")
        local = [(u, p) for u, p in ((u, local_path(u)) for u in urls) if p is not None]
        missing = [p for _, p in local if not os.path.isfile(p)]
        if missing:
            raise ConfigError(f"config key '{key}' = {src.urls!r}: shard '{missing[0]}' does not exist "
                              f"({len(missing)} of {len(urls)} shards missing)")
        # a bad shard among good ones is the pipeline's to count (skipped, per shard); a source
        # none of whose shards can be read is a wrong path or format, refused here naming the file
        problems = [(p, r) for p, r in ((p, shard_problem(p)) for _, p in local) if r is not None]
        if problems and len(problems) == len(urls):
            path, reason = problems[0]
            more = f" (and all {len(urls)} shards of source '{src.name}' are unusable)" if len(urls) > 1 else ""
            raise ConfigError(f"config key '{key}': shard '{path}' {reason}{more}")
        try:
            sizes = shard_sizes(urls, src.sizes, required=not cfg.data.resampled)
        except (ShardError, OSError, ValueError) as e:
            raise ConfigError(f"config key 'data.train[{i}]' (source '{src.name}'): {e}") from None
        if not cfg.data.resampled and sum(s or 0 for s in sizes) == 0:
            raise ConfigError(f"config key '{key}' = {src.urls!r}: its {len(urls)} shards hold no samples "
                              f"(first: '{urls[0]}')")


def _has_data(config_path: str) -> bool:
    try:
        with open(config_path) as f:
            return any(line.strip() and not line.lstrip().startswith("#") for line in f)
    except OSError:
        return False


# ----------------------------------------------------------------------------- files


def check_tokenizer(spec: str) -> None:
    """`data.tokenizer`: 'bytes', a tokenizer.json file or a tokenizer directory (as build_tokenizer reads it)."""
    if spec == "bytes":
        return
    if not os.path.exists(spec):
        raise ConfigError(f"config key 'data.tokenizer' = {spec!r}: no such file or directory "
                          "(give 'bytes', a tokenizer.json file or a tokenizer directory)")
    from mmpretrain.data.tokenizer import build_tokenizer  # lazy: tokenizers load only for a real path

    try:
        build_tokenizer(spec)
    except Exception as e:  # noqa: BLE001 - any failure to read it is this key's problem
        raise ConfigError(f"config key 'data.tokenizer' = {spec!r} cannot be loaded: "
                          f"{' '.join(f'{type(e).__name__}: {e}'.split())}") from None


def check_towers(cfg: Config) -> None:
    """`model.<tower>.init` paths, and each HF tower's directory: config.json of the right kind of
    model, text: tokenizer files with pad / bos / eos tokens, image: a processor whose size is
    data.image_size. Then data.image_mean / image_std take the image processor's (unless given)."""
    from mmpretrain import modalities as M  # lazy: the registry imports the schema
    from mmpretrain.config import TOWER_INITS, audio_frontend_path

    sections = [(m, M.tower_section(cfg, m)) for m in M.active(cfg) if m.config_section]
    sections = [(m, t) for m, t in sections if t is not None and hasattr(t, "init")]
    for m, t in sections:
        if t.init not in TOWER_INITS and not os.path.exists(t.init):
            raise ConfigError(f"config key 'model.{m.config_section}.init' = {t.init!r}: no such export or "
                              f"checkpoint (give {', '.join(TOWER_INITS)} or a path)")
    if not audio_frontend_path(cfg.data) and all(getattr(t, "kind", "native") != "hf" for _, t in sections):
        return  # native towers: nothing to read, and no torch to import (the HF tower modules need it)
    from mmpretrain.models import hf, hf_audio

    for m, t in sections:
        role = "language" if m.name == M.TEXT else "vision" if m.config_section == "vision" else None
        hf.check_tower(cfg, m.config_section, role)
    hf.resolve_image_stats(cfg)
    hf_audio.resolve_audio_frontend(cfg)  # data.audio.feature_extractor from model.audio.hf_path
    hf_audio.check_audio_tower(cfg)


def check_deepspeed(cfg: Config) -> None:
    """`train.deepspeed` (merged into the generated DeepSpeed config): only keys passed through,
    zero_optimization by DeepSpeed's own schema. DeepSpeed (and torch) load only when it is set."""
    if not cfg.train.deepspeed:
        return
    from mmpretrain.engine import deepspeed_overrides, deepspeed_overrides_problem

    problem = deepspeed_overrides_problem(deepspeed_overrides(cfg))
    if problem:
        raise ConfigError(problem)


def check_report_to(cfg: Config, env: Optional[Mapping[str, str]] = None) -> None:
    """log.report_to / log.wandb.mode: the packages of the requested backends are installed."""
    from mmpretrain.report_backends import missing_packages

    problem = missing_packages(cfg, env)
    if problem:
        raise ConfigError(problem)


def check_resume(spec: str) -> None:
    """`train.resume`: auto | never | a complete checkpoint directory (checkpoint.find_resume reads it)."""
    if spec in ("auto", "never"):
        return
    if not os.path.exists(spec):
        raise ConfigError(f"config key 'train.resume' = {spec!r}: no such checkpoint directory "
                          "(give auto, never or a checkpoints/step_XXXXXXXX directory)")
    if not os.path.isdir(spec) or not os.path.exists(os.path.join(spec, "COMPLETE")):
        raise ConfigError(f"config key 'train.resume' = {spec!r} is not a complete checkpoint "
                          "(no COMPLETE marker: incomplete or not a checkpoint directory)")


def _mount_fstype(path: str) -> Optional[str]:
    """File system type of the mount holding `path` (Linux /proc/self/mountinfo), or None."""
    try:
        dev = os.stat(path).st_dev
        want = f"{os.major(dev)}:{os.minor(dev)}"
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) > 2 and fields[2] == want and right:
                    return right.split()[0]
    except OSError:
        return None
    return None


def check_output_dir(output_dir: str) -> None:
    """`run.output_dir` exists as a writable directory or can be created: walks up to the nearest
    existing ancestor and tests it, creating nothing."""
    key = f"config key 'run.output_dir' = {output_dir!r}"
    path = os.path.abspath(output_dir)
    probe = path
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    try:
        st = os.stat(probe)
    except OSError as e:  # a dangling link, a loop
        raise ConfigError(f"{key}: '{probe}' cannot be used ({e.strerror or e})") from None
    if not stat.S_ISDIR(st.st_mode):
        where = "is a file" if probe == path else f"lies under '{probe}', which is a file, not a directory"
        raise ConfigError(f"{key} {where}")
    verb = "is not writable" if probe == path else f"cannot be created: '{probe}' is not writable"
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{key} {verb}")
    if os.statvfs(probe).f_flag & os.ST_RDONLY:
        raise ConfigError(f"{key} {verb} (read-only file system)")
    fstype = _mount_fstype(probe)
    if fstype in _PSEUDO_FS:
        raise ConfigError(f"{key} {verb} ({fstype} is a pseudo file system)")


# ----------------------------------------------------------------------------- port


def _rank(env: Mapping[str, str]) -> Optional[int]:
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        if name in env:
            try:
                return int(env[name])
            except ValueError:
                return None  # distributed.discover names the bad variable
    return 0  # one process: it creates its own store


def _is_local(addr: str) -> bool:
    """Whether `addr` names this host (binding a socket to it works)."""
    try:
        infos = socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.bind((sockaddr[0], 0) + tuple(sockaddr[2:]))
            return True
        except OSError:
            continue
    return False


def port_in_use(port: int) -> bool:
    """Whether something on this host listens on `port` (a store's bind to it would fail)."""
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the store does: TIME_WAIT is no conflict
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True
        finally:
            s.close()
    return False


def check_port(env: Mapping[str, str]) -> None:
    """Rank 0 on the master host creates the process group's TCP store on MASTER_PORT: if another
    job holds that port, say so now instead of a raw EADDRINUSE after a long wait. Under torchrun
    / accelerate (TORCHELASTIC_USE_AGENT_STORE=True) the launcher's agent already holds the port
    for this run: nothing to check."""
    port_s = env.get("MASTER_PORT")
    if not port_s or env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" or _rank(env) != 0:
        return
    try:
        port = int(port_s)
    except ValueError:
        return  # distributed.discover names it
    if not 0 < port < 65536:
        return
    addr = env.get("MASTER_ADDR") or "127.0.0.1"
    if not _is_local(addr) or not port_in_use(port):
        return
    raise ConfigError(f"MASTER_PORT={port} on {addr} is already in use by another process; pick a free port: "
                      f"deepspeed/torchrun --master_port N, accelerate --main_process_port N, or MASTER_PORT=N "
                      f"for launch/*.sh (which pick a free one on a single node when MASTER_PORT is unset)")


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _main(argv: Optional[list] = None) -> int:
    """For launch/*.sh: `--free-port` prints a free port; `--check-port ADDR PORT` exits 2 with one
    line when PORT is taken on this host (the launcher's own store would die on it with a traceback)."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="mmpretrain.preflight")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--free-port", action="store_true")
    g.add_argument("--check-port", nargs=2, metavar=("ADDR", "PORT"))
    args = p.parse_args(argv)
    if args.free_port:
        print(free_port())
        return 0
    addr, port = args.check_port
    try:
        check_port({"MASTER_ADDR": addr, "MASTER_PORT": port, "RANK": "0"})
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
