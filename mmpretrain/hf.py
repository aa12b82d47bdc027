"""transformers integration of our exports: `import mmpretrain.hf` registers `MMPretrainConfig`
(model_type "mmpretrain") and `MMPretrainModel` with AutoConfig / AutoModel / AutoTokenizer, so

    import mmpretrain.hf
    from transformers import AutoModel, AutoTokenizer
    model = AutoModel.from_pretrained("exports/demo")      # no trust_remote_code
    tok = AutoTokenizer.from_pretrained("exports/demo")
    emb = model.get_text_features(**tok(["a red circle"], return_tensors="pt"))

loads any export of `python -m mmpretrain.export` (every modality, the caption decoder too). The
model's state-dict keys are the export's own (`towers.image.patch.weight`, ...), so the same
model.safetensors loads without renaming; `get_<modality>_features` give the normalized
embeddings `mmpretrain.inference.load(dir).encode_<modality>` gives (inputs already preprocessed:
pixel tensors, waveforms, token ids).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from transformers import (AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel,
                          PreTrainedTokenizerFast)

from mmpretrain import modalities as M

MODEL_TYPE = "mmpretrain"
# our export's `dtype` key (fp32 | bf16 | fp16) -> the torch dtype name transformers expects there
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class MMPretrainConfig(PretrainedConfig):
    """The export's config.json: `config` is the whole training config (a dict), `vocab_size` the
    tokenizer's; provenance keys (format, step, samples_seen, ...) are kept as attributes."""

    model_type = MODEL_TYPE

    def __init__(self, config: Optional[Dict[str, Any]] = None, vocab_size: Optional[int] = None,
                 dtype: Any = None, **kwargs: Any) -> None:
        # our `dtype` key says fp32 / bf16 / fp16: transformers reads `dtype` as a torch dtype name
        self.export_dtype = kwargs.pop("export_dtype", None)
        if isinstance(dtype, str) and dtype in _DTYPES:
            self.export_dtype, dtype = dtype, _DTYPES[dtype]
        super().__init__(dtype=dtype, **kwargs)
        self.config = config
        self.vocab_size = vocab_size

    def training_config(self) -> Any:
        """The typed mmpretrain Config (plugins named in it are loaded)."""
        from mmpretrain.config import from_dict

        if self.config is None:
            raise ValueError("MMPretrainConfig has no 'config' (the training config of the export)")
        cfg = from_dict(self.config)
        try:  # towers built to receive the weights: random init, HF towers from the export's copy
            from mmpretrain.models.hf import for_rebuild
        except ImportError:  # pragma: no cover - a package without HF towers
            return cfg
        root = self.name_or_path if self.name_or_path and os.path.isdir(self.name_or_path) else None
        return for_rebuild(cfg, root)


