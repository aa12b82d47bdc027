"""Which raw samples a (rank, worker) slot reads, and in what order: seeded shard order,
sample-level split across slots, and a windowed shuffle whose state is a few integers."""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from .shards import RawSample, read_shard

Piece = Tuple[str, int, Optional[int]]  # (url, first sample, count or None = to the end)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


class EpochLayout:
    """Epoch mode. Each epoch the shards are put in a seeded order (the same on every rank)
    and their samples concatenated (N in all). Slot s of S reads positions
    [s*M, (s+1)*M) mod N with M = ceil(N/S): every slot reads exactly M samples per epoch
    (so every rank gets the same number of batches), samples are disjoint and complete when
    S divides N, and otherwise S*M-N samples at the start of the order are read twice.
    With `exact=True` (eval) slots get floor splits instead: once each, counts differ by 1."""

    finite = True

    def __init__(self, urls: List[str], sizes: List[int], seed: int, source: int, slot: int,
                 n_slots: int, shuffle: bool, exact: bool = False):
        self.urls, self.sizes = urls, [int(s) for s in sizes]
        self.seed, self.source, self.slot, self.n_slots = seed, source, slot, n_slots
        self.shuffle, self.exact = shuffle, exact
        self.total = sum(self.sizes)
        self._cache: Dict[int, List[Piece]] = {}

    def samples_per_epoch(self) -> int:
        if self.exact:
            return (self.slot + 1) * self.total // self.n_slots - self.slot * self.total // self.n_slots
        return -(-self.total // self.n_slots)

    def pieces(self, epoch: int) -> List[Piece]:
        if epoch not in self._cache:
            self._cache = {epoch: self._pieces(epoch)}
        return self._cache[epoch]

    def _pieces(self, epoch: int) -> List[Piece]:
        order = list(range(len(self.urls)))
        if self.shuffle:
            order = [int(i) for i in _rng(self.seed, self.source, epoch, 17).permutation(len(order))]
        cum = [0]
        for i in order:
            cum.append(cum[-1] + self.sizes[i])
        n, remaining = self.total, self.samples_per_epoch()
        pos = (self.slot * n // self.n_slots) if self.exact else (self.slot * remaining) % max(n, 1)
        out: List[Piece] = []
        while remaining > 0:
            j = bisect.bisect_right(cum, pos) - 1
            take = min(remaining, cum[j + 1] - pos)
            out.append((self.urls[order[j]], pos - cum[j], take))
            remaining -= take
            pos = (pos + take) % n
        return out


class ResampledLayout:
    """Resampled mode: slot s draws shards with replacement from rng(seed, source, slot, k)
    and reads each whole; one endless 'epoch 0'."""

    finite = False

    def __init__(self, urls: List[str], sizes: List[Optional[int]], seed: int, source: int, slot: int):
        self.urls, self.sizes, self.seed, self.source, self.slot = urls, sizes, seed, source, slot

    def pieces(self, epoch: int) -> "ResampledLayout":
        return self

    def __getitem__(self, k: int) -> Piece:
        j = int(_rng(self.seed, self.source, self.slot, k, 29).integers(len(self.urls)))
        return self.urls[j], 0, self.sizes[j]

    def __len__(self) -> int:
        return 1 << 62


@dataclass
class StreamItem:
    raw: RawSample
    epoch: int
    aug_seed: Tuple[int, ...]  # seeds this sample's random crop/flip: same on resume


class WindowedStream:
    """Reads a slot's sample sequence in windows of `window` raw samples and emits each window
    in a seeded permutation. State = window start (epoch, piece, offset), window index and
    how many of its samples were emitted: resuming re-reads at most one window of raw bytes
    (plus tar headers inside one shard) and decodes nothing that was already consumed."""

    def __init__(self, layout, window: int, seed: int, source: int, slot: int, loop: bool = True):
        self.layout, self.window = layout, max(1, int(window))
        self.seed, self.source, self.slot, self.loop = seed, source, slot, loop
        self.epoch = self.piece = self.offset = self.win = self.consumed = 0
        self._buf: Optional[List[RawSample]] = None
        self._perm: Optional[np.ndarray] = None
        self._reader: Optional[Iterator[Tuple[int, int, RawSample]]] = None
        self._reader_at: Optional[Tuple[int, int, int]] = None  # where _reader resumes
        self._next_start: Tuple[int, int] = (0, 0)
        self._epoch_done = False

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "piece": self.piece, "offset": self.offset,
                "window": self.win, "consumed": self.consumed}

    def load_state_dict(self, d: Dict[str, int]) -> None:
        self.epoch, self.piece, self.offset = int(d["epoch"]), int(d["piece"]), int(d["offset"])
        self.win, self.consumed = int(d["window"]), int(d["consumed"])
        self._buf = self._reader = self._reader_at = None

    def __iter__(self) -> "WindowedStream":
        return self

    def __next__(self) -> StreamItem:
        if self._buf is None:
            self._fill()
        assert self._buf is not None and self._perm is not None
        idx = int(self._perm[self.consumed])
        item = StreamItem(self._buf[idx], self.epoch, (self.seed, self.source, self.slot, self.epoch, self.win, idx))
        self.consumed += 1
        if self.consumed == len(self._buf):
            self._buf, self.consumed, self.win = None, 0, self.win + 1
            self.piece, self.offset = self._next_start
            if self._epoch_done:
                self.epoch, self.piece, self.offset, self.win = self.epoch + 1, 0, 0, 0
        return item

    def _fill(self) -> None:
        while True:
            if not self.loop and self.epoch > 0:
                raise StopIteration
            if self._reader is None or self._reader_at != (self.epoch, self.piece, self.offset):
                self._reader = self._read_from(self.epoch, self.piece, self.offset)
            buf: List[RawSample] = []
            piece, offset, done = self.piece, self.offset, True
            for piece, offset, raw in self._reader:
                buf.append(raw)
                offset += 1
                if len(buf) == self.window:
                    done = self._at_end(piece, offset)  # window may end exactly at the epoch's end
                    break
            self._next_start, self._epoch_done = (piece, offset), done
            self._reader_at = None if done else (self.epoch, piece, offset)
            if buf:
                break
            # nothing left in this epoch from here: go to the next one
            self.epoch, self.piece, self.offset, self.win, self._reader = self.epoch + 1, 0, 0, 0, None
        self._buf = buf
        n = len(buf)
        shuffle = self.window > 1
        self._perm = _rng(self.seed, self.source, self.slot, self.epoch, self.win, 31).permutation(n) if shuffle else np.arange(n)

    def _at_end(self, piece: int, offset: int) -> bool:
        if not self.layout.finite:
            return False
        pieces = self.layout.pieces(self.epoch)
        _, _, count = pieces[piece]
        return piece == len(pieces) - 1 and count is not None and offset >= count

    def _read_from(self, epoch: int, piece: int, offset: int) -> Iterator[Tuple[int, int, RawSample]]:
        pieces = self.layout.pieces(epoch)
        k = piece
        while k < len(pieces):
            url, start, count = pieces[k]
            left = None if count is None else count - offset
            if left is None or left > 0:
                off = offset
                for raw in read_shard(url, start + offset, left):
                    yield k, off, raw
                    off += 1
            k, offset = k + 1, 0
