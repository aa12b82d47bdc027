"""`python -m mmpretrain.evaluate --checkpoint DIR --data URLS [...]`: retrieval, zero-shot
classification, linear probes and captioning of a trained model, printed as JSON.

DIR is an export (model.safetensors + config.json + tokenizer), a training checkpoint
(`checkpoints/step_N`), or a run directory (its latest checkpoint). Runs on one process or
under any launcher (torchrun / deepspeed): each rank embeds its share of the data."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from mmpretrain import distributed as D
from mmpretrain.config import Config, GenerationConfig

log = logging.getLogger("mmpretrain.evaluate")
TASKS = ("retrieval", "zeroshot", "linear_probe", "captioning")


# ----------------------------------------------------------------------------- the work


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, cfg: Config, tokenizer, urls: str, device: Optional[torch.device] = None,
                   dtype: torch.dtype = torch.float32, tasks: Sequence[str] = TASKS, batch_size: int = 64,
                   class_names: Optional[Sequence[str]] = None, templates: Optional[Sequence[str]] = None,
                   probe_train_urls: Optional[str] = None, caption_samples: Optional[int] = None,
                   gen_cfg: Optional[GenerationConfig] = None, caption_attributes: Optional[str] = None,
                   embedded: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, Any]:
    """Every requested task on the samples of `urls` (each rank reads its share; call on every rank).

    retrieval: R@1/5/10, median / mean rank per direction, class-level when every sample has a
    label (a hit is any item of the query's class) and instance-level (`retrieval_instance`).
    zeroshot: class names (default: classes.json beside the shards) x templates. linear_probe:
    trained on `probe_train_urls`, else on a stratified half of `urls`, tested on the rest.
    captioning: needs a decoder; `caption_samples` per modality (0 = all). `embedded`: reuse a
    finished embed pass (the output of eval.runner.embed_split gathered over ranks)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return _evaluate(model, cfg, tokenizer, urls, device, dtype, tasks, batch_size, class_names, templates,
                         probe_train_urls, caption_samples, gen_cfg, caption_attributes, embedded)
    finally:
        model.train(was_training)


def _evaluate(model, cfg, tokenizer, urls, device, dtype, tasks, batch_size, class_names, templates, probe_train_urls,
              caption_samples, gen_cfg, caption_attributes, embedded) -> Dict[str, Any]:
    from mmpretrain.data.pipeline import build_eval_loader
    from mmpretrain.eval.retrieval import gather_features, retrieval_report
    from mmpretrain.eval.runner import embed_split

    ev = cfg.eval
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; choose from {list(TASKS)}")
    rank, world = D.rank(), D.world_size()

    def loader(u: str):
        return build_eval_loader(u, cfg, tokenizer, batch_size=batch_size, rank=rank, world_size=world)

    result: Dict[str, Any] = {}
    need_emb = {"retrieval", "zeroshot", "linear_probe"} & set(tasks)
    full = embedded
    if need_emb and full is None:
        local = embed_split(model, loader(urls), device, dtype)
        full = {k: gather_features(v) for k, v in local.items()}
    labels = None
    if full is not None:
        result["num_samples"] = int(full["label"].numel())
        if full["label"].numel() and bool((full["label"] >= 0).all()):
            labels = full["label"]
        emb = {m: full[m] for m in ("image", "audio", "text")}
        masks = {m: full[f"{m}_mask"].bool() for m in ("image", "audio", "text")}
    if "retrieval" in tasks:
        result["retrieval"] = retrieval_report(emb, masks, labels)
        if labels is not None:
            result["retrieval_instance"] = retrieval_report(emb, masks, None)
    if "zeroshot" in tasks:
        result["zeroshot"] = _zeroshot(model, cfg, tokenizer, urls, device, full, masks, class_names, templates)
    if "linear_probe" in tasks:
        result["linear_probe"] = _probe(model, cfg, urls, probe_train_urls, device, dtype, loader, full, masks, class_names)
    if "captioning" in tasks:
        if getattr(model, "decoder", None) is None:
            result["captioning"] = {"skipped": "model has no caption decoder (model.text.decoder_depth = 0)"}
        else:
            from mmpretrain.eval.captioning import caption_split, captioning_report

            n = ev.caption_samples if caption_samples is None else caption_samples
            recs = caption_split(model, loader(urls), tokenizer, device, dtype, gen_cfg or ev.generation, n)
            result["captioning"] = captioning_report(recs, caption_attributes or ev.caption_attributes)
    return result


def _zeroshot(model, cfg, tokenizer, urls, device, full, masks, class_names, templates) -> Dict[str, Any]:
    from mmpretrain.eval.zeroshot import class_embeddings, load_class_names, zeroshot_report

    names = list(class_names) if class_names else load_class_names(cfg.eval.class_names, urls)
    labels = full["label"]
    if not names:
        return {"skipped": "no class names (eval.class_names / --class-names, or classes.json beside the shards)"}
    if not bool((labels >= 0).any()):
        return {"skipped": "no sample has a json label"}
    tmpl = list(templates) if templates else list(cfg.eval.templates)
    cls = class_embeddings(model, tokenizer, names, tmpl, cfg.data.text_max_len, device)
    rep = zeroshot_report({m: full[m] for m in ("image", "audio")}, masks, labels, cls)
    rep["classes"] = names
    rep["templates"] = tmpl
    return rep


def _probe(model, cfg, urls, probe_train_urls, device, dtype, loader, full, masks, class_names) -> Dict[str, Any]:
    from mmpretrain.eval.linear_probe import linear_probe_report, stratified_split
    from mmpretrain.eval.retrieval import gather_features
    from mmpretrain.eval.runner import embed_split

    if not bool((full["label"] >= 0).any()):
        return {"skipped": "no sample has a json label"}
    if probe_train_urls:
        tr_full = {k: gather_features(v) for k, v in embed_split(model, loader(probe_train_urls), device, dtype).items()}
        both = {k: torch.cat([tr_full[k], full[k]]) for k in full}
        n_tr = tr_full["label"].numel()
        tr_idx = torch.arange(n_tr).numpy()
        te_idx = torch.arange(n_tr, n_tr + full["label"].numel()).numpy()
        split = f"train on {probe_train_urls}"
    else:
        both = full
        tr_idx, te_idx = stratified_split(full["label"].tolist(), 0.5, seed=cfg.run.seed)
        split = "stratified 50/50 split of the eval data"
    labels = both["label"]
    num_classes = max(int(labels.max()) + 1, len(class_names or []))
    bm = {m: both[f"{m}_mask"].bool() for m in ("image", "audio")}
    rep: Dict[str, Any] = linear_probe_report({m: both[m] for m in ("image", "audio")}, bm, labels, num_classes,
                                              tr_idx, te_idx)
    rep["split"] = split
    return rep


# ----------------------------------------------------------------------------- loading


def load_for_eval(path: str, device: Optional[torch.device] = None) -> Tuple[torch.nn.Module, Config, Any]:
    """(model in eval mode, config, tokenizer) from an export, a checkpoint or a run directory.
    DeepSpeed's checkpoint converter prints to stdout; that goes to stderr here (stdout is JSON)."""
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):
        return _load_for_eval(path, device)


