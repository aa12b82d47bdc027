"""Named hook points for tests: fault injection (kill a rank mid-save, poison a batch) and probes
(count shard I/O). A point does nothing unless a hook was registered for it in this process by
an explicit call (`register` / `hooked`), e.g. from a test or a test's `run.plugins` entry; no
environment variable or config value turns one on. Each point is named in POINTS with the
keyword arguments its hooks receive."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List

Hook = Callable[..., None]

POINTS: Dict[str, str] = {
    "checkpoint.rank_files_written": "step, rank: this rank's checkpoint files are written, the save is not committed",
    "checkpoint.async_write": "step, rank, path: train.async_save's background writer is about to write one file",
    "train.startup": "rank: start-up, after the process group and the run lock, before the model is built",
    "train.step_start": "step (the step about to run), rank: the top of a training step",
    "train.teardown": "rank: after the final save and the trainer's close, before the exit code is returned",
    "train.batch": "step (the step it feeds), batch (on the device; hooks may change it in place), rank",
    "shards.open": "url: a shard is opened for reading",
    "shards.bytes_read": "url, n: n bytes read from a shard",
    "shards.sample_read": "url: one sample of a shard is yielded by read_shard",
}

_HOOKS: Dict[str, List[Hook]] = {}


def point(name: str, **kwargs) -> None:
    """Call the hooks registered for `name` (none by default: then nothing happens)."""
    hooks = _HOOKS.get(name)
    if hooks:
        for fn in list(hooks):
            fn(**kwargs)


def active(name: str) -> bool:
    """Whether a hook is registered for `name` (lets a caller skip preparing a probe's data)."""
    return bool(_HOOKS.get(name))


def register(name: str, fn: Hook) -> Callable[[], None]:
    """Add a hook for point `name`; returns a function that removes it."""
    if name not in POINTS:
        raise KeyError(f"no fault point '{name}'; known points: {sorted(POINTS)}")
    _HOOKS.setdefault(name, []).append(fn)

    def remove() -> None:
        hooks = _HOOKS.get(name, [])
        if fn in hooks:
            hooks.remove(fn)
        if not hooks:
            _HOOKS.pop(name, None)

    return remove


@contextmanager
def hooked(name: str, fn: Hook) -> Iterator[None]:
    """`with faults.hooked(name, fn): ...` - the hook is active only inside the block."""
    remove = register(name, fn)
    try:
        yield
    finally:
        remove()


def clear() -> None:
    """Remove every hook of this process."""
    _HOOKS.clear()
