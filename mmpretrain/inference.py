"""Load an export (mmpretrain.export) without DeepSpeed and embed, retrieve and caption.

    from mmpretrain import inference
    m = inference.load("exports/demo")
    img = m.encode_image(["cat.png"])            # paths, bytes, PIL images or a (B,3,H,W) tensor
    aud = m.encode_audio(["meow.flac"])          # paths, bytes, 1-D arrays or a (B,N) tensor
    txt = m.encode_text(["a red circle"])        # strings, or (ids, lengths) tensors
    m.retrieve(txt, img, k=5)                    # (scores, indices), best first
    m.caption(image=["cat.png"])                 # needs a model trained with captioning

Only safetensors and JSON are read from an export: nothing from the files is unpickled or executed.
"""
from __future__ import annotations

import dataclasses
import io
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from mmpretrain import modalities
from mmpretrain.config import Config
from mmpretrain.data.decode import fit_length
from mmpretrain.generation import generate_captions
from mmpretrain.loading import load_model


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

    # ---- preprocessing: the modality's own eval decode (resize + centre crop, centre audio crop)
    def preprocess(self, modality: str, items: Union[torch.Tensor, Sequence[Any]]) -> torch.Tensor:
        """A batch input for a media modality: a tensor passes through; else each item is a path,
        bytes, a PIL image (saved as PNG first) or an array already in the model's sample format
        (float: normalised images; a 1-D signal is cut / repeat-padded to the clip length, then through the modality's front end)."""
        m = modalities.get(modality)
        if m.kind != "media":
            raise ValueError(f"'{modality}' is not a media modality; text goes through tokenize()")
        if isinstance(items, torch.Tensor):  # model input already, or 8-bit levels (decode's images)
            return modalities.to_model_input(m, items, self.cfg.data).float()
        shape = m.sample_shape(self.cfg.data)
        arrs = []
        for x in items:
            if isinstance(x, Image.Image):
                buf = io.BytesIO()
                x.save(buf, format="PNG")
                x = buf.getvalue()
            if isinstance(x, np.ndarray):
                x = x.astype(np.float32)
                if x.ndim == 1 and m.from_signal is not None:  # a raw signal: the modality's own front end
                    x = m.from_signal(x, self.cfg.data)
                elif x.ndim == 1 and len(shape) == 1:
                    x = fit_length(x, shape[0])
                if tuple(x.shape) != tuple(shape):
                    raise ValueError(f"{modality} array of shape {x.shape}; the model takes {shape}")
                arrs.append(x)
            else:
                arrs.append(m.decode(_read_bytes(x), self.cfg.data, None))
        # decoded images are 8-bit levels: normalised here, so that they stack with given float arrays
        affine: Dict[Any, Any] = {}  # the level scale / shift, made once for the whole call
        return torch.stack([modalities.to_model_input(m, torch.from_numpy(a)[None], self.cfg.data, cache=affine)[0]
                            for a in arrs])

    def tokenize(self, texts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings, not one string")
        return self.tokenizer.encode_batch(list(texts), self.cfg.data.text_max_len)

    # ---- embeddings (L2-normalised, shared space)
    @torch.no_grad()
    def encode(self, modality: str, items: Any, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, E) embeddings of `items` (text: strings, or ids with `lengths`)."""
        self.model.tower(modality)  # a clear error for a modality this model was built without
        if modality != modalities.TEXT:
            x = self.preprocess(modality, items).to(self.device)
            return self.model.encode(modality, x).float().cpu()
        if isinstance(items, torch.Tensor):
            if lengths is None:
                raise ValueError("encode_text(ids) needs the lengths tensor too")
            ids, lens = items, lengths
        else:
            ids, lens = self.tokenize(items)
        return self.model.encode(modality, ids.to(self.device), lens.to(self.device)).float().cpu()

    def __getattr__(self, name: str) -> Any:
        # encode_image(paths), encode_audio(...), encode_text(strings), ... for every registered modality
        if name.startswith("encode_") and name[7:] in modalities.names():
            return partial(self.encode, name[7:])
        raise AttributeError(f"{type(self).__name__} has no attribute '{name}'")

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
    def caption(self, **kwargs: Any) -> List[str]:
        """Captions, one per sample: keyword arguments named after captioned modalities give the
        inputs (`image=[...]`, `audio=[...]`; several = fused context), the others are
        GenerationConfig fields (num_beams, do_sample, top_k, top_p, max_new_tokens, ...)."""
        if getattr(self.model, "decoder", None) is None:
            raise RuntimeError("this model has no captioning decoder (model.text.decoder_depth=0)")
        for m in modalities.captioned():
            if kwargs.get(m) is not None and m not in self.model.decoder.modalities:
                raise ValueError(f"this model's decoder captions {self.model.decoder.modalities}, not '{m}'")
        inputs = {m: self.preprocess(m, kwargs.pop(m)).to(self.device) for m in modalities.captioned()
                  if kwargs.get(m) is not None}
        for m in modalities.captioned():
            kwargs.pop(m, None)
        if not inputs:
            raise ValueError(f"give inputs of at least one of {modalities.captioned()}")
        cfg = dataclasses.replace(self.cfg.eval.generation, **kwargs)
        return generate_captions(self.model, self.tokenizer, inputs, cfg)

    def generate(self, **kwargs: Any) -> List[str]:
        return self.caption(**kwargs)


def load(directory: "str | Path", device: "str | torch.device | None" = None) -> InferenceModel:
    """Rebuild the exported model (eval mode) with its config and tokenizer (mmpretrain.loading;
    a training checkpoint or run directory loads too). device None: CUDA when available."""
    model, cfg, tok = load_model(directory, device)
    return InferenceModel(model, cfg, tok, next(model.parameters()).device)
