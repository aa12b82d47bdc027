"""Captioning eval: generate captions for an eval split (per modality, across ranks) and score
them: corpus BLEU (sacrebleu), CIDEr-D (pycocoevalcap's scorer, pure Python, when installed),
exact match, and for the demo data whether the caption names the right attributes."""
from __future__ import annotations

import contextlib
import re
from typing import Any, Dict, List, Optional, Sequence

import torch

from mmpretrain import distributed as D
from mmpretrain import modalities as M
from mmpretrain.config import GenerationConfig
from mmpretrain.data import demo
from mmpretrain.generation import generate_captions
from mmpretrain.models import build_model

_PUNCT = re.compile(r"[^\w\s-]")


def normalize_caption(s: str) -> str:
    """Lower case, punctuation removed (hyphens kept), single spaces: the tokenization used for
    CIDEr and exact match (a Python stand-in for the PTB tokenizer, which needs Java)."""
    return " ".join(_PUNCT.sub(" ", s.lower()).split())


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 in [0, 100] (sacrebleu: 13a tokenization, exp smoothing) with effective
    order: n-gram orders absent from the whole corpus are left out (captions of three words
    have no 4-grams; plain BLEU-4 would be 0 even for perfect captions)."""
    from sacrebleu.metrics import BLEU  # the [eval] extra: only captioning needs it

    n_refs = max(len(r) for r in references)
    streams = [[r[i] if i < len(r) else r[0] for r in references] for i in range(n_refs)]
    return float(BLEU(effective_order=True).corpus_score(list(predictions), streams).score)


def cider(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> Optional[float]:
    """CIDEr-D (x1 scale, as the COCO toolkit reports it) with idf from these references;
    None when pycocoevalcap is not installed."""
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        return None
    gts = {i: [normalize_caption(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [normalize_caption(p)] for i, p in enumerate(predictions)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def caption_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> Dict[str, Any]:
    """{'BLEU', 'CIDEr' (when available), 'exact_match', 'num_samples'}; references: list per sample."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        return {"num_samples": 0}
    out: Dict[str, Any] = {"BLEU": bleu(predictions, references)}
    c = cider(predictions, references)
    if c is not None:
        out["CIDEr"] = c
    out["exact_match"] = sum(normalize_caption(p) in {normalize_caption(r) for r in refs}
                             for p, refs in zip(predictions, references)) / len(predictions)
    out["num_samples"] = len(predictions)
    return out


# ----------------------------------------------------------------------------- attributes


def find_attribute(text: str, phrases: Sequence[str]) -> Optional[str]:
    """The phrase of `phrases` that occurs in `text` as whole words, longest first (so 'very high'
    wins over 'high'); None if none or if two different phrases occur (ambiguous)."""
    t = f" {normalize_caption(text)} "
    found = []
    for p in sorted(phrases, key=len, reverse=True):
        pat = f" {normalize_caption(p)} "
        if pat in t:
            found.append(p)
            t = t.replace(pat, " ")
    return found[0] if len(found) == 1 else None


def attribute_accuracy(predictions: Sequence[str], references: Sequence[str],
                       groups: Dict[str, Sequence[str]]) -> Dict[str, float]:
    """Per group, the share of samples whose prediction names the reference's attribute (and no
    other of the group), and 'all': the share getting every group right."""
    if not predictions:
        return {}
    hits = {g: 0 for g in groups}
    all_ok = 0
    for p, r in zip(predictions, references):
        ok = True
        for g, phrases in groups.items():
            want = find_attribute(r, phrases)
            got = find_attribute(p, phrases)
            good = want is not None and got == want
            hits[g] += good
            ok &= good
        all_ok += ok
    out = {g: h / len(predictions) for g, h in hits.items()}
    out["all"] = all_ok / len(predictions)
    return out


def demo_attribute_groups(modality: str) -> Dict[str, List[str]]:
    """Attribute vocabularies of the demo data's image and audio captions."""
    if modality == "image":
        return {"colour": list(demo.COLOURS), "shape": list(demo.SHAPES)}
    return {"timbre": list(demo.WAVE_WORDS.values()), "pitch": list(demo.PITCH_WORD.values())}


