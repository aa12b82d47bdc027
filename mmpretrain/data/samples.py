"""Raw tar sample -> training example: map members to modalities, filter and tokenize
(cheap, before decoding), then decode media; and collate examples into a batch."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
from torch.utils.data import get_worker_info

# the registry imports data.decode; samples reads it at call time only (M.Batch, M.get)
from mmpretrain import modalities as M

from ..config import DataConfig, SourceConfig
from .decode import DecodeError
from .shards import RawSample
from .tokenizer import Tokenizer


@dataclass
class SourceSpec:
    """Which tar members feed which modality for one source."""

    name: str
    index: int
    media_keys: Dict[str, List[str]]  # media modality -> extensions, first match wins
    text_keys: List[Tuple[str, Optional[str]]]  # (extension, json field or None)
    required: Set[str] = field(default_factory=set)


def _exts(s: str) -> List[str]:
    return [e.strip().lower().lstrip(".") for e in (s or "").split(";") if e.strip()]


def member_keys(src: SourceConfig, m: M.Modality) -> str:
    """A source's member extensions for `m`: its `<name>_keys` config key where the schema has
    one, else the modality's registered default."""
    return getattr(src, f"{m.name}_keys", None) or m.member_keys


def parse_source(src: SourceConfig, index: int) -> SourceSpec:
    """SourceConfig -> SourceSpec; the key strings are `;`-separated extension lists."""
    text = []
    for e in _exts(member_keys(src, M.get(M.TEXT))):
        ext, _, fld = e.partition(":")
        text.append((ext, fld or None))
    required = set(_exts(getattr(src, "required", "")))
    bad = required - set(M.names())
    if bad:
        raise ValueError(f"source '{src.name}': required modalities {sorted(bad)} not in {M.names()}")
    media = {m.name: _exts(member_keys(src, m)) for m in M.media()}
    return SourceSpec(src.name, index, media, text, required)


@dataclass
class Prepared:
    """A sample after filtering and tokenization, before any media decoding."""

    key: str
    source: str
    url: str
    media: Dict[str, bytes]  # present media modalities only
    text: Optional[List[int]]
    captions: Dict[str, Optional[List[int]]]  # captioned modality -> token ids
    label: int
    truncated: bool = False  # a caption (any option of a list) had more tokens than data.text_max_len holds: cut
    group: int = -1  # hashed json group value (see _group); -1 = none
    # json fields holding a list of captions: every option tokenised (text and captions above hold the
    # first, the eval choice); training draws one per sample and epoch in decode
    text_options: List[List[int]] = field(default_factory=list)
    caption_options: Dict[str, List[List[int]]] = field(default_factory=dict)  # modalities with their own field


@dataclass
class Example:
    key: str
    source: str
    epoch: int
    media: Dict[str, np.ndarray]  # present media modalities only
    text: Optional[List[int]]
    captions: Dict[str, Optional[List[int]]]
    label: int
    group: int = -1


def _utf8(b: bytes) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DecodeError("text_decode", f"not UTF-8: {e}") from None


# the sub-seed of the caption draw (media modalities use theirs, modalities.Modality.aug_stream: small numbers)
CAPTION_STREAM = 1000


class SampleProcessor:
    """Turns raw samples into examples with the configured train or eval transforms."""

    def __init__(self, data_cfg: DataConfig, tokenizer: Tokenizer, train: bool,
                 active: Optional[Sequence[str]] = None, group_key: str = "group"):
        """active: the modalities with a tower (None: all); the others' members count for
        `required` but are never decoded. group_key: the json field read as the sample's group
        (eval.probe_group_key: the linear probe's eval split keeps a group on one side)."""
        self.cfg, self.tok, self.train, self.group_key = data_cfg, tokenizer, train, group_key
        self.max_len = int(data_cfg.text_max_len)
        self.active = set(active) if active is not None else set(M.names())

    def prepare(self, raw: RawSample, spec: SourceSpec) -> Prepared:
        """Filter and tokenize; raises DecodeError(reason) for samples to skip."""
        if raw.error:
            raise DecodeError(raw.error, raw.detail)
        files = raw.files
        meta: Dict[str, Any] = {}
        if "json" in files:
            try:
                meta = json.loads(_utf8(files["json"]))
            except json.JSONDecodeError as e:
                raise DecodeError("text_decode", f"bad json: {e}") from None
            if not isinstance(meta, dict):
                raise DecodeError("text_decode", "json member is not an object")
        caption: List[str] = []  # the options of the first text member that has any
        for ext, fld in spec.text_keys:
            if ext not in files:
                continue
            if fld is None:
                value: Any = _utf8(files[ext])
            else:
                value = meta.get(fld) if ext == "json" else _json_field(files[ext], fld)
            caption = _options(value)
            if caption:
                break
        media = {}
        for name, keys in spec.media_keys.items():
            found = next((files[e] for e in keys if e in files), None)
            if found is not None:
                media[name] = found
        present = {name: name in media for name in spec.media_keys} | {M.TEXT: bool(caption)}
        if not any(present.values()):
            raise DecodeError("empty", f"members {sorted(files)}")
        for mod in sorted(spec.required):
            if not present[mod]:
                raise DecodeError(f"missing_{mod}", f"members {sorted(files)}")
        media = {name: data for name, data in media.items() if name in self.active}  # no tower: not decoded
        options = [self._tok_cut(c) for c in caption]
        text = options[0][0] if options else None
        captions: Dict[str, Optional[List[int]]] = {}
        caption_options: Dict[str, List[List[int]]] = {}
        for m in M.captioned():
            own = [ids for ids in (self._tok(c) for c in _options(meta.get(f"caption_{m}"))) if ids]
            captions[m] = own[0] if own else text
            if own:
                caption_options[m] = own
        return Prepared(
            key=raw.key, source=spec.name, url=raw.url, media=media, text=text, captions=captions,
            label=_label(meta, files), truncated=any(cut for _, cut in options), group=_group(meta, self.group_key),
            text_options=[ids for ids, _ in options] if len(options) > 1 else [], caption_options=caption_options,
        )

    def _tok_cut(self, s: Any) -> Tuple[Optional[List[int]], bool]:
        """(BOS + ids + EOS cut to data.text_max_len, whether ids were cut)."""
        if not isinstance(s, str) or not s.strip():
            return None, False
        # with room for one more token: longer than max_len means the real encoding cuts (the
        # tokenizer's own truncation and special tokens decide; only a cut caption encodes twice)
        ids = self.tok.encode_with_specials(s.strip(), self.max_len + 1)
        if len(ids) <= self.max_len:
            return ids, False
        return self.tok.encode_with_specials(s.strip(), self.max_len), True

    def _tok(self, s: Any) -> Optional[List[int]]:
        return self._tok_cut(s)[0]

    def decode(self, p: Prepared, epoch: int, aug_seed: Tuple[int, ...]) -> Example:
        """Decode media; training augmentation is seeded by the sample's stream position."""
        augment = self.train and self.cfg.train_augment
        arrays = {}
        for name, data in p.media.items():
            m = M.get(name)
            rng = np.random.default_rng([*aug_seed, m.aug_stream]) if augment else None
            arrays[name] = m.decode(data, self.cfg, rng)
        text, captions = p.text, p.captions
        if augment and self.cfg.caption_sampling and (
                p.text_options or any(len(o) > 1 for o in p.caption_options.values())):
            # one option per sample and epoch, from the sample's position like the media: resume-exact
            rng = np.random.default_rng([*aug_seed, CAPTION_STREAM])
            if p.text_options:
                text = p.text_options[int(rng.integers(len(p.text_options)))]
            captions = {}
            for m in M.captioned():  # a modality without its own field keeps the drawn text
                own = p.caption_options.get(m)
                captions[m] = own[int(rng.integers(len(own)))] if own and len(own) > 1 else own[0] if own else text
        return Example(p.key, p.source, epoch, arrays, text, captions, p.label, group=p.group)


