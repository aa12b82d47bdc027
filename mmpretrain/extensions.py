"""DeepSpeed's JIT-compiled ops, built once per environment and never on the training path.

DeepSpeed's CPU communication backend loads the `deepspeed_shm_comm` op
(`deepspeed.comm.torch.build_shm_op` -> `ShareMemCommBuilder`) at every start. Unless the op
was compiled into the DeepSpeed wheel, `OpBuilder.load()` JIT-builds it through
`torch.utils.cpp_extension.load`, which takes `$TORCH_EXTENSIONS_DIR/<op>/lock` (a `FileBaton`:
an O_EXCL file that its holder keeps open until it removes it) even when nothing needs
compiling. A process killed while holding it leaves the file behind, and every later start
waits in `FileBaton.wait()` forever, printing nothing.

Here:
* `make install` runs `python -m mmpretrain.extensions --build` with `TORCH_EXTENSIONS_DIR`
  set to `<venv>/torch_extensions` (the default here too when the variable is unset): one
  directory per environment, so another venv or checkout never rebuilds it. The build writes
  `mmpretrain-ops.json` (versions and source hashes) next to the ops.
* `ensure_ops()` (first thing in `distributed.init()`) imports an op that this stamp vouches
  for straight from its `.so` and hands it to DeepSpeed's loaded-ops cache: no ninja run, no
  lock, no build.
* Otherwise (no stamp, a stale one) DeepSpeed JIT-builds as before, but a lock met on the way
  (`check_lock`, before DeepSpeed starts and again inside torch's wait) is reported in one
  line naming the file, its age and the processes holding it open (or that none does), then
  waited on for a bounded time (`MMPRETRAIN_BUILD_LOCK_WAIT` seconds, default 300: a cold build
  of the shm op takes ~3 min on 2 busy cores), then refused with an error saying what to
  delete. A lock that no process on this host holds open and that is older than
  `STALE_AFTER_S` is removed at once: its builder keeps the file open for the whole build, so
  nobody here is building, and no build (not even one on another host sharing the directory)
  runs that long.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Tuple

OPS = ("ShareMemCommBuilder",)  # what deepspeed.comm loads at init on this accelerator (if compatible)
STAMP = "mmpretrain-ops.json"
LOCK_WAIT_ENV = "MMPRETRAIN_BUILD_LOCK_WAIT"
DEFAULT_LOCK_WAIT_S = 300.0
STALE_AFTER_S = 600.0


class BuildLockError(RuntimeError):
    """A DeepSpeed/torch extension build lock stayed in place past the bounded wait."""


def _say(msg: str) -> None:
    print(f"mmpretrain: {msg}", file=sys.stderr, flush=True)


def default_dir() -> Path:
    """The per-environment extensions directory: `<sys.prefix>/torch_extensions` (the venv)."""
    return Path(sys.prefix) / "torch_extensions"


def _torch_default_dir() -> Path:
    """Where torch builds with TORCH_EXTENSIONS_DIR unset (torch.utils.cpp_extension._get_build_directory)."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        acc = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        acc = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        acc = "cpu"
    py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{py}_{acc}"


def extensions_dir() -> Path:
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or default_dir())


