"""The tiny test config and synthetic batches for model / loss / generation tests (no data files)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from mmpretrain.config import Config, load_config
from mmpretrain.data.tokenizer import ByteTokenizer
from mmpretrain.modalities import Batch

# the one tiny test config (configs/tiny_test.yaml); its data paths are placeholders here
TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_test.yaml"


def tiny_cfg(*overrides: str) -> Config:
    return load_config(str(TINY_CONFIG), list(overrides))


def fake_batch(cfg: Config, n: int, seed: int = 0, drop: Sequence[str] = (),
               captions: Sequence[str] = ("a red circle", "a blue square", "a green cross")) -> Batch:
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
    b = Batch(
        keys=[f"s{i}" for i in range(n)], sources=["fake"] * n, epochs=[0] * n,
        inputs={"image": img_proto[labels] + 0.3 * torch.randn(n, 3, s, s, generator=g),
                "audio": aud_proto[labels] + 0.05 * torch.randn(n, ns, generator=g), "text": text},
        masks={m: torch.ones(n, dtype=torch.bool) for m in ("image", "audio", "text")},
        text_len=text_len, captions={"image": ci, "audio": ca}, caption_len={"image": ci_len, "audio": ca_len},
        labels=labels,
    )
    for m in drop:  # absent content is zero / empty, as the collate function makes it
        b.masks[m][1::2] = False
        if m == "text":
            b.inputs["text"][1::2] = tok.pad_id
            b.text_len[1::2] = 0
            for c in b.captions:
                b.captions[c][1::2] = tok.pad_id
                b.caption_len[c][1::2] = 0
        else:
            b.inputs[m][1::2] = 0
    return b


def write_stage0_checkpoint(root: Path, cfg: Config, model: torch.nn.Module, step: int) -> Path:
    """`root/checkpoints/step_<step>/` as a complete stage-0 DeepSpeed checkpoint of `model`
    (model states, config, trainer state, COMPLETE), for loading / export tests without a run."""
    import json

    from mmpretrain.checkpoint import tag_for
    from mmpretrain.config import to_yaml

    ckpt = root / "checkpoints" / tag_for(step)
    ckpt.mkdir(parents=True)
    torch.save({"module": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt / "mp_rank_00_model_states.pt")
    (ckpt / "config.yaml").write_text(to_yaml(cfg))
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step, "samples_seen": 8 * step}))
    (ckpt / "COMPLETE").write_text("ok\n")
    return ckpt
