"""Train a byte-level BPE tokenizer (`tokenizers`) on the captions of WebDataset shards.

Example: python tools/train_tokenizer.py --data 'data/train-{000..009}.tar' --vocab-size 8000 --out tok/
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterator, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from mmpretrain.data.shards import expand_urls, read_shard  # noqa: E402
from mmpretrain.data.tokenizer import SPECIALS, build_tokenizer  # noqa: E402


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


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="shard urls (brace expansion, '::' separated groups)")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--out", required=True, help="output directory (tokenizer.json)")
    ap.add_argument("--limit", type=int, default=None, help="use at most this many captions")
    args = ap.parse_args(argv)
    out = train(args.data, args.vocab_size, args.out, args.limit)
    tok = build_tokenizer(out)
    print(f"wrote {out}: vocab {tok.vocab_size}, pad/bos/eos = {tok.pad_id}/{tok.bos_id}/{tok.eos_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
