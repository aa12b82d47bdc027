"""Text tokenizers behind one small interface: byte-level fallback or a `tokenizers` BPE
(tokenizer.json file or local HF tokenizer directory; never the network)."""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

from tokenizers import Tokenizer as _Tok
from tokenizers import decoders, models, pre_tokenizers, processors

if TYPE_CHECKING:  # torch loads at the first pad: preflight loads a tokenizer to check it, torch-free
    import torch

MARKER = "mmpretrain_tokenizer.json"
SPECIALS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>"}
_ALIASES = {
    "pad": ["<pad>", "[PAD]", "<|pad|>", "<|endoftext|>"],
    "bos": ["<s>", "[CLS]", "<|startoftext|>", "<bos>", "<|endoftext|>"],
    "eos": ["</s>", "[SEP]", "<|endoftext|>", "<eos>"],
}


class Tokenizer:
    """Common interface; `encode` adds no specials, `encode_batch` adds BOS/EOS and pads."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def save(self, directory: str, model_max_length: Optional[int] = None) -> None:
        """Write the tokenizer to `directory`: our marker plus the files transformers reads
        (tokenizer.json, tokenizer_config.json, special_tokens_map.json), so that
        `AutoTokenizer.from_pretrained(directory)` gives our ids, BOS/EOS added, pad set."""
        raise NotImplementedError

    def _save_hf_files(self, directory: str, tok: _Tok, model_max_length: Optional[int]) -> None:
        """tokenizer.json with a post-processor adding BOS ... EOS (our `encode_with_specials`; our
        own encode passes add_special_tokens=False, so it never runs for us) and the two config files."""
        names = {r: tok.id_to_token(getattr(self, f"{r}_id")) for r in ("pad", "bos", "eos")}
        bos, eos = (names["bos"], self.bos_id), (names["eos"], self.eos_id)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos[0]} $A {eos[0]}", pair=f"{bos[0]} $A {eos[0]} $B:1 {eos[0]}:1", special_tokens=[bos, eos])
        tok.save(os.path.join(directory, "tokenizer.json"))
        special = {f"{r}_token": n for r, n in names.items()}
        conf = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "padding_side": "right",
                "clean_up_tokenization_spaces": False}
        if model_max_length is not None:
            conf["model_max_length"] = int(model_max_length)
        for fn, d in (("tokenizer_config.json", conf), ("special_tokens_map.json", special)):
            with open(os.path.join(directory, fn), "w") as f:
                json.dump(d, f, indent=1)

    def encode_with_specials(self, text: str, max_len: int) -> List[int]:
        """BOS + ids truncated to fit + EOS; at most `max_len` ids."""
        ids = self.encode(text)[: max(0, max_len - 2)]
        return [self.bos_id] + ids + [self.eos_id]

    def pad(self, seqs: Sequence[Sequence[int]], max_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
        import torch

        out = torch.full((len(seqs), max_len), self.pad_id, dtype=torch.long)
        lens = torch.zeros(len(seqs), dtype=torch.long)
        for i, s in enumerate(seqs):
            s = list(s)[:max_len]
            if s:
                out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            lens[i] = len(s)
        return out, lens

    def encode_batch(self, texts: Sequence[str], max_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, max_len) int64 ids = BOS + text + EOS padded with pad_id, and (B,) lengths."""
        return self.pad([self.encode_with_specials(t, max_len) for t in texts], max_len)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are ids 0..255; pad/bos/eos are 256/257/258."""

    def __init__(self) -> None:
        self.pad_id, self.bos_id, self.eos_id = 256, 257, 258
        self.vocab_size = 259

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: str, model_max_length: Optional[int] = None) -> None:
        os.makedirs(directory, exist_ok=True)
        self._save_hf_files(directory, byte_level_tokenizer(), model_max_length)
        with open(os.path.join(directory, MARKER), "w") as f:
            json.dump({"type": "bytes"}, f)


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer`; missing pad/bos/eos tokens are added as specials."""

    def __init__(self, path: str, names: Optional[dict] = None) -> None:
        # loader workers fork after this process used the tokenizer: its thread pool must stay off
        # (set here, when one is built, not at import; a user's explicit value is kept)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.tok = _Tok.from_file(path)
        self.tok.no_truncation()
        self.tok.no_padding()
        names = names or {}
        ids = {}
        for role in ("pad", "bos", "eos"):
            cands = ([names[role]] if names.get(role) else []) + _ALIASES[role]
            found = next((self.tok.token_to_id(c) for c in cands if self.tok.token_to_id(c) is not None), None)
            if found is None:
                self.tok.add_special_tokens([SPECIALS[role]])
                found = self.tok.token_to_id(SPECIALS[role])
            ids[role] = found
        self.pad_id, self.bos_id, self.eos_id = ids["pad"], ids["bos"], ids["eos"]
        self._special = set(ids.values())
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids if int(i) not in self._special], skip_special_tokens=True)

    def save(self, directory: str, model_max_length: Optional[int] = None) -> None:
        os.makedirs(directory, exist_ok=True)
        self._save_hf_files(directory, _Tok.from_str(self.tok.to_str()), model_max_length)  # a copy: ours stays as is
        names = {r: self.tok.id_to_token(getattr(self, f"{r}_id")) for r in ("pad", "bos", "eos")}
        with open(os.path.join(directory, MARKER), "w") as f:
            json.dump({"type": "hf", **names}, f)


