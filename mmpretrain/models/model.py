"""The multimodal model: one tower per registered modality (mmpretrain.modalities, picked by
`model.<section>.kind`) projected into one space, a learnable temperature (and SigLIP bias) per
modality pair, and the optional caption decoder. `forward` returns everything the losses need,
caption logits included, so the losses are pure functions of tensors."""
from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

# the registry imports the tower modules of this package: read at call time (M.TEXT, M.pairs())
from mmpretrain import modalities as M
from mmpretrain.config import Config, GenerationConfig
from mmpretrain.generation import generate_ids
from mmpretrain.models.decoder import MultimodalDecoder
from mmpretrain.models.freeze import apply_lock, is_frozen
from mmpretrain.models.text import TextTransformer
from mmpretrain.models.transformer import init_fan_in, init_weights, set_grad_checkpointing
from mmpretrain.ops.attention import check_backend


# NamedTuples, not dataclasses: DeepSpeed ZeRO-3 finds a module's output tensors by walking
# tuples / lists / dicts only, and hooks them to re-gather the parameters the module used (its
# own and, here, the logit scales / biases and the decoder's modality embeddings read outside
# their modules' forward) before its backward; tensors inside a dataclass stay hidden from it.
class CaptionOutput(NamedTuple):
    """The R caption rows decoded this step: of the C captioned modalities x B samples, only those
    whose modality is present with a caption besides BOS (one stand-in row, not valid, when none is:
    every rank runs the decoder every step). `owner[r]` = index in `modalities` of row r's modality."""

    modalities: List[str]
    logits: torch.Tensor  # (R, L-1, V): prediction of token t+1 from tokens <= t
    tokens: torch.Tensor  # (R, L) BOS .. EOS, padded
    lengths: torch.Tensor  # (R,)
    valid: torch.Tensor  # (R,) bool: the modality is present and its caption has a token besides BOS
    owner: torch.Tensor  # (R,) long


class ModelOutput(NamedTuple):
    embeddings: Dict[str, torch.Tensor]  # modality -> (B, E), unit norm
    # modality -> (B, N, W) tower tokens (text: every position's state); None where nothing reads them
    # (towers the caption decoder does not read give their pooled token alone)
    tokens: Dict[str, Optional[torch.Tensor]]
    scales: Dict[str, torch.Tensor]  # pair -> () logit scale, clamped
    biases: Dict[str, torch.Tensor]  # pair -> () SigLIP bias
    caption: Optional[CaptionOutput] = None