def _load_for_eval(path: str, device: Optional[torch.device]) -> Tuple[torch.nn.Module, Config, Any]:
    from mmpretrain.config import load_config
    from mmpretrain.data.tokenizer import build_tokenizer
    from mmpretrain.models import build_model

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    if (p / "model.safetensors").is_file():
        from mmpretrain import inference

        loaded = inference.load(p, device or "cpu")
        return loaded.model, loaded.cfg, loaded.tokenizer
    from mmpretrain import checkpoint as ckpt_lib

    ckpt = ckpt_lib.resolve_checkpoint(p)
    cfg = load_config(str(ckpt / "config.yaml"))
    tok = build_tokenizer(cfg.data.tokenizer)
    model = build_model(cfg, tok.vocab_size)
    ckpt_lib.load_state_checked(model, ckpt_lib.consolidated_state_dict(ckpt), ckpt)
    return model.to(device or "cpu").eval(), cfg, tok


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmpretrain.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="export dir, checkpoint dir or run dir")
    p.add_argument("--data", required=True, help="eval shard URLs (brace patterns, dirs, `a::b`)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--class-names", help="json list (or text file, one a line) of class names in label order")
    p.add_argument("--templates", nargs="+", help="prompt templates with {} for the class name")
    p.add_argument("--probe-train", help="shard URLs to train the linear probe on (default: half of --data)")
    p.add_argument("--caption-samples", type=int, help="captions per modality (0 = all; default eval.caption_samples)")
    p.add_argument("--caption-attributes", choices=["demo"], help="also score the demo data's attribute words")
    p.add_argument("--num-beams", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.num_workers=0")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import dataclasses

    from mmpretrain.config import ConfigError, from_dict, to_dict

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    info = D.discover()
    if info.world_size > 1:
        D.init(info)
    device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        model, cfg, tok = load_for_eval(args.checkpoint, device)
        if args.overrides:
            from omegaconf import OmegaConf

            merged = OmegaConf.merge(OmegaConf.create(to_dict(cfg)), OmegaConf.from_dotlist(args.overrides))
            cfg = from_dict(OmegaConf.to_container(merged))
    except (ConfigError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from mmpretrain.ops.attention import set_backend

    set_backend(cfg.model.attention_backend if cfg.model.attention_backend != "triton" or device.type == "cuda" else "auto")
    gen = cfg.eval.generation
    if args.num_beams is not None:
        gen = dataclasses.replace(gen, num_beams=args.num_beams)
    if args.max_new_tokens is not None:
        gen = dataclasses.replace(gen, max_new_tokens=args.max_new_tokens)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    names = None
    if args.class_names:
        from mmpretrain.eval.zeroshot import load_class_names

        names = load_class_names(args.class_names)
    res = evaluate_model(model, cfg, tok, args.data, device=device, tasks=tasks, batch_size=args.batch_size,
                         class_names=names, templates=args.templates, probe_train_urls=args.probe_train,
                         caption_samples=args.caption_samples, gen_cfg=gen, caption_attributes=args.caption_attributes)
    res = {"checkpoint": args.checkpoint, "data": args.data, **res}
    if info.is_main:
        text = json.dumps(res, indent=1)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
    D.barrier()
    return 0


def periodic_extras(model: torch.nn.Module, cfg: Config, tokenizer, device: torch.device, dtype: torch.dtype,
                    embedded: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, Any]:
    """The eval-during-training extras that cfg.eval turns on (zero-shot, linear probe, captioning),
    flattened to 'zeroshot/image/accuracy'-style keys, plus a few generated captions."""
    tasks = [t for t, on in (("zeroshot", cfg.eval.zeroshot), ("linear_probe", cfg.eval.linear_probe),
                             ("captioning", cfg.eval.captioning and getattr(model, "decoder", None) is not None)) if on]
    if not tasks or not cfg.data.eval_urls:
        return {}
    res = evaluate_model(model, cfg, tokenizer, cfg.data.eval_urls, device, dtype, tasks,
                         batch_size=cfg.train.micro_batch_size, embedded=embedded)
    res.pop("num_samples", None)
    flat = {k: v for k, v in flatten(res).items() if "confusion_matrix" not in k}
    for m, r in res.get("captioning", {}).items():
        if isinstance(r, dict) and r.get("examples"):
            flat[f"captioning/{m}/examples"] = [f"{e['prediction']} | {e['reference']}" for e in r["examples"][:4]]
    return flat


def summary_lines(flat: Dict[str, Any]) -> list:
    """Console lines for a flat eval record: zero-shot / probe accuracy, caption scores and examples."""
    lines = []
    for m in ("image", "audio"):
        parts = [f"{name} {flat[k]:.3f}" for name, k in (
            ("zero-shot acc", f"zeroshot/{m}/accuracy"), ("zero-shot F1", f"zeroshot/{m}/macro_f1"),
            ("probe acc", f"linear_probe/{m}/accuracy"), ("caption BLEU", f"captioning/{m}/BLEU"),
            ("CIDEr", f"captioning/{m}/CIDEr"), ("attributes", f"captioning/{m}/attribute_accuracy/all"))
            if k in flat]
        if parts:
            lines.append(f"{m}: " + ", ".join(parts))
        for ex in flat.get(f"captioning/{m}/examples", [])[:4]:
            lines.append(f"{m} caption: {json.dumps(ex, ensure_ascii=False)}")  # escapes control bytes
    return lines


def flatten(res: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested result -> flat 'a/b/c' keys with numbers only (for metrics.jsonl)."""
    out: Dict[str, Any] = {}
    for k, v in res.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
    return out


if __name__ == "__main__":
    sys.exit(main())
