"""The tri-modal model: image, audio and text towers projected into one space, plus a
learnable temperature (and SigLIP bias) per modality pair."""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmpretrain.config import Config
from mmpretrain.models.audio import AudioTransformer
from mmpretrain.models.text import TextTransformer
from mmpretrain.models.transformer import init_weights
from mmpretrain.models.vision import VisionTransformer

PAIRS = ("image_text", "audio_text", "image_audio")


class MultimodalModel(nn.Module):
    def __init__(self, cfg: Config, vocab_size: int) -> None:
        super().__init__()
        m, d = cfg.model, cfg.data
        self.cfg = cfg
        num_samples = int(d.audio.sample_rate * d.audio.clip_seconds)
        self.vision = VisionTransformer(m.vision, d.image_size, m.dropout)
        self.audio = AudioTransformer(m.audio, d.audio.sample_rate, num_samples, m.dropout)
        self.text = TextTransformer(m.text, vocab_size, d.text_max_len, m.dropout)
        self.image_proj = nn.Linear(m.vision.width, m.embed_dim, bias=False)
        self.audio_proj = nn.Linear(m.audio.width, m.embed_dim, bias=False)
        self.text_proj = nn.Linear(m.text.width, m.embed_dim, bias=False)
        init_weights(self)
        init_scale = math.log(1.0 / cfg.loss.init_temperature)
        # shape (1,), not 0-dim: DeepSpeed's parameter broadcast views tensors as bytes
        self.logit_scale = nn.ParameterDict({p: nn.Parameter(torch.full((1,), init_scale)) for p in PAIRS})
        # SigLIP's bias starts at -10 (paper); unused (and zero-grad) under InfoNCE
        self.logit_bias = nn.ParameterDict({p: nn.Parameter(torch.full((1,), -10.0)) for p in PAIRS})
        self.max_log_scale = math.log(cfg.loss.max_logit_scale)
        self.decoder: Optional[nn.Module] = None
        if m.text.decoder_depth > 0:
            from mmpretrain.models.decoder import MultimodalDecoder

            self.decoder = MultimodalDecoder(cfg, vocab_size)

    # ---- per-modality encoders (normalized embeddings), used by eval and inference
    def encode_image(self, images: torch.Tensor, return_tokens: bool = False):
        pooled, tokens = self.vision(images)
        emb = F.normalize(self.image_proj(pooled), dim=-1)
        return (emb, tokens) if return_tokens else emb

    def encode_audio(self, wav: torch.Tensor, return_tokens: bool = False):
        pooled, tokens = self.audio(wav)
        emb = F.normalize(self.audio_proj(pooled), dim=-1)
        return (emb, tokens) if return_tokens else emb

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor, return_tokens: bool = False):
        pooled, states = self.text(tokens, lengths)
        emb = F.normalize(self.text_proj(pooled), dim=-1)
        return (emb, states) if return_tokens else emb

    def generate(self, image: Optional[torch.Tensor] = None, audio: Optional[torch.Tensor] = None, *, bos_id: int,
                 eos_id: int, pad_id: int, image_mask: Optional[torch.Tensor] = None,
                 audio_mask: Optional[torch.Tensor] = None, **gen_kwargs):
        """Caption token ids for images and / or audio (mmpretrain.generation.generate_ids); gen_kwargs
        are GenerationConfig fields (num_beams, do_sample, top_k, top_p, max_new_tokens, ...)."""
        from mmpretrain.config import GenerationConfig
        from mmpretrain.generation import generate_ids

        return generate_ids(self, bos_id, eos_id, pad_id, image, audio, image_mask, audio_mask,
                            GenerationConfig(**gen_kwargs))

    def scale(self, pair: str) -> torch.Tensor:
        return self.logit_scale[pair].clamp(max=self.max_log_scale).exp().squeeze(0)

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Every tower runs every step, present or not, so ZeRO's collectives line up."""
        img, img_tok = self.encode_image(batch["image"], return_tokens=True)
        aud, aud_tok = self.encode_audio(batch["audio"], return_tokens=True)
        txt, txt_states = self.encode_text(batch["text"], batch["text_len"], return_tokens=True)
        out = {"image": img, "audio": aud, "text": txt, "image_tokens": img_tok, "audio_tokens": aud_tok,
               "text_states": txt_states}
        for p in PAIRS:
            out[f"scale/{p}"] = self.scale(p)
            out[f"bias/{p}"] = self.logit_bias[p].squeeze(0)
        return out


def build_model(cfg: Config, vocab_size: int) -> MultimodalModel:
    return MultimodalModel(cfg, vocab_size)