class MultimodalModel(nn.Module):
    def __init__(self, cfg: Config, vocab_size: int) -> None:
        super().__init__()
        m = cfg.model
        self.cfg, self.vocab_size = cfg, vocab_size
        self._input_affine: Dict[Any, Any] = {}  # (modality, device) -> level scale / shift (to_model_input)
        # only the towers the run uses (modalities.active): an image-text run has no audio tower at all
        self.towers = nn.ModuleDict({mod.name: M.build_tower(cfg, mod, vocab_size) for mod in M.active(cfg)})
        self.proj = nn.ModuleDict({k: nn.Linear(t.width, m.embed_dim, bias=False) for k, t in self.towers.items()})
        for tower in self.towers.values():  # HF towers keep their own (pretrained or from_config) init
            if not getattr(tower, "keeps_own_init", False):
                init_weights(tower)
        for proj in self.proj.values():
            init_fan_in(proj)
        init_scale = math.log(1.0 / cfg.loss.init_temperature)
        pairs = self.pair_names
        # shape (1,), not 0-dim: DeepSpeed's parameter broadcast views tensors as bytes
        self.logit_scale = nn.ParameterDict({p: nn.Parameter(torch.full((1,), init_scale)) for p in pairs})
        # SigLIP's bias starts at -10 (paper); unused (and zero-grad) under InfoNCE
        self.logit_bias = nn.ParameterDict({p: nn.Parameter(torch.full((1,), -10.0)) for p in pairs})
        self.max_log_scale = math.log(cfg.loss.max_logit_scale)
        self.decoder: Optional[MultimodalDecoder] = None
        # the causal text module the caption decoder reads: the text tower itself when it has a decode
        # cache (ours), else (an HF encoder: bidirectional, its states see later tokens) a native one
        self.caption_tower: Optional[nn.Module] = None
        if m.text.decoder_depth > 0:
            self.decoder = MultimodalDecoder(cfg, vocab_size, {k: self.towers[k].width for k in M.captioned()
                                                               if k in self.towers})
            if not hasattr(self.towers[M.TEXT], "new_cache"):
                self.caption_tower = TextTransformer(m.text, vocab_size, cfg.data.text_max_len,
                                                     M.tower_dropout(cfg, M.TEXT))
                init_weights(self.caption_tower)
        self._init_and_lock_towers(cfg)
        self._set_checkpointing(cfg)
        self.set_attention_backend(m.attention_backend)

    def _init_and_lock_towers(self, cfg: Config) -> None:
        """`model.<section>.init` = a path: that tower's weights from our export / checkpoint; then
        `lock` / `unlock_*` (models.freeze)."""
        from mmpretrain.config import TOWER_INITS
        from mmpretrain.models.hf import load_tower_init

        for mod in M.active(cfg):
            t = M.tower_section(cfg, mod)
            if t is None:
                continue
            init = getattr(t, "init", "auto")
            if init not in TOWER_INITS:
                load_tower_init(self.towers[mod.name], mod.name, f"model.{mod.config_section}.init", init)
            apply_lock(self.towers[mod.name], t)

    def _set_checkpointing(self, cfg: Config) -> None:
        for mod in M.active(cfg):
            t = M.tower_section(cfg, mod)
            if t is not None and getattr(t, "grad_checkpointing", False):
                set_grad_checkpointing(self.towers[mod.name], True)
        if getattr(cfg.model.text, "grad_checkpointing", False):
            for extra in (self.decoder, self.caption_tower):
                if extra is not None:
                    set_grad_checkpointing(extra, True)

    @property
    def pair_names(self) -> List[str]:
        """The contrastive pairs between this model's towers (each has a logit scale and bias)."""
        return [p.name for p in M.active_pairs(self.cfg)]

    def tower(self, modality: str) -> nn.Module:
        """The tower of `modality`; a clear error when this model was built without it."""
        if modality not in self.towers:
            raise ValueError(f"this model has no '{modality}' tower (towers: {list(self.towers)}; a tower is left out "
                             f"when model.<section>.enabled is false or no loss pair or captioning uses it)")
        return self.towers[modality]

    def set_attention_backend(self, name: str) -> None:
        """'auto' | 'sdpa' | 'triton' | 'flash' | 'reference' for every attention of the model (plugin
        towers built from models.transformer blocks included)."""
        check_backend(name)
        for mod in self.modules():
            if hasattr(mod, "attention_backend"):
                mod.attention_backend = name

    # ---- per-modality encoders (normalized embeddings), used by eval and inference
    def encode(self, modality: str, x: torch.Tensor, lengths: Optional[torch.Tensor] = None,
               return_tokens: bool = False) -> Any:
        """x: the modality's batch input (text: ids with `lengths`) -> (B, E) unit vectors [, tokens]."""
        tower = self.tower(modality)
        if x.dtype == torch.uint8:  # 8-bit levels (images): normalised here, on the model's device
            x = M.to_model_input(M.get(modality), x, self.cfg.data, _param_dtype(tower), self._input_affine)
        # without return_tokens, a native tower's last block computes the pooled token alone (same numbers)
        kw = {"pooled_only": True} if not return_tokens and getattr(tower, "supports_pooled_only", False) else {}
        # a locked tower runs without autograd: no activations kept for a backward that never comes
        with torch.no_grad() if is_frozen(tower) else contextlib.nullcontext():
            pooled, tokens = tower(x, lengths, **kw) if modality == M.TEXT else tower(x, **kw)
        emb = F.normalize(self.proj[modality](pooled), dim=-1)
        return (emb, tokens) if return_tokens else emb

    def __getattr__(self, name: str) -> Any:
        # encode_image(x), encode_text(ids, lengths), ... for every registered modality
        if name.startswith("encode_") and name[7:] in M.names():  # a tower left out: encode() says so
            modality = name[7:]
            return lambda x, *a, **k: self.encode(modality, x, *a, **k)
        return super().__getattr__(name)

    @property
    def text(self) -> nn.Module:
        """The text tower."""
        return self.towers[M.TEXT]

    @property
    def caption_text(self) -> nn.Module:
        """The causal text module whose states the caption decoder reads (training and generation)."""
        return self.caption_tower if self.caption_tower is not None else self.towers[M.TEXT]

    def generate(self, inputs: Dict[str, torch.Tensor], masks: Optional[Dict[str, torch.Tensor]] = None, *,
                 bos_id: int, eos_id: int, pad_id: int, **gen_kwargs: Any):
        """Caption token ids for `inputs` (captioned modality -> batch input; several = fused
        context) (mmpretrain.generation.generate_ids); gen_kwargs are GenerationConfig fields."""
        return generate_ids(self, bos_id, eos_id, pad_id, inputs, masks, GenerationConfig(**gen_kwargs))

    def scale(self, pair: str) -> torch.Tensor:
        return self.logit_scale[pair].clamp(max=self.max_log_scale).exp().squeeze(0)

    def caption_context(self, tokens: Dict[str, torch.Tensor],
                        masks: Optional[Dict[str, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decoder memory from tower tokens of captioned modalities (absent keys: not used)."""
        if self.decoder is None:
            raise ValueError("this model has no caption decoder (model.text.decoder_depth = 0)")
        return self.decoder.context(tokens, dict(masks or {}))

    def caption_logits(self, batch: M.Batch, tokens: Dict[str, torch.Tensor]) -> CaptionOutput:
        """Teacher-forced next-token logits of every captioned modality's caption, each decoded from
        that modality's tokens only (the other modalities are masked out of the cross-attention)."""
        assert self.decoder is not None
        mods = self.decoder.modalities
        toks = torch.cat([batch.captions[m] for m in mods], 0)  # (C B, L)
        lens = torch.cat([batch.caption_len[m] for m in mods], 0)
        present = torch.cat([batch.masks[m].bool() for m in mods], 0)
        valid = present & (lens > 1)
        owner = torch.arange(len(mods), device=toks.device).repeat_interleave(toks.shape[0] // len(mods))
        rows = valid.nonzero().squeeze(1)  # only the rows the loss reads (absent modalities cost nothing)
        if rows.numel() == 0:
            rows = torch.zeros(1, dtype=torch.long, device=toks.device)  # a stand-in, not valid
        toks, lens, valid, owner = toks[rows], lens[rows], valid[rows], owner[rows]
        text = self.caption_text
        with torch.no_grad() if is_frozen(text) else contextlib.nullcontext():
            _, states = text(toks, lens)  # unimodal causal layers, (R, L, W)
        ctx, ctx_mask = self.decoder.stacked_context({m: tokens[m] for m in mods})
        logits = self.decoder(states[:, :-1], ctx.index_select(0, rows), ctx_mask.index_select(0, rows))  # (R, L-1, V)
        return CaptionOutput(mods, logits, toks, lens, valid, owner)

    def forward(self, batch: M.Batch, captions: bool = True) -> ModelOutput:
        """Each tower encodes only the rows where its modality is present; absent rows get zero
        embeddings and tokens (the masks keep them out of every loss). A tower with no present row
        still runs on one row, multiplied by 0, so that every rank runs every tower every step:
        ZeRO-3 gathers a tower's parameters inside its forward, and every rank must join.
        captions=False skips the decoder (the feature cache's no-grad pass)."""
        emb, tok = {}, {}
        # only the caption decoder reads tower tokens: other towers return their pooled token alone. Not
        # narrowed by `captions`: the feature cache's no-grad pass must draw the same dropout masks as
        # the replayed pass with captions (the same work per tower)
        decoded = set(self.decoder.modalities) if self.decoder is not None else set()
        for name in self.towers:
            lengths = batch.text_len if name == M.TEXT else None
            emb[name], tok[name] = self._encode_present(name, batch.inputs[name], batch.masks[name], lengths,
                                                        name in decoded)
        pairs = self.pair_names
        scales, biases = {p: self.scale(p) for p in pairs}, {p: self.logit_bias[p].squeeze(0) for p in pairs}
        caption = self.caption_logits(batch, tok) if captions and self.decoder is not None else None
        return ModelOutput(emb, tok, scales, biases, caption)


    def _encode_present(self, name: str, x: torch.Tensor, mask: torch.Tensor, lengths: Optional[torch.Tensor],
                        with_tokens: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(B, E) embeddings with zeros at absent rows, and (B, N, W) tokens when `with_tokens` (and the
        tower gives them), else None."""
        def run(inp: torch.Tensor, lens: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
            if with_tokens:
                return self.encode(name, inp, lens, return_tokens=True)
            return self.encode(name, inp, lens), None  # pooled only: the last block prunes its queries

        n = x.shape[0]
        if bool(mask.all()):
            return run(x, lengths)
        rows = mask.nonzero().squeeze(1)
        dummy = rows.numel() == 0
        if dummy:
            rows = torch.zeros(1, dtype=torch.long, device=x.device)
        e, t = run(x.index_select(0, rows), None if lengths is None else lengths.index_select(0, rows))
        if dummy:  # graph kept (zero gradients reach every parameter of the tower), nothing placed
            return (e.new_zeros(n, *e.shape[1:]) + 0 * e.sum(),
                    None if t is None else t.new_zeros(n, *t.shape[1:]) + 0 * t.sum())
        return (e.new_zeros(n, *e.shape[1:]).index_copy(0, rows, e),
                None if t is None else t.new_zeros(n, *t.shape[1:]).index_copy(0, rows, t))


def _param_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype of a module's parameters (its compute dtype), float32 when it has none."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def build_model(cfg: Config, vocab_size: int) -> MultimodalModel:
    return MultimodalModel(cfg, vocab_size)
