"""Caption images and audio clips with a trained model (greedy, beam search or sampling).

    python tools/caption.py --checkpoint runs/demo_caption --image a.png b.jpg --audio c.wav
    python tools/caption.py --checkpoint EXPORT_DIR --shards 'data/demo/eval/eval-000000.tar' --limit 8 --num-beams 3

Prints one line per input (`<modality>\t<name>\t<caption>`), or JSON lines with --json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmpretrain import modalities  # noqa: E402
from mmpretrain.generation import generate_captions  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="export dir, checkpoint dir or run dir")
    p.add_argument("--image", nargs="*", default=[], help="image files")
    p.add_argument("--audio", nargs="*", default=[], help="audio files (wav / flac / ogg)")
    p.add_argument("--shards", help="WebDataset shard URLs: caption each sample's image and audio")
    p.add_argument("--limit", type=int, default=0, help="at most this many shard samples (0 = all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--min-new-tokens", type=int)
    p.add_argument("--num-beams", type=int)
    p.add_argument("--length-penalty", type=float)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy / beam search")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--json", action="store_true", help="JSON lines output")
    return p.parse_args(argv)


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
    if not (args.image or args.audio or args.shards):
        print("error: give --image, --audio or --shards", file=sys.stderr)
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
    if args.shards:
        from mmpretrain.data.pipeline import build_eval_loader

        seen = 0
        for batch in build_eval_loader(args.shards, cfg, tok, batch_size=bs):
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