def use_default_dir() -> Path:
    """Point TORCH_EXTENSIONS_DIR at this environment's directory unless the caller chose one (or,
    for an environment we cannot write that holds no build, at torch's own default)."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        d = default_dir()
        usable = (d / STAMP).exists() or os.access(d if d.exists() else d.parent, os.W_OK)
        os.environ["TORCH_EXTENSIONS_DIR"] = str(d if usable else _torch_default_dir())
    return extensions_dir()


# ---- the lock -------------------------------------------------------------------------------


def lock_wait_s() -> float:
    raw = os.environ.get(LOCK_WAIT_ENV)
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_LOCK_WAIT_S
    except ValueError:
        return DEFAULT_LOCK_WAIT_S


def holders(lock: Path) -> List[Tuple[int, str]]:
    """(pid, command line) of every process on this host we can inspect that has `lock` open."""
    target = os.path.realpath(lock)
    found = []
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not pid.isdigit():
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # gone, or another user's
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") == target:
                    break
            except OSError:
                continue
        else:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmd = "?"
        found.append((int(pid), cmd[:200]))
    return found


def _describe(lock: Path) -> Tuple[float, List[Tuple[int, str]], str]:
    age = time.time() - lock.stat().st_mtime
    who = holders(lock)
    if who:
        desc = "held open by " + "; ".join(f"pid {p} ({c})" for p, c in who)
    else:
        desc = ("no process on this host has it open: a build that was killed left it, unless one "
                "runs on another host sharing this directory")
    return age, who, desc


def check_lock(lock: Path, wait_s: Optional[float] = None, poll_s: float = 0.2) -> None:
    """Return once `lock` is gone (or removed as provably stale); raise BuildLockError naming it
    after `wait_s` seconds (default: MMPRETRAIN_BUILD_LOCK_WAIT or 300)."""
    lock = Path(lock)
    wait_s = lock_wait_s() if wait_s is None else wait_s
    try:
        age, who, desc = _describe(lock)
    except FileNotFoundError:
        return
    if not who and age > STALE_AFTER_S:
        try:
            lock.unlink()
            _say(f"removed stale build lock {lock} (age {age:.0f} s; {desc})")
        except FileNotFoundError:
            pass
        return
    _say(f"build lock {lock} exists (age {age:.0f} s; {desc}); waiting up to {wait_s:.0f} s for it "
         f"(set {LOCK_WAIT_ENV} to change)")
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(poll_s)
        if not lock.exists():
            return
    try:
        age, who, desc = _describe(lock)
    except FileNotFoundError:
        return
    raise BuildLockError(
        f"build lock {lock} still exists after waiting {wait_s:.0f} s (age {age:.0f} s; {desc}). "
        f"If no build is running, delete it (rm {lock}) and start again; `make install` builds the "
        "ops once per environment so that starts never take this lock")


def _install_bounded_baton() -> None:
    """torch's FileBaton.wait() spins forever on a lock left by a killed build; make the wait that
    DeepSpeed's JIT load does (after our own check) report and give up the same way."""
    import torch.utils.cpp_extension as cpp
    from torch.utils.file_baton import FileBaton

    if getattr(cpp.FileBaton, "_mmpretrain_bounded", False):
        return

    class BoundedBaton(FileBaton):
        _mmpretrain_bounded = True

        def wait(self) -> None:  # type: ignore[override]
            check_lock(Path(self.lock_file_path))

    cpp.FileBaton = BoundedBaton


# ---- the stamp --------------------------------------------------------------------------------


def _builders():
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    out = []
    for cls in OPS:
        b = get_accelerator().create_op_builder(cls)
        if b is not None and deepspeed.ops.__compatible_ops__.get(b.NAME, False):
            out.append(b)
    return out


def _file_hash(paths: List[str]) -> Dict[str, str]:
    out = {}
    for p in paths:
        files = [os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs] if os.path.isdir(p) else [p]
        for f in sorted(files):
            with open(f, "rb") as fh:
                out[f] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _op_key(b) -> dict:
    # the sources' directories (their headers sit beside them) and the include paths that exist
    dirs = {os.path.dirname(b.deepspeed_src_path(s)) for s in b.strip_empty_entries(b.sources())}
    dirs |= {p for p in map(b.deepspeed_src_path, b.strip_empty_entries(b.include_paths())) if os.path.isdir(p)}
    return {"so": f"{b.NAME}.so", "sources": _file_hash(sorted(dirs)),
            "cxx_args": b.strip_empty_entries(b.cxx_args()), "ldflags": b.strip_empty_entries(b.extra_ldflags())}


def _env_key() -> dict:
    return {"python": sys.version, "torch": metadata.version("torch"), "deepspeed": metadata.version("deepspeed")}


def read_stamp(root: Optional[Path] = None) -> Optional[dict]:
    try:
        return json.loads((Path(root or extensions_dir()) / STAMP).read_text())
    except (OSError, ValueError):
        return None


