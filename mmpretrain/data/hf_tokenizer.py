"""The tokenizer of an HF text tower (`model.text.kind: hf`): the directory's own `AutoTokenizer`,
so the ids, special tokens and truncation are what the HF model was trained with. Unlike
`HFTokenizer` it never adds a token: the model's embedding table has a fixed size, so a
tokenizer without pad / begin / end tokens is refused (BERT's [CLS] / [SEP] count as begin / end)."""
from __future__ import annotations

import copy
import json
import os
from typing import Any, List, Optional, Sequence

from mmpretrain.config import ConfigError
from mmpretrain.data.tokenizer import MARKER, Tokenizer

MARKER_TYPE = "hf_tower"


class HFTowerTokenizer(Tokenizer):
    """bos = the tokenizer's bos (else cls), eos = its eos (else sep), pad = its pad."""

    def __init__(self, path: str, key: str = "model.text.hf_path") -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # loader workers fork after use
        self.path = path
        self.tok = _load(path, key)
        t = self.tok
        bos = t.bos_token_id if t.bos_token_id is not None else t.cls_token_id
        eos = t.eos_token_id if t.eos_token_id is not None else t.sep_token_id
        missing = [n for n, v in (("pad", t.pad_token_id), ("bos (or cls)", bos), ("eos (or sep)", eos)) if v is None]
        if missing:
            raise ConfigError(f"config key '{key}' = {path!r}: its tokenizer has no {' / '.join(missing)} token; "
                              "an HF text tower's vocabulary is fixed, so none is added (set it in the "
                              "directory's tokenizer files)")
        self.pad_id, self.bos_id, self.eos_id = int(t.pad_token_id), int(bos), int(eos)
        self.vocab_size = len(t)
        probe = t("a", truncation=True, max_length=8)["input_ids"]
        # does the tokenizer's own template put begin / end around the text (BERT, RoBERTa, CLIP do)?
        self._template = len(probe) >= 2 and probe[0] == self.bos_id and probe[-1] == self.eos_id
        self._special = {self.pad_id, self.bos_id, self.eos_id}

    def encode(self, text: str) -> List[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def encode_with_specials(self, text: str, max_len: int) -> List[int]:
        """As the tokenizer adds them (truncated to max_len, end token kept); bos + ids + eos when its
        template adds neither."""
        if self._template:
            return list(self.tok(text, truncation=True, max_length=max_len)["input_ids"])
        return super().encode_with_specials(text, max_len)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids if int(i) not in self._special], skip_special_tokens=True)

    def save(self, directory: str, model_max_length: Optional[int] = None) -> None:
        """The tokenizer's own files (save_pretrained: AutoTokenizer reads them) plus our marker."""
        os.makedirs(directory, exist_ok=True)
        tok = copy.deepcopy(self.tok)  # the saved files get settings the live tokenizer keeps out of
        if model_max_length is not None:
            tok.model_max_length = int(model_max_length)
        for role in ("bos", "eos"):  # BERT-likes have no bos / eos: name the [CLS] / [SEP] our batches use
            if getattr(tok, f"{role}_token", None) is None:
                setattr(tok, f"{role}_token", self.tok.convert_ids_to_tokens(getattr(self, f"{role}_id")))
        tok.save_pretrained(directory)
        with open(os.path.join(directory, MARKER), "w") as f:
            json.dump({"type": MARKER_TYPE, **{r: self.tok.convert_ids_to_tokens(getattr(self, f"{r}_id"))
                                               for r in ("pad", "bos", "eos")}}, f)


def _load(path: str, key: str) -> Any:
    if not os.path.isdir(path):
        raise ConfigError(f"config key '{key}' = {path!r}: no such tokenizer directory")
    names = set(os.listdir(path))
    if not names & {"tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                    "tokenizer.model"}:
        raise ConfigError(f"config key '{key}' = {path!r} has no tokenizer files (tokenizer.json, vocab.txt, ...)")
    from transformers import AutoTokenizer

    from mmpretrain.models.hf import quiet

    try:
        with quiet():
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read it is this key's problem
        raise ConfigError(f"config key '{key}' = {path!r}: its tokenizer cannot be loaded: "
                          f"{' '.join(f'{type(e).__name__}: {e}'.split())[:300]}") from None


def is_tower_tokenizer_dir(directory: str) -> bool:
    """Whether `directory` is an HFTowerTokenizer.save (an export's tokenizer/)."""
    marker = os.path.join(directory, MARKER)
    if not os.path.isfile(marker):
        return False
    with open(marker) as f:
        return json.load(f).get("type") == MARKER_TYPE


def tokenizer_for(cfg: Any) -> Tokenizer:
    """The run's text tokenizer: the HF text tower's own with model.text.kind=hf (data.tokenizer is
    'bytes' or the same directory then, config.validate checks it), else data.tokenizer."""
    from mmpretrain.data.tokenizer import build_tokenizer

    t = cfg.model.text
    if t.kind == "hf":
        return HFTowerTokenizer(t.hf_path)
    return build_tokenizer(cfg.data.tokenizer)