class MMPretrainModel(PreTrainedModel):
    """Our MultimodalModel under transformers' loading: its modules (towers, proj, logit_scale,
    logit_bias, decoder) are this model's children, under the same names."""

    config_class = MMPretrainConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules: list = []

    def __init__(self, config: MMPretrainConfig) -> None:
        super().__init__(config)
        from mmpretrain.models import build_model

        cfg = config.training_config()
        mm = build_model(cfg, int(config.vocab_size))
        # the MultimodalModel is kept outside the module tree (no `mm.` key prefix); its children are ours
        object.__setattr__(self, "mm", mm)
        for name, child in mm.named_children():
            self.add_module(name, child)
        # non-persistent buffers (audio window / mel filterbank, ...) are computed here and saved in no
        # file; from_pretrained replaces them with torch.empty_like, _init_weights puts these back
        object.__setattr__(self, "_buffer_values", {
            id(mod): {n: mod._buffers[n].detach().clone() for n in mod._non_persistent_buffers_set
                      if mod._buffers.get(n) is not None}
            for mod in self.modules() if getattr(mod, "_non_persistent_buffers_set", None)})
        self.post_init()

    @classmethod
    def get_init_context(cls, *args: Any, **kwargs: Any) -> list:
        """transformers 5.x builds models on the meta device; ours is built on the CPU, because
        tower code computes buffers in __init__ (the mel filterbank) with ops meta tensors refuse,
        and their values must be real to be kept (see _init_weights)."""
        ctxs = super().get_init_context(*args, **kwargs)
        return [c for c in ctxs if not (isinstance(c, torch.device) and c.type == "meta")]

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: our towers initialise themselves when built (from_config keeps our init, not
        transformers' default); from_pretrained loads every parameter (a missing one is an error)."""

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' from_pretrained, strict about missing weights, with the non-persistent
        buffers restored (transformers 5.x replaces each with torch.empty_like while loading)."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            raise RuntimeError(f"{args[0] if args else ''}: the weights file lacks {len(missing)} tensors of the "
                               f"model, e.g. {missing[:5]} (not an export of this config?)")
        model._restore_buffers()
        return (model, info) if want_info else model

    @torch.no_grad()
    def _restore_buffers(self) -> None:
        for mod in self.modules():
            for name, value in self._buffer_values.get(id(mod), {}).items():
                buf = mod._buffers.get(name)
                if buf is None or buf.device.type == "meta":
                    mod._buffers[name] = value.to(dtype=buf.dtype if buf is not None else value.dtype)
                else:
                    buf.copy_(value)

    # ---- features: normalized embeddings, as mmpretrain.inference
    def get_features(self, modality: str, inputs: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.mm.encode(modality, inputs, lengths)

    def get_image_features(self, pixel_values: torch.Tensor, **_: Any) -> torch.Tensor:
        """(B, E) unit vectors of (B, 3, S, S) images normalized with CLIP mean / std."""
        return self.get_features(M.by_hf_input("pixel_values"), pixel_values)

    def get_audio_features(self, input_values: torch.Tensor, **_: Any) -> torch.Tensor:
        """(B, E) unit vectors of (B, N) mono waveforms at data.audio.sample_rate, clip length N."""
        return self.get_features(M.by_hf_input("input_values"), input_values)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                          lengths: Optional[torch.Tensor] = None, **_: Any) -> torch.Tensor:
        """(B, E) unit vectors of BOS ... EOS token ids (right-padded); lengths from the attention
        mask when not given (without either, every row is taken to end at its last column)."""
        if lengths is None:
            lengths = (attention_mask.long().sum(1) if attention_mask is not None
                       else torch.full((input_ids.shape[0],), input_ids.shape[1], device=input_ids.device))
        return self.get_features(M.TEXT, input_ids, lengths)

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.Tensor] = None, input_values: Optional[torch.Tensor] = None,
                **_: Any) -> Dict[str, torch.Tensor]:
        """Embeddings of whatever inputs are given: {"text_embeds", "image_embeds", "audio_embeds"}
        and the logits of each pair whose two sides are present (`logits_<pair>`, scale applied)."""
        given = {"pixel_values": pixel_values, "input_values": input_values}
        emb: Dict[str, torch.Tensor] = {}
        for m in M.all_modalities():  # in registry order, text included
            if m.name not in self.mm.towers:
                if m.name != M.TEXT and given.get(m.hf_input) is not None:
                    self.mm.tower(m.name)  # raises: this model was built without that tower
                continue
            if m.name == M.TEXT:
                if input_ids is not None:
                    emb[m.name] = self.get_text_features(input_ids, attention_mask)
            elif given.get(m.hf_input) is not None:
                emb[m.name] = self.get_features(m.name, given[m.hf_input])
        out = {f"{m}_embeds": e for m, e in emb.items()}
        for p in M.active_pairs(self.mm.cfg):
            if p.a in emb and p.b in emb:
                out[f"logits_{p.name}"] = self.mm.scale(p.name) * emb[p.a] @ emb[p.b].t()
        return out


AutoConfig.register(MODEL_TYPE, MMPretrainConfig, exist_ok=True)
AutoModel.register(MMPretrainConfig, MMPretrainModel, exist_ok=True)
# exports write tokenizer_config.json (tokenizer_class PreTrainedTokenizerFast); this covers a
# directory that has only tokenizer.json
AutoTokenizer.register(MMPretrainConfig, fast_tokenizer_class=PreTrainedTokenizerFast, exist_ok=True)