def built(root: Optional[Path] = None) -> bool:
    """Whether `root` holds ops built for this environment (no DeepSpeed import: cheap enough for
    conftest). Checks versions, source hashes and that each .so is there."""
    root = Path(root or extensions_dir())
    stamp = read_stamp(root)
    if not stamp or stamp.get("env") != _env_key():
        return False
    for name, key in stamp.get("ops", {}).items():
        if not (root / name / key["so"]).is_file():
            return False
        try:
            if _file_hash(list(key["sources"])) != key["sources"]:
                return False
        except OSError:
            return False
    return True


def _preload(b, root: Path, stamp: Optional[dict]) -> bool:
    """Import a stamped op from its .so into DeepSpeed's cache of loaded ops; False if we can't."""
    import importlib.util

    from deepspeed.ops.op_builder.builder import OpBuilder

    if b.NAME in OpBuilder._loaded_ops:
        return True
    key = (stamp or {}).get("ops", {}).get(b.NAME)
    if not stamp or stamp.get("env") != _env_key() or key != _op_key(b):
        return False
    d = root / b.NAME
    if not (d / key["so"]).is_file():
        return False
    try:
        spec = importlib.util.spec_from_file_location(b.NAME, d / key["so"])  # what torch's JIT load does
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        OpBuilder._loaded_ops[b.NAME] = mod
    except Exception as e:  # a damaged .so: let DeepSpeed rebuild it
        _say(f"could not load the prebuilt op {d / key['so']} ({e}); DeepSpeed will rebuild it")
        return False
    return True


def ensure_ops() -> None:
    """Before DeepSpeed loads its ops (top of `distributed.init()`): take the stamped build of this
    environment when there is one; otherwise make any build lock on DeepSpeed's path bounded."""
    from deepspeed.git_version_info import installed_ops

    root = use_default_dir()
    stamp = read_stamp(root)
    for b in _builders():
        if installed_ops.get(b.NAME, False) or _preload(b, root, stamp):
            continue
        _install_bounded_baton()
        check_lock(root / b.NAME / "lock")


def build(root: Optional[Path] = None) -> List[str]:
    """Build every op DeepSpeed loads at init into `root` and stamp it (what `make install` runs)."""
    if root is not None:
        os.environ["TORCH_EXTENSIONS_DIR"] = str(root)
    root = use_default_dir()
    from deepspeed.git_version_info import installed_ops

    stamp = read_stamp(root)
    builders = _builders()
    if stamp and all(installed_ops.get(b.NAME, False) or stamp.get("ops", {}).get(b.NAME) == _op_key(b)
                     for b in builders) and built(root):
        return []
    (root / STAMP).unlink(missing_ok=True)
    _install_bounded_baton()
    ops, done = {}, []
    for b in builders:
        if installed_ops.get(b.NAME, False):
            continue
        t0 = time.time()
        check_lock(root / b.NAME / "lock")
        b.jit_load(verbose=False)
        ops[b.NAME] = _op_key(b)
        done.append(b.NAME)
        _say(f"built {b.NAME} into {root / b.NAME} in {time.time() - t0:.0f} s")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{STAMP}.{os.getpid()}"
    tmp.write_text(json.dumps({"env": _env_key(), "ops": ops}, indent=1))
    os.replace(tmp, root / STAMP)
    return done


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmpretrain.extensions", description=__doc__.splitlines()[0])
    p.add_argument("--build", action="store_true", help="build (once) the ops DeepSpeed loads at start-up")
    p.add_argument("--dir", type=Path, help="extensions directory (default: $TORCH_EXTENSIONS_DIR or <venv>/torch_extensions)")
    args = p.parse_args(argv)
    if args.build:
        try:
            done = build(args.dir)
        except BuildLockError as e:
            _say(f"error: {e}")
            return 1
        print(f"ops in {extensions_dir()}: " + (f"built {', '.join(done)}" if done else "up to date"))
        return 0
    root = args.dir or extensions_dir()
    print(f"{root}: {'built' if built(root) else 'not built'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
