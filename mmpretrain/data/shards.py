"""Shard lists and raw tar reading: url expansion, per-shard sample counts, and a
reader that starts at any sample index without reading the skipped samples' data."""
from __future__ import annotations

import glob
import json
import os
import tarfile
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, Iterator, List, Optional, Tuple

import braceexpand
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from mmpretrain import faults


class ShardError(RuntimeError):
    """A shard cannot be listed or counted."""


def is_pipe(url: str) -> bool:
    return url.startswith("pipe:")


def local_path(url: str) -> Optional[str]:
    """Filesystem path of a url, or None for pipes and remote urls."""
    if is_pipe(url) or "://" in url and not url.startswith("file://"):
        return None
    return url[len("file://"):] if url.startswith("file://") else url


def expand_urls(urls: str) -> List[str]:
    """`a::b` groups, brace expansion, local directories (their *.tar) and globs."""
    out: List[str] = []
    for group in urls.split("::"):
        group = group.strip()
        if not group:
            continue
        for url in braceexpand.braceexpand(group):
            path = local_path(url)
            if path is not None and os.path.isdir(path):
                out.extend(sorted(glob.glob(os.path.join(path, "*.tar"))))
            elif path is not None and any(c in path for c in "*?[") and not os.path.exists(path):
                out.extend(sorted(glob.glob(path)))
            else:
                out.append(url)
    return out


def shard_name(url: str) -> str:
    """Key under which sizes.json stores a shard: the basename of the file."""
    last = url.split()[-1] if is_pipe(url) else url
    return os.path.basename(last.rstrip("/"))


def _load_sizes_file(path: str) -> Dict[str, int]:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ShardError(f"sizes file '{path}' must hold a json object shard -> count")
    return {str(k): int(v) for k, v in data.items()}


def shard_sizes(urls: List[str], sizes_file: Optional[str] = None, required: bool = True) -> List[Optional[int]]:
    """Sample count per shard: from `sizes_file`, a sizes.json next to a local shard, or a
    header-only scan of local shards. Pipes need a sizes file when `required`."""
    tables: Dict[str, Dict[str, int]] = {}
    if sizes_file:
        tables[sizes_file] = _load_sizes_file(sizes_file)
    out: List[Optional[int]] = []
    for url in urls:
        found: Optional[int] = None
        path = local_path(url)
        candidates = [sizes_file] if sizes_file else []
        if path is not None:
            candidates.append(os.path.join(os.path.dirname(os.path.abspath(path)), "sizes.json"))
        for cand in candidates:
            if cand not in tables:
                tables[cand] = _load_sizes_file(cand) if os.path.isfile(cand) else {}
            table = tables[cand]
            for k in (url, shard_name(url)):
                if k in table:
                    found = table[k]
                    break
            if found is not None:
                break
        if found is None and path is not None:
            found = count_samples(path)
        if found is None and required:
            raise ShardError(
                f"no sample count for shard '{url}': give the source a `sizes` json "
                f"(shard name -> count; tools/inspect_shards.py --write-sizes makes one)"
            )
        out.append(found)
    return out


@lru_cache(maxsize=4096)
def count_samples(path: str) -> int:
    """Number of samples (distinct consecutive keys) in a local tar; reads headers only."""
    if not os.path.isfile(path):
        raise ShardError(f"shard '{path}' does not exist")
    n, last = 0, None
    try:
        with tarfile.open(path, mode="r:") as tf:
            for ti in _iter_members(tf):
                key, _ = _split(ti.name)
                if key is not None and key != last:
                    n, last = n + 1, key
    except (tarfile.TarError, OSError, EOFError):
        pass  # truncated: count what is readable; the reader reports the rest
    return n


class _CountingFile:
    """File wrapper that reports bytes read to the `shards.bytes_read` probe (resume-cost tests);
    used only while a hook is registered there."""

    def __init__(self, f, url: str):
        self.f, self.url = f, url

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        faults.point("shards.bytes_read", url=self.url, n=len(b))
        return b

    def __getattr__(self, name):
        return getattr(self.f, name)


def _split(name: str) -> Tuple[Optional[str], Optional[str]]:
    if "/" not in name and name.startswith("__") and name.endswith("__"):
        return None, None
    key, ext = base_plus_ext(name)
    return key, (ext.lower() if ext else ext)


def _iter_members(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while True:
        ti = tf.next()
        if ti is None:
            return
        tf.members = []  # keep memory flat on big shards
        if ti.isreg():
            yield ti


@dataclass
class RawSample:
    """One sample's undecoded members, or a placeholder for a sample that could not be read."""

    key: str
    url: str
    files: Dict[str, bytes] = field(default_factory=dict)
    error: Optional[str] = None  # skip reason when the tar itself failed
    detail: str = ""


def read_shard(url: str, start: int = 0, count: Optional[int] = None) -> Iterator[RawSample]:
    """Yield samples [start, start+count) of a shard. Local files seek over skipped samples'
    data (headers only); pipes read through them. When the shard is short or broken, the
    missing positions come out as RawSample(error='tar_error') so positions stay exact."""
    emitted = 0
    detail = ""
    gen = _read(url, start)
    try:
        for sample in gen:
            if count is not None and emitted >= count:
                break
            faults.point("shards.sample_read", url=url)
            emitted += 1
            yield sample
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        detail = f"{type(e).__name__}: {e}"
    finally:
        try:
            gen.close()
        except Exception:  # a pipe closed early may complain about its exit status
            pass
    if count is not None and emitted < count:
        detail = detail or f"shard has fewer samples than its size says ({start + emitted} < {start + count})"
        for i in range(emitted, count):
            yield RawSample(key=f"{shard_name(url)}#{start + i}", url=url, error="tar_error", detail=detail)


def _read(url: str, start: int) -> Iterator[RawSample]:
    faults.point("shards.open", url=url)
    path = local_path(url)
    raw = open(path, "rb") if path is not None else gopen(url, "rb")
    try:
        f = _CountingFile(raw, url) if faults.active("shards.bytes_read") else raw
        # seekable local file: "r:" skips data of members we do not extract
        tf = tarfile.open(fileobj=f, mode="r:" if path is not None else "r|")
        index, cur = -1, None
        for ti in _iter_members(tf):
            key, ext = _split(ti.name)
            if key is None:
                continue
            if cur is None or key != cur.key:
                if cur is not None and index >= start:
                    yield cur
                index += 1
                cur = RawSample(key=key, url=url)
            if index < start:
                continue
            if ext in cur.files:
                raise ValueError(f"duplicate member '{ti.name}' in '{url}'")
            fobj = tf.extractfile(ti)
            data = fobj.read() if fobj is not None else b""
            if len(data) != ti.size:
                raise tarfile.ReadError(f"unexpected end of data in member '{ti.name}'")
            cur.files[ext] = data
        if cur is not None and index >= start:
            yield cur
    finally:
        raw.close()