def _options(value: Any) -> List[str]:
    """A caption field's options: a non-empty string, or the non-empty strings of a list."""
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, list):
        return [v.strip() for v in value if isinstance(v, str) and v.strip()]
    return []


def _json_field(b: bytes, fld: str) -> Any:
    try:
        d = json.loads(_utf8(b))
    except json.JSONDecodeError as e:
        raise DecodeError("text_decode", f"bad json: {e}") from None
    return d.get(fld) if isinstance(d, dict) else None


def _label(meta: Dict[str, Any], files: Dict[str, bytes]) -> int:
    v = meta.get("label")
    if isinstance(v, bool) or not isinstance(v, int):
        v = None
    if v is None and "cls" in files:
        try:
            v = int(files["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            v = None
    return -1 if v is None else int(v)


def _group(meta: Dict[str, Any], key: str) -> int:
    """The json field `key` as a non-negative int64 (a stable hash of its text, so strings and ids
    both work and every process agrees), or -1 when absent / null / empty."""
    v = meta.get(key)
    if v is None or v == "":
        return -1
    text = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") & (2 ** 63 - 1)


def _batch_buffer(shape: Tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised batch tensor (every row is written). In a DataLoader worker it is made in
    shared memory, as torch's default_collate does: sending it to the trainer then passes a handle
    instead of copying the batch into shared memory first."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    out = torch.tensor([], dtype=dtype)
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * out.element_size())
    return out.set_(storage, 0, shape)


def _token_matrix(seqs: List[Optional[List[int]]], L: int, pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    lens = torch.zeros(len(seqs), dtype=torch.long)
    for i, seq in enumerate(seqs):
        if seq:
            seq = seq[:L]
            ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            lens[i] = len(seq)
    return ids, lens


def collate(examples: List[Example], data_cfg: DataConfig, pad_id: int,
            active: Optional[Sequence[str]] = None) -> M.Batch:
    """Examples -> the Batch every later stage reads (zeros + False mask where absent). A media
    modality outside `active` (no tower) has a False mask and no input tensor."""
    b, L = len(examples), int(data_cfg.text_max_len)
    inputs: Dict[str, torch.Tensor] = {}
    masks: Dict[str, torch.Tensor] = {}
    for m in M.media():
        if active is not None and m.name not in active:
            masks[m.name] = torch.zeros(b, dtype=torch.bool)
            continue
        x = _batch_buffer((b, *m.sample_shape(data_cfg)), torch.uint8 if m.level_affine is not None else torch.float32)
        mask = torch.zeros(b, dtype=torch.bool)
        for i, ex in enumerate(examples):
            if m.name in ex.media:
                x[i] = torch.from_numpy(ex.media[m.name])
                mask[i] = True
            else:
                x[i] = 0
        inputs[m.name], masks[m.name] = x, mask
    inputs[M.TEXT], text_len = _token_matrix([ex.text for ex in examples], L, pad_id)
    masks[M.TEXT] = text_len > 0
    captions, caption_len = {}, {}
    for m in M.captioned():
        captions[m], caption_len[m] = _token_matrix([ex.captions.get(m) for ex in examples], L, pad_id)
    return M.Batch(
        keys=[ex.key for ex in examples], sources=[ex.source for ex in examples],
        epochs=[ex.epoch for ex in examples], inputs=inputs, masks=masks, text_len=text_len,
        captions=captions, caption_len=caption_len,
        labels=torch.tensor([ex.label for ex in examples], dtype=torch.long),
        groups=torch.tensor([ex.group for ex in examples], dtype=torch.long),
    )
