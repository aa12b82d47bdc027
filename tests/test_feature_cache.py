"""Feature cache: under DeepSpeed accumulation (2 gloo processes x 3 micro-batches, ZeRO 2 and
3) the gradient equals that of one process on the whole big batch, contrastive and captioning
terms together; plain accumulation does not (so the comparison can fail)."""
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "models"))
from tiny import fake_batch, tiny_cfg  # noqa: E402
from trainkit import free_port  # noqa: E402

from mmpretrain.modalities import Batch  # noqa: E402

WORLD, ACCUM, MB = 2, 3, 4
DROP = ("audio", "text")
OVERRIDES = ("train.grad_clip=0", "optim.weight_decay=0", "loss.pairs.audio_text=0.7", "loss.caption_weight=2.0")


def _batches(rank):
    return [fake_batch(tiny_cfg(), MB, seed=10 * rank + i, drop=DROP[i % 2: i % 2 + 1]) for i in range(ACCUM)]


def _concat(batches):
    """The batches' rows one after another, as one Batch."""
    def cat(field):
        return {k: torch.cat([getattr(b, field)[k] for b in batches]) for k in getattr(batches[0], field)}

    return Batch(keys=[k for b in batches for k in b.keys], sources=[s for b in batches for s in b.sources],
                 epochs=[e for b in batches for e in b.epochs], inputs=cat("inputs"), masks=cat("masks"),
                 text_len=torch.cat([b.text_len for b in batches]), captions=cat("captions"),
                 caption_len=cat("caption_len"), labels=torch.cat([b.labels for b in batches]))


def _fresh_model(cfg):
    from mmpretrain.models import build_model

    torch.manual_seed(0)
    return build_model(cfg, 259)


def _worker(rank, port, out_file, stages):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from mmpretrain.engine import build_engine
    from mmpretrain.feature_cache import FeatureCache

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    results = {}
    for stage in stages:
        for cached in ((True, False) if stage == stages[0] else (True,)):
            cfg = tiny_cfg(*OVERRIDES, f"train.zero_stage={stage}", f"train.grad_accum={ACCUM}",
                           f"train.micro_batch_size={MB}", "loss.feature_cache=true")
            engine, _, _ = build_engine(cfg, _fresh_model(cfg), WORLD)
            batches = _batches(rank)
            cache = FeatureCache.build(engine.module.model, batches) if cached else None
            losses = []
            for i, b in enumerate(batches):
                kw = {"feature_cache": cache, "micro_index": i} if cached else {}
                loss, metrics = engine(b, **kw)
                engine.backward(loss)
                if i < ACCUM - 1:
                    engine.step()  # not a boundary: only counts the micro-step, as the train loop does
                losses.append(float(metrics["loss"]))
            assert engine.is_gradient_accumulation_boundary()
            grads = {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.model.named_parameters()}
            results[(stage, cached)] = {"grads": grads, "loss": losses}
            engine.destroy() if hasattr(engine, "destroy") else None
    if rank == 0:
        torch.save(results, out_file)
    torch.distributed.barrier()


@pytest.mark.distributed
def test_feature_cache_gradient_equals_big_batch(tmp_path):
    from mmpretrain.engine import TrainModule

    stages = (2, 3)
    out = tmp_path / "grads.pt"
    mp.spawn(_worker, args=(free_port(), str(out), stages), nprocs=WORLD, join=True)
    res = torch.load(out, weights_only=False)
    cfg = tiny_cfg(*OVERRIDES)
    model = _fresh_model(cfg)
    big = _concat([b for r in range(WORLD) for b in _batches(r)])  # 24 samples, rank-major
    loss, metrics = TrainModule(model, cfg)(big)
    loss.backward()
    ref = {n: p.grad for n, p in model.named_parameters()}
    assert float(metrics["loss/caption"]) > 0 and float(metrics["loss/contrastive"]) > 0
    for stage in stages:
        got = res[(stage, True)]
        for n, g in ref.items():
            torch.testing.assert_close(got["grads"][n], g, rtol=2e-4, atol=2e-6, msg=lambda m: f"stage {stage} {n}: {m}")
        # each micro-batch reports the big-batch contrastive loss (its own caption loss): the mean is exact
        assert sum(got["loss"]) / ACCUM == pytest.approx(float(metrics["loss"]), rel=0.05)
        if (stage, False) not in res:
            continue
        # plain accumulation averages micro-batch losses: different gradient
        plain = res[(stage, False)]["grads"]
        diff = max(float((plain[n] - g).abs().max() / (g.abs().max() + 1e-12)) for n, g in ref.items()
                   if "logit_scale" in n or "proj" in n)
        assert diff > 1e-2


def test_rng_replay_reproduces_cached_features_with_dropout():
    from mmpretrain.feature_cache import FeatureCache

    cfg = tiny_cfg("model.dropout=0.2")
    model = _fresh_model(cfg).train()
    batches = _batches(0)
    cache = FeatureCache.build(model, batches)
    before = torch.get_rng_state()
    for i, b in enumerate(batches):
        with cache.replay_rng(i):
            out = model(b)
        s = cache.offsets[i]
        for m in ("image", "audio", "text"):
            torch.testing.assert_close(out.embeddings[m], cache.features[m][s: s + MB], rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), before)  # the surrounding stream is untouched
    other = model(batches[1])  # without the replay dropout differs: the check above has teeth
    assert not torch.allclose(other.embeddings["image"], cache.features["image"][MB: 2 * MB])
