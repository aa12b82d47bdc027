"""Load an export (mmpretrain.export) without DeepSpeed and embed, retrieve and caption.

    from mmpretrain import inference
    m = inference.load("exports/demo")
    img = m.encode_image(["cat.png"])            # paths, bytes, PIL images or a (B,3,H,W) tensor
    aud = m.encode_audio(["meow.flac"])          # paths, bytes, 1-D arrays or a (B,N) tensor
    txt = m.encode_text(["a red circle"])        # strings, or (ids, lengths) tensors
    m.retrieve(txt, img, k=5)                    # (scores, indices), best first
    m.caption(image=["cat.png"])                 # needs a model trained with captioning

Only safetensors and JSON are read: nothing from the files is unpickled or executed.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from mmpretrain.config import Config, from_dict

ImageInput = Union[torch.Tensor, Sequence[Any]]
AudioInput = Union[torch.Tensor, Sequence[Any]]


def _read_bytes(x: Any) -> bytes:
    if isinstance(x, (bytes, bytearray)):
        return bytes(x)
    if isinstance(x, (str, Path)):
        return Path(x).read_bytes()
    raise TypeError(f"expected a path or bytes, got {type(x).__name__}")


class InferenceModel:
    """A model, its config and tokenizer, with preprocessing that matches evaluation."""

    def __init__(self, model: torch.nn.Module, cfg: Config, tokenizer: Any, device: torch.device) -> None:
        self.model = model
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.device = device

    # ---- preprocessing (eval transforms: resize + centre crop; centre audio crop)
    def preprocess_images(self, images: ImageInput) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            return images.float()
        from PIL import Image

        from mmpretrain.data.decode import decode_image

        arrs = []
        for x in images:
            if isinstance(x, Image.Image):
                buf = io.BytesIO()
                x.save(buf, format="PNG")
                x = buf.getvalue()
            arrs.append(decode_image(_read_bytes(x), self.cfg.data.image_size))
        return torch.from_numpy(np.stack(arrs))

    def preprocess_audio(self, audio: AudioInput) -> torch.Tensor:
        a = self.cfg.data.audio
        if isinstance(audio, torch.Tensor):
            return audio.float()
        from mmpretrain.data.decode import decode_audio, fit_length

        n = int(a.sample_rate * a.clip_seconds)
        arrs = []
        for x in audio:
            if isinstance(x, np.ndarray):  # already mono at the model's rate
                arrs.append(fit_length(x.astype(np.float32), n))
            else:
                arrs.append(decode_audio(_read_bytes(x), a.sample_rate, a.clip_seconds))
        return torch.from_numpy(np.stack(arrs))

    def tokenize(self, texts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings, not one string")
        return self.tokenizer.encode_batch(list(texts), self.cfg.data.text_max_len)

    # ---- embeddings (L2-normalised, shared space)
    @torch.no_grad()
    def encode_image(self, images: ImageInput) -> torch.Tensor:
        return self.model.encode_image(self.preprocess_images(images).to(self.device)).float().cpu()

    @torch.no_grad()
    def encode_audio(self, audio: AudioInput) -> torch.Tensor:
        return self.model.encode_audio(self.preprocess_audio(audio).to(self.device)).float().cpu()

    @torch.no_grad()
    def encode_text(self, texts: Union[Sequence[str], torch.Tensor], lengths: Optional[torch.Tensor] = None
                    ) -> torch.Tensor:
        if isinstance(texts, torch.Tensor):
            if lengths is None:
                raise ValueError("encode_text(ids) needs the lengths tensor too")
            ids, lens = texts, lengths
        else:
            ids, lens = self.tokenize(texts)
        return self.model.encode_text(ids.to(self.device), lens.to(self.device)).float().cpu()

    @staticmethod
    def retrieve(queries: torch.Tensor, gallery: torch.Tensor, k: int = 5,
                 chunk: int = 4096) -> Tuple[torch.Tensor, torch.Tensor]:
        """Top-k cosine scores and gallery indices per query, in query chunks (no full matrix)."""
        k = min(k, gallery.shape[0])
        scores, idx = [], []
        for q in queries.split(chunk):
            s, i = (q @ gallery.t()).topk(k, dim=1)
            scores.append(s)
            idx.append(i)
        return torch.cat(scores), torch.cat(idx)

    @torch.no_grad()
    def caption(self, image: Optional[ImageInput] = None, audio: Optional[AudioInput] = None, **gen: Any) -> List[str]:
        """Captions for images and/or audio (one per sample; both given = fused context).
        `gen`: GenerationConfig fields (num_beams, do_sample, top_k, top_p, max_new_tokens, ...)."""
        if getattr(self.model, "decoder", None) is None:
            raise RuntimeError("this model has no captioning decoder (model.text.decoder_depth=0)")
        import dataclasses

        from mmpretrain.generation import generate_captions

        img = self.preprocess_images(image).to(self.device) if image is not None else None
        aud = self.preprocess_audio(audio).to(self.device) if audio is not None else None
        cfg = dataclasses.replace(self.cfg.eval.generation, **gen)
        return generate_captions(self.model, self.tokenizer, img, aud, cfg)

    def generate(self, *args: Any, **kwargs: Any) -> List[str]:
        return self.caption(*args, **kwargs)


def load(directory: "str | Path", device: "str | torch.device | None" = None) -> InferenceModel:
    """Rebuild the exported model (eval mode) with its config and tokenizer."""
    from safetensors.torch import load_file

    from mmpretrain.checkpoint import load_state_checked
    from mmpretrain.data.tokenizer import build_tokenizer
    from mmpretrain.models import build_model

    d = Path(directory)
    for name in ("model.safetensors", "config.json"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d} is not an export: {name} is missing (make one with python -m mmpretrain.export)")
    meta = json.loads((d / "config.json").read_text())
    cfg = from_dict(meta.get("config", meta))
    tok_dir = d / "tokenizer"
    tok = build_tokenizer(str(tok_dir) if tok_dir.is_dir() else cfg.data.tokenizer)
    model = build_model(cfg, tok.vocab_size)
    sd = load_file(str(d / "model.safetensors"))
    load_state_checked(model, {k: v.float() for k, v in sd.items()}, d / "model.safetensors")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return InferenceModel(model.to(dev).eval(), cfg, tok, dev)
