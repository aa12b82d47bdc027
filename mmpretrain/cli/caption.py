"""Caption images and audio clips with a trained model (greedy, beam search or sampling).

    mmpretrain-caption --checkpoint runs/demo_caption --image a.png b.jpg --audio c.wav
    mmpretrain-caption --checkpoint EXPORT_DIR --data 'data/demo/eval/eval-000000.tar' --limit 8 --num-beams 3

Prints one line per input (`<modality>\t<name>\t<caption>`), or JSON lines with --json.
In a checkout `python tools/caption.py ...` runs the same.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import List, Optional, Sequence

from mmpretrain import modalities
from mmpretrain.cli import add_alias, tool_epilog
from mmpretrain.generation import generate_captions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmpretrain-caption", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=tool_epilog(
                                    "Unset decoding flags take the checkpoint's eval.generation values "
                                    "(mmpretrain-train --help-config\neval.generation lists them)."))
    p.add_argument("--checkpoint", required=True, help="export dir, checkpoint dir or run dir")
    p.add_argument("--image", nargs="*", default=[], help="image files")
    p.add_argument("--audio", nargs="*", default=[], help="audio files (wav / flac / ogg)")
    p.add_argument("--data", help="WebDataset shard URLs: caption each sample's image and audio")
    add_alias(p, "--shards", "--data")  # its spelling before the tools agreed on --data
    p.add_argument("--limit", type=int, default=0, help="at most this many shard samples (0 = all)")
    p.add_argument("--batch-size", type=int, default=32, help="inputs per generate call (default 32)")
    gen = p.add_argument_group("decoding", "each overrides the eval.generation key of the same name")
    gen.add_argument("--max-new-tokens", type=int, help="longest caption in tokens")
    gen.add_argument("--min-new-tokens", type=int, help="EOS is suppressed before this many tokens")
    gen.add_argument("--num-beams", type=int, help="beam search width (1 = greedy)")
    gen.add_argument("--length-penalty", type=float, help="beam score = sum log p / length ** length_penalty")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy / beam search (do_sample)")
    gen.add_argument("--temperature", type=float, help="sampling temperature")
    gen.add_argument("--top-k", type=int, help="sample among the k likeliest tokens (0 = off)")
    gen.add_argument("--top-p", type=float, help="nucleus sampling mass (1 = off)")
    gen.add_argument("--repetition-penalty", type=float, help="penalty on tokens generated so far (1 = off)")
    gen.add_argument("--seed", type=int, help="seed of the sampling generator")
    p.add_argument("--json", action="store_true", help="JSON lines output")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _gen_cfg(base, args):
    kw = {k: getattr(args, k) for k in ("max_new_tokens", "min_new_tokens", "num_beams", "length_penalty", "temperature",
                                         "top_k", "top_p", "repetition_penalty", "seed") if getattr(args, k) is not None}
    if args.sample:
        kw["do_sample"] = True
    return dataclasses.replace(base, **kw)


def _emit(rows: List[dict], as_json: bool) -> None:
    for r in rows:
        print(json.dumps(r) if as_json else f"{r['modality']}\t{r['name']}\t{r['caption']}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mmpretrain.evaluate import load_for_eval
    from mmpretrain.inference import InferenceModel

    args = parse_args(argv)
    if not (args.image or args.audio or args.data):
        print("error: give --image, --audio or --data", file=sys.stderr)
        return 2
    model, cfg, tok = load_for_eval(args.checkpoint)
    if model.decoder is None:
        print(f"error: {args.checkpoint} has no caption decoder (model.text.decoder_depth = 0)", file=sys.stderr)
        return 2
    gen = _gen_cfg(cfg.eval.generation, args)
    inf = InferenceModel(model, cfg, tok, next(model.parameters()).device)
    bs = max(1, args.batch_size)
    for mod in modalities.captioned():
        files = getattr(args, mod, None) or []
        for s in range(0, len(files), bs):
            chunk = files[s: s + bs]
            caps = generate_captions(model, tok, {mod: inf.preprocess(mod, chunk)}, cfg=gen)
            _emit([{"modality": mod, "name": f, "caption": c} for f, c in zip(chunk, caps)], args.json)
    if args.data:
        from mmpretrain.data.pipeline import build_eval_loader

        seen = 0
        for batch in build_eval_loader(args.data, cfg, tok, batch_size=bs):
            n = len(batch)
            if args.limit:
                n = min(n, args.limit - seen)
            rows = []
            for mod in modalities.captioned():
                idx = batch.masks[mod][:n].nonzero().flatten()
                if idx.numel():
                    caps = generate_captions(model, tok, {mod: batch.select(idx.tolist()).inputs[mod]}, cfg=gen)
                    rows += [{"modality": mod, "name": batch.keys[i], "caption": c} for i, c in zip(idx.tolist(), caps)]
            _emit(sorted(rows, key=lambda r: (r["name"], r["modality"])), args.json)
            seen += n
            if args.limit and seen >= args.limit:
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())
