"""Shard lists and raw tar reading: url expansion, per-shard sample counts, and a
reader that starts at any sample index without reading the skipped samples' data."""
from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, Iterator, List, Optional, Tuple

import braceexpand

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
    """Number of sample positions read_shard yields for a local tar (reads headers only):
    distinct consecutive keys, plus one for damage after the last complete member (a truncated
    or garbled header, no end-of-archive block), and 1 for a file that is not a tar at all, so
    that the damage is met and counted by the reader instead of silently left out."""
    if not os.path.isfile(path):
        raise ShardError(f"shard '{path}' does not exist")
    n, last = 0, None
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for ti in _iter_members(tf):
                key, _ = _split(ti.name)
                if key is not None and key != last:
                    n, last = n + 1, key
            _check_end(tf, f, path)
    except tarfile.ReadError as e:
        if n == 0 and shard_problem(path):
            return 1  # one position: the reader yields it as not_a_tar
        if "unexpected end of data" not in str(e):  # damage at a header: one more position
            n += 1
    except (tarfile.TarError, OSError, EOFError):
        n += 1
    return n


_GZIP, _ZSTD, _BZ2, _XZ = b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"BZh", b"\xfd7zXZ\x00"


def shard_problem(path: str) -> Optional[str]:
    """Why a local shard cannot be read as an uncompressed tar ('does not exist', 'is empty
    (0 bytes)', 'is gzip-compressed ...', 'is not a tar file ...'), or None when it opens as one
    (damage further inside is the reader's to count). Cheap: reads the first header only."""
    if not os.path.exists(path):
        return "does not exist"
    if not os.path.isfile(path):
        return "is not a regular file"
    try:
        with open(path, "rb") as f:
            head = f.read(512)
            if not head:
                return "is empty (0 bytes)"
            for magic, kind in ((_GZIP, "gzip"), (_ZSTD, "zstd"), (_BZ2, "bzip2"), (_XZ, "xz")):
                if head.startswith(magic):
                    return f"is {kind}-compressed, not a plain tar file (decompress it, or read it through a pipe: url)"
            f.seek(0)
            with tarfile.open(fileobj=f, mode="r:") as tf:
                tf.next()
    except tarfile.ReadError as e:
        return f"is not a tar file ({e})"
    except OSError as e:
        return f"cannot be read ({e})"
    return None


def _check_end(tf: tarfile.TarFile, f, url: str) -> None:
    """After the last member of a seekable tar: the archive must go on with an end-of-archive
    (zero) block. tarfile treats a file cut at a header, or a garbled header, as a clean end."""
    f.seek(tf.offset)
    blk = f.read(tarfile.BLOCKSIZE)
    if len(blk) < tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"unexpected end of archive at byte {tf.offset} of '{url}' (truncated at a header)")
    if blk.count(0) != tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"invalid header at byte {tf.offset} of '{url}'")


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


# webdataset's key / extension split (tariterators.base_plus_ext, the same pattern; a test holds them
# equal): importing webdataset imports torch, and preflight counts shards before any torch is needed
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def _split(name: str) -> Tuple[Optional[str], Optional[str]]:
    if "/" not in name and name.startswith("__") and name.endswith("__"):
        return None, None
    match = _KEY_EXT.match(name)
    key, ext = (match.group(1), match.group(2)) if match else (None, None)
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


def _reason(e: BaseException, url: str, emitted: int) -> Tuple[str, str]:
    """Skip reason for a shard's damage: not_a_tar (fails before its first sample),
    tar_truncated (ends inside a member or a header) or tar_error."""
    detail = f"{type(e).__name__}: {e}"
    path = local_path(url)
    if emitted == 0 and isinstance(e, tarfile.ReadError) and path is not None:
        problem = shard_problem(path)
        if problem:
            return "not_a_tar", f"shard '{url}' {problem}"
    if isinstance(e, (tarfile.ReadError, EOFError)) and ("unexpected end" in str(e) or "truncated" in str(e)) \
            or isinstance(e, EOFError):
        return "tar_truncated", f"shard '{url}' is truncated: {detail}"
    return "tar_error", f"shard '{url}': {detail}"


def read_shard(url: str, start: int = 0, count: Optional[int] = None) -> Iterator[RawSample]:
    """Yield samples [start, start+count) of a shard. Local files seek over skipped samples'
    data (headers only); pipes read through them. Damage is never silent: a sample with a
    duplicated member comes out with error='duplicate_member' (the rest of the shard is read on);
    a shard that is not a tar, is cut, or is short comes out as error samples (not_a_tar,
    tar_truncated, tar_error) for its unreadable positions (one when `count` is None), so
    positions stay exact and the loader's `skipped` counts every lost sample."""
    emitted = 0
    reason, detail = "", ""
    gen = _read(url, start)
    try:
        for sample in gen:
            if count is not None and emitted >= count:
                break
            faults.point("shards.sample_read", url=url)
            emitted += 1
            yield sample
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        reason, detail = _reason(e, url, emitted + start)
    finally:
        try:
            gen.close()
        except Exception:  # a pipe closed early may complain about its exit status
            pass
    if count is not None and emitted < count:
        if not reason:
            reason = "tar_error"
            detail = f"shard '{url}' has fewer samples than its size says ({start + emitted} < {start + count})"
        for i in range(emitted, count):
            yield RawSample(key=f"{shard_name(url)}#{start + i}", url=url, error=reason, detail=detail)
    elif count is None and reason:
        yield RawSample(key=f"{shard_name(url)}#{start + emitted}", url=url, error=reason, detail=detail)


def _read(url: str, start: int) -> Iterator[RawSample]:
    faults.point("shards.open", url=url)
    path = local_path(url)
    if path is None:  # webdataset imports torch: only pipes and remote URLs pay for it, not a refusal's checks
        from webdataset.gopen import gopen
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
            if cur.error:
                continue  # a damaged sample: skip its other members' data
            if ext in cur.files:  # only this sample is lost; the rest of the shard is read on
                cur.files, cur.error = {}, "duplicate_member"
                cur.detail = f"duplicate member '{ti.name}' in shard '{url}'"
                continue
            fobj = tf.extractfile(ti)
            data = fobj.read() if fobj is not None else b""
            if len(data) != ti.size:
                raise tarfile.ReadError(f"unexpected end of data in member '{ti.name}' "
                                        f"({len(data)} of {ti.size} bytes)")
            cur.files[ext] = data
        if path is not None:
            try:
                _check_end(tf, raw, url)
            except tarfile.ReadError:
                if cur is not None and index >= start:
                    yield cur  # complete: the damage is after it, at the next position
                raise
        if cur is not None and index >= start:
            yield cur
    finally:
        raw.close()
