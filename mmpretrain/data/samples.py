"""Raw tar sample -> training example: map members to modalities, filter and tokenize
(cheap, before decoding), then decode media; and collate examples into a batch."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

import numpy as np
import torch

from .decode import DecodeError, decode_audio, decode_image
from .shards import RawSample

MODALITIES = ("image", "audio", "text")


@dataclass
class SourceSpec:
    """Which tar members feed which modality for one source."""

    name: str
    index: int
    image_keys: List[str]
    audio_keys: List[str]
    text_keys: List[Tuple[str, Optional[str]]]  # (extension, json field or None)
    required: Set[str] = field(default_factory=set)


def parse_source(src: Any, index: int) -> SourceSpec:
    """SourceConfig -> SourceSpec; the key strings are `;`-separated extension lists."""

    def exts(s: str) -> List[str]:
        return [e.strip().lower().lstrip(".") for e in (s or "").split(";") if e.strip()]

    text = []
    for e in exts(src.text_keys):
        ext, _, fld = e.partition(":")
        text.append((ext, fld or None))
    required = set(exts(getattr(src, "required", "")))
    bad = required - set(MODALITIES)
    if bad:
        raise ValueError(f"source '{src.name}': required modalities {sorted(bad)} not in {MODALITIES}")
    return SourceSpec(src.name, index, exts(src.image_keys), exts(src.audio_keys), text, required)


@dataclass
class Prepared:
    """A sample after filtering and tokenization, before any media decoding."""

    key: str
    source: str
    url: str
    image: Optional[bytes]
    audio: Optional[bytes]
    text: Optional[List[int]]
    caption_image: Optional[List[int]]
    caption_audio: Optional[List[int]]
    label: int


@dataclass
class Example:
    key: str
    source: str
    epoch: int
    image: Optional[np.ndarray]
    audio: Optional[np.ndarray]
    text: Optional[List[int]]
    caption_image: Optional[List[int]]
    caption_audio: Optional[List[int]]
    label: int


def _utf8(b: bytes) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DecodeError("text_decode", f"not UTF-8: {e}") from None


class SampleProcessor:
    """Turns raw samples into examples with the configured train or eval transforms."""

    def __init__(self, data_cfg: Any, tokenizer: Any, train: bool):
        self.cfg, self.tok, self.train = data_cfg, tokenizer, train
        self.max_len = int(data_cfg.text_max_len)

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
        caption: Optional[str] = None
        for ext, fld in spec.text_keys:
            if ext not in files:
                continue
            if fld is None:
                value: Any = _utf8(files[ext])
            else:
                value = meta.get(fld) if ext == "json" else _json_field(files[ext], fld)
            if isinstance(value, str) and value.strip():
                caption = value.strip()
                break
        image = next((files[e] for e in spec.image_keys if e in files), None)
        audio = next((files[e] for e in spec.audio_keys if e in files), None)
        present = {"image": image is not None, "audio": audio is not None, "text": caption is not None}
        if not any(present.values()):
            raise DecodeError("empty", f"members {sorted(files)}")
        for mod in sorted(spec.required):
            if not present[mod]:
                raise DecodeError(f"missing_{mod}", f"members {sorted(files)}")
        text = self._tok(caption)
        return Prepared(
            key=raw.key, source=spec.name, url=raw.url, image=image, audio=audio, text=text,
            caption_image=self._tok(meta.get("caption_image")) or text,
            caption_audio=self._tok(meta.get("caption_audio")) or text,
            label=_label(meta, files),
        )

    def _tok(self, s: Any) -> Optional[List[int]]:
        if not isinstance(s, str) or not s.strip():
            return None
        return self.tok.encode_with_specials(s.strip(), self.max_len)

    def decode(self, p: Prepared, epoch: int, aug_seed: Tuple[int, ...]) -> Example:
        """Decode media; training augmentation is seeded by the sample's stream position."""
        cfg = self.cfg
        image = audio = None
        if p.image is not None:
            rng = np.random.default_rng([*aug_seed, 1]) if self.train and cfg.train_augment else None
            image = decode_image(p.image, cfg.image_size, rng, max_pixels=cfg.max_image_pixels,
                                 min_scale=cfg.crop_min_scale, hflip=cfg.hflip)
        if p.audio is not None:
            rng = np.random.default_rng([*aug_seed, 2]) if self.train and cfg.train_augment else None
            audio = decode_audio(p.audio, cfg.audio.sample_rate, cfg.audio.clip_seconds, rng)
        return Example(p.key, p.source, epoch, image, audio, p.text, p.caption_image, p.caption_audio, p.label)


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


def collate(examples: List[Example], data_cfg: Any, pad_id: int) -> Dict[str, Any]:
    """Examples -> the batch dict the training loop reads (zeros + False mask where absent)."""
    b, s, L = len(examples), int(data_cfg.image_size), int(data_cfg.text_max_len)
    n = int(data_cfg.audio.sample_rate * data_cfg.audio.clip_seconds)
    image = torch.zeros(b, 3, s, s)
    audio = torch.zeros(b, n)
    image_mask = torch.zeros(b, dtype=torch.bool)
    audio_mask = torch.zeros(b, dtype=torch.bool)
    for i, ex in enumerate(examples):
        if ex.image is not None:
            image[i] = torch.from_numpy(ex.image)
            image_mask[i] = True
        if ex.audio is not None:
            audio[i] = torch.from_numpy(ex.audio)
            audio_mask[i] = True
    batch: Dict[str, Any] = {
        "key": [ex.key for ex in examples],
        "source": [ex.source for ex in examples],
        "epoch": [ex.epoch for ex in examples],
        "image": image, "image_mask": image_mask,
        "audio": audio, "audio_mask": audio_mask,
        "label": torch.tensor([ex.label for ex in examples], dtype=torch.long),
    }
    for name in ("text", "caption_image", "caption_audio"):
        ids = torch.full((b, L), pad_id, dtype=torch.long)
        lens = torch.zeros(b, dtype=torch.long)
        for i, ex in enumerate(examples):
            seq = getattr(ex, name)
            if seq:
                seq = seq[:L]
                ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                lens[i] = len(seq)
        batch[name] = ids
        batch[f"{name}_len"] = lens
        if name == "text":
            batch["text_mask"] = lens > 0
    return batch
