"""Class-level hits of a trained model on the real-signal eval split, per held-out voice variant and
as digit confusions (tools/make_realsignal_data.py writes the json `voice` and `label` it reads).

Example: python tools/realsignal_report.py runs/realsignal data/realsignal/eval/eval-000000.tar --ema
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tarfile
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mmpretrain.data.pipeline import build_eval_loader  # noqa: E402
from mmpretrain.loading import load  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    # the whole docstring (its first line alone dropped the rest)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run dir, checkpoint or export")
    ap.add_argument("shard", help="the eval tar (one file)")
    ap.add_argument("--ema", action="store_true", help="the checkpoint's EMA weights (train.ema)")
    a = ap.parse_args(argv)
    loaded = load(a.run, ema=a.ema)
    voice = {}
    with tarfile.open(a.shard) as tf:
        for m in tf.getmembers():
            if m.name.endswith(".json"):
                voice[m.name.split(".")[0]] = json.loads(tf.extractfile(m).read()).get("voice", "? ?")
    emb, keys, labels = collections.defaultdict(list), [], []
    with torch.no_grad():
        for b in build_eval_loader(a.shard, loaded.cfg, loaded.tokenizer, batch_size=100, rank=0, world_size=1):
            for m in ("image", "audio", "text"):
                out = loaded.model.encode(m, b.inputs[m], b.text_len if m == "text" else None)
                emb[m].append(F.normalize(out.float(), dim=-1))
            keys += b.keys
            labels.append(b.labels)
    e = {m: torch.cat(v) for m, v in emb.items()}
    y = torch.cat(labels)
    pred = {(q, g): y[(e[q] @ e[g].T).argmax(1)] for q, g in
            (("image", "audio"), ("image", "text"), ("audio", "text"), ("audio", "image"))}
    for (q, g), p in pred.items():
        print(f"{q}->{g} R@1 {float((p == y).float().mean()):.3f}")
    hits = collections.defaultdict(list)
    for k, ok in zip(keys, (pred["audio", "text"] == y).tolist()):
        hits[voice[k].split()[0].split("+")[-1]].append(ok)
    print("audio->text by held-out voice variant (worst first):")
    for share, name, n in sorted((sum(v) / len(v), k, len(v)) for k, v in hits.items()):
        print(f"  {name:<16} {share:.2f} of {n}")
    for q, g in (("audio", "text"), ("image", "text")):
        conf = collections.Counter((t, p) for t, p in zip(y.tolist(), pred[q, g].tolist()) if t != p)
        print(f"{q}->{g} confusions (true, predicted): count:", dict(conf.most_common(8)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
