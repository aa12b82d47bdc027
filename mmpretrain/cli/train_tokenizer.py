"""Train a byte-level BPE tokenizer (`tokenizers`) on the captions of WebDataset shards.

Example: mmpretrain-train-tokenizer --data 'data/train-{000..009}.tar' --vocab-size 8000 --out tok/
(in a checkout also: python tools/train_tokenizer.py ...)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterator, List, Optional

from mmpretrain.cli import tool_epilog
from mmpretrain.data.shards import expand_urls, read_shard
from mmpretrain.data.tokenizer import SPECIALS, build_tokenizer


def captions(urls: str, limit: Optional[int] = None) -> Iterator[str]:
    """Every caption field found in the shards' .txt / .json members (bad ones skipped)."""
    n = 0
    for url in expand_urls(urls):
        for raw in read_shard(url):
            texts = []
            if "txt" in raw.files:
                texts.append(raw.files["txt"].decode("utf-8", errors="ignore"))
            if "json" in raw.files:
                try:
                    meta = json.loads(raw.files["json"].decode("utf-8"))
                    texts += [meta[k] for k in ("caption", "caption_image", "caption_audio")
                              if isinstance(meta, dict) and isinstance(meta.get(k), str)]
                except (UnicodeDecodeError, json.JSONDecodeError):
                    pass
            for t in texts:
                if t.strip():
                    yield t.strip()
                    n += 1
                    if limit is not None and n >= limit:
                        return


def train(urls: str, vocab_size: int, out: str, limit: Optional[int] = None) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [SPECIALS["pad"], SPECIALS["bos"], SPECIALS["eos"]]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True)
    tok.train_from_iterator(captions(urls, limit), trainer=trainer)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "tokenizer.json")
    tok.save(path)
    build_tokenizer(path).save(out)  # adds the marker naming pad/bos/eos
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mmpretrain-train-tokenizer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=tool_epilog(
                                     "Train with data.tokenizer=OUT/tokenizer.json (data.text_max_len counts its "
                                     "tokens)."))
    ap.add_argument("--data", required=True, help="shard urls (brace expansion, '::' separated groups)")
    ap.add_argument("--vocab-size", type=int, default=8000, help="tokens in the vocabulary, specials included (default 8000)")
    ap.add_argument("--out", required=True, help="output directory (tokenizer.json)")
    ap.add_argument("--limit", type=int, default=None, help="use at most this many captions")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    out = train(args.data, args.vocab_size, args.out, args.limit)
    tok = build_tokenizer(out)
    print(f"wrote {out}: vocab {tok.vocab_size}, pad/bos/eos = {tok.pad_id}/{tok.bos_id}/{tok.eos_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