# ----------------------------------------------------------------------------- generation over a split


@contextlib.contextmanager
def _generation_model(model: torch.nn.Module):
    """The model to decode with. Under ZeRO-3 every forward is collective and its parameter
    prefetching follows a recorded module order, so ranks decoding different lengths would
    deadlock: gather the weights once and decode with a plain replica on each rank instead."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield model
        return
    # lazy: importing DeepSpeed logs to stdout (its handler binds sys.stdout at import), and the eval
    # and caption CLIs print JSON there; ZeRO-3 parameters mean DeepSpeed is loaded already anyway
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        state = {n: p.detach().clone() for n, p in model.named_parameters()}
    replica = build_model(model.cfg, model.vocab_size)
    replica.load_state_dict(state)  # the only buffers (mel filters) are non-persistent, rebuilt above
    yield replica.to(params[0].device).eval()


@torch.no_grad()
def caption_split(model: torch.nn.Module, loader, tokenizer, device: torch.device, dtype: torch.dtype,
                  gen_cfg: Optional[GenerationConfig] = None, max_samples: int = 0,
                  modalities: Optional[Sequence[str]] = None) -> Dict[str, List[Dict[str, str]]]:
    """Caption each captioned modality of this rank's samples (at most max_samples / world per rank
    when max_samples > 0) and gather every rank's records: {m: [{'key', 'prediction', 'reference'}]}."""
    if modalities is None:  # the captioned modalities this model's decoder reads
        dec = getattr(model, "decoder", None)
        modalities = list(dec.modalities) if dec is not None and hasattr(dec, "modalities") else M.captioned()
    modalities = list(modalities)
    per_rank = -(-max_samples // D.world_size()) if max_samples > 0 else None
    recs: Dict[str, List[Dict[str, str]]] = {m: [] for m in modalities}
    was = model.training
    model.eval()
    with _generation_model(model) as gm:
        for batch in loader:
            for m in modalities:
                have = batch.masks[m].bool() & (batch.caption_len[m] > 1)
                if per_rank is not None:
                    room = per_rank - len(recs[m])
                    idx = have.nonzero().flatten()[: max(room, 0)]
                else:
                    idx = have.nonzero().flatten()
                if idx.numel() == 0:
                    continue
                x = batch.select(idx.tolist()).to(device, dtype).inputs[m]
                preds = generate_captions(gm, tokenizer, {m: x}, cfg=gen_cfg)
                for j, i in enumerate(idx.tolist()):
                    ids = batch.captions[m][i, 1: int(batch.caption_len[m][i]) - 1].tolist()
                    recs[m].append({"key": batch.keys[i], "prediction": preds[j], "reference": tokenizer.decode(ids)})
            if per_rank is not None and all(len(v) >= per_rank for v in recs.values()):
                break
    model.train(was)
    if D.world_size() > 1:
        gathered: List[Any] = [None] * D.world_size()
        torch.distributed.all_gather_object(gathered, recs)
        recs = {m: [r for g in gathered for r in g[m]] for m in modalities}
    return recs


def captioning_report(records: Dict[str, List[Dict[str, str]]], attributes: Optional[str] = None,
                      examples: int = 8) -> Dict[str, Any]:
    """Metrics per modality from caption_split's records (+ attribute accuracy for 'demo') and the
    first `examples` (prediction, reference) pairs."""
    out: Dict[str, Any] = {}
    for m, recs in records.items():
        if not recs:
            continue
        preds = [r["prediction"] for r in recs]
        refs = [r["reference"] for r in recs]
        res = caption_metrics(preds, [[r] for r in refs])
        if attributes == "demo":
            res["attribute_accuracy"] = attribute_accuracy(preds, refs, demo_attribute_groups(m))
        res["examples"] = recs[:examples]
        out[m] = res
    return out