def byte_level_tokenizer() -> _Tok:
    """ByteTokenizer as a `tokenizers` model, for other tools: byte-level BPE without merges whose
    vocabulary is the 256 bytes at their own values (GPT-2's byte-to-unicode alphabet), plus
    <pad>/<s>/</s> = 256/257/258 as special tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = _bytes_to_unicode()
    assert set(byte_to_char.values()) == set(alphabet)
    vocab = {byte_to_char[b]: b for b in range(256)}
    tok = _Tok(models.BPE(vocab=vocab, merges=[]))
    # no regex split: a word boundary changes nothing without merges, and one piece is cheaper
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([SPECIALS["pad"], SPECIALS["bos"], SPECIALS["eos"]])
    return tok


def _bytes_to_unicode() -> dict:
    """GPT-2's reversible byte -> printable character map (the ByteLevel pre-tokenizer's)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _hf_names(directory: str) -> dict:
    """pad/bos/eos token strings from a HF tokenizer dir's config files, when present."""
    names: dict = {}
    for fn in ("special_tokens_map.json", "tokenizer_config.json", MARKER):
        p = os.path.join(directory, fn)
        if not os.path.isfile(p):
            continue
        with open(p) as f:
            d = json.load(f)
        for role in ("pad", "bos", "eos"):
            v = d.get(f"{role}_token", d.get(role))
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str) and role not in names:
                names[role] = v
    return names


def build_tokenizer(spec: str) -> Tokenizer:
    """'bytes', a tokenizer.json path, or a directory written by `save` / a local HF tokenizer."""
    if spec == "bytes":
        return ByteTokenizer()
    if os.path.isdir(spec):
        marker = os.path.join(spec, MARKER)
        if os.path.isfile(marker):
            with open(marker) as f:
                kind = json.load(f).get("type")
            if kind == "bytes":
                return ByteTokenizer()
            if kind == "hf_tower":  # an HF text tower's own tokenizer (mmpretrain.data.hf_tokenizer)
                from mmpretrain.data.hf_tokenizer import HFTowerTokenizer

                return HFTowerTokenizer(spec, "data.tokenizer")
        path = os.path.join(spec, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer directory '{spec}' has no tokenizer.json")
        return HFTokenizer(path, _hf_names(spec))
    if os.path.isfile(spec):
        return HFTokenizer(spec)
    raise FileNotFoundError(f"tokenizer '{spec}' is not 'bytes', a tokenizer.json file or a directory")
