"""A tiny config and synthetic batches for model / loss / generation tests (no data files)."""
from __future__ import annotations

from typing import Dict, Sequence

import torch

from mmpretrain.config import Config, load_config
from mmpretrain.data.tokenizer import ByteTokenizer

TINY = [
    "data.image_size=16", "data.audio.sample_rate=4000", "data.audio.clip_seconds=0.25", "data.text_max_len=16",
    "model.embed_dim=16", "model.vision.width=16", "model.vision.depth=1", "model.vision.heads=2",
    "model.vision.patch_size=8", "model.audio.width=16", "model.audio.depth=1", "model.audio.heads=2",
    "model.audio.n_mels=16", "model.audio.n_fft=128", "model.audio.hop_length=64", "model.audio.patch_size=4",
    "model.text.width=16", "model.text.depth=1", "model.text.heads=2", "model.text.decoder_depth=1",
    "model.text.decoder_queries=4", "model.attention_backend=sdpa",
]


def tiny_cfg(*overrides: str) -> Config:
    return load_config(None, TINY + list(overrides))


def fake_batch(cfg: Config, n: int, seed: int = 0, drop: Sequence[str] = (),
               captions: Sequence[str] = ("a red circle", "a blue square", "a green cross")) -> Dict[str, torch.Tensor]:
    """n samples; `drop`: modalities absent in every odd sample. Captions cycle through `captions`;
    the audio caption is the image caption reversed word-wise (so the two differ)."""
    g = torch.Generator().manual_seed(seed)
    tok = ByteTokenizer()
    s = cfg.data.image_size
    ns = int(cfg.data.audio.sample_rate * cfg.data.audio.clip_seconds)
    L = cfg.data.text_max_len
    caps = [captions[(i + seed) % len(captions)] for i in range(n)]
    text, text_len = tok.encode_batch(caps, L)
    ci, ci_len = tok.encode_batch(caps, L)
    ca, ca_len = tok.encode_batch([" ".join(c.split()[::-1]) for c in caps], L)
    labels = torch.tensor([(i + seed) % len(captions) for i in range(n)])
    # class prototypes (fixed seed) + per-sample noise: the content predicts the caption
    pg = torch.Generator().manual_seed(1234)
    img_proto = torch.randn(len(captions), 3, s, s, generator=pg)
    aud_proto = 0.3 * torch.randn(len(captions), ns, generator=pg)
    b = {
        "image": img_proto[labels] + 0.3 * torch.randn(n, 3, s, s, generator=g),
        "audio": aud_proto[labels] + 0.05 * torch.randn(n, ns, generator=g),
        "text": text, "text_len": text_len, "caption_image": ci, "caption_image_len": ci_len,
        "caption_audio": ca, "caption_audio_len": ca_len,
        "label": labels,
    }
    for m in ("image", "audio", "text"):
        b[f"{m}_mask"] = torch.ones(n, dtype=torch.bool)
        if m in drop:
            b[f"{m}_mask"][1::2] = False
    for m in drop:  # absent content is zero / empty, as the collate function makes it
        if m == "text":
            for k in ("text", "caption_image", "caption_audio"):
                b[k][1::2] = tok.pad_id
                b[f"{k}_len"][1::2] = 0
        else:
            b[m][1::2] = 0
    return b
