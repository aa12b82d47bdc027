"""Issue 15: towers a run does not use are not built, and each tower encodes only the rows where its
modality is present. In process: the registry's choice, refusals, the present-rows forward against
the all-rows-with-masks forward in float64, an image-text data pipeline that decodes no audio,
evaluation and export of an image-text model. Under DeepSpeed: ZeRO-3 with a rank whose
micro-batches have no audio at all trains."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch

import trainkit as tk

sys.path.insert(0, str(Path(__file__).parent / "models"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import optional_towers  # noqa: E402
from tiny import fake_batch, tiny_cfg  # noqa: E402

from mmpretrain import modalities as M  # noqa: E402
from mmpretrain.config import ConfigError  # noqa: E402
from mmpretrain.engine import TrainModule  # noqa: E402
from mmpretrain.models import build_model  # noqa: E402

IMAGE_TEXT = ("model.audio.enabled=false",)  # a LAION-style run
NO_AUDIO_PAIRS = ("loss.pairs={audio_text: 0, image_audio: 0}", "loss.caption_weight=0")


def test_the_registry_builds_only_the_towers_a_run_uses():
    assert M.active_names(tiny_cfg()) == ["image", "audio", "text"]
    cfg = tiny_cfg(*IMAGE_TEXT)
    assert M.active_names(cfg) == ["image", "text"]
    assert [p.name for p in M.active_pairs(cfg)] == ["image_text"] and M.pair_weights(cfg) == {"image_text": 1.0}
    # no pair of weight > 0 and no captioning uses audio: left out without being told
    assert M.active_names(tiny_cfg(*NO_AUDIO_PAIRS)) == ["image", "text"]
    # captioning alone keeps a captioned modality's tower (its tokens feed the decoder)
    assert M.active_names(tiny_cfg("loss.pairs={audio_text: 0, image_audio: 0}")) == ["image", "audio", "text"]
    model = build_model(cfg, 259)
    assert not any(k.startswith(("towers.audio", "proj.audio")) or "audio" in k for k in model.state_dict()), \
        [k for k in model.state_dict() if "audio" in k][:3]
    assert model.decoder.modalities == ["image"]
    with pytest.raises(ValueError, match="no 'audio' tower"):
        model.encode_audio(torch.zeros(2, 1000))


@pytest.mark.parametrize("overrides, words", [
    (("model.audio.enabled=false", "loss.pairs.audio_text=1"), ["loss.pairs.audio_text", "'audio'", "enabled: false"]),
    (("model.text.enabled=false",), ["model.text.enabled", "anchor"]),
])
def test_a_pair_or_text_without_its_tower_is_refused(overrides, words):
    with pytest.raises(ConfigError) as e:
        tiny_cfg(*overrides)
    assert all(w in str(e.value) for w in words), str(e.value)


# the forward before issue 15 (every tower on every row, every caption row through the decoder,
# masks after): the benchmark's baseline, which this test holds to the same loss and gradients
_all_rows_forward = optional_towers.all_rows_forward


@pytest.mark.parametrize("drop", [("audio",), ("image", "text"), ("audio", "image")])
def test_present_rows_only_equals_all_rows_with_masks_in_float64(drop):
    """Same loss (1e-12) and same gradient of every parameter on a mixed batch, float64: towers and
    the caption decoder on present rows only against every row with masks after."""
    torch.manual_seed(0)
    cfg = tiny_cfg("model.attention_backend=reference")
    model = build_model(cfg, 259).double()
    batch = fake_batch(cfg, 6, drop=drop)
    batch.inputs = {k: v.double() if v.is_floating_point() else v for k, v in batch.inputs.items()}
    module = TrainModule(model, cfg)

    def loss_and_grads(forward):
        model.zero_grad()
        with _forward_as(model, forward):
            loss, metrics = module(batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, metrics

    new_loss, new_grads, new_m = loss_and_grads(None)
    old_loss, old_grads, old_m = loss_and_grads(_all_rows_forward)
    for k in ("loss/caption_image", "loss/caption_audio", "caption/tokens", "caption/token_acc", "loss/image_text"):
        assert abs(float(new_m[k]) - float(old_m[k])) < 1e-9, (k, float(new_m[k]), float(old_m[k]))
    assert torch.isfinite(new_loss) and abs(float(new_loss - old_loss)) < 1e-12, (float(new_loss), float(old_loss))
    assert new_grads.keys() == old_grads.keys() and len(new_grads) == len(list(model.parameters()))
    for n in new_grads:
        torch.testing.assert_close(new_grads[n], old_grads[n], atol=1e-12, rtol=1e-10, msg=n)


def test_a_tower_with_no_present_row_still_runs_and_gets_zero_gradients():
    """What keeps ZeRO's collectives in line: every parameter of the tower takes part, with a zero
    gradient, when no row of the batch has its modality."""
    cfg = tiny_cfg()
    model = build_model(cfg, 259)
    batch = fake_batch(cfg, 4)
    batch.masks["audio"][:] = False
    calls = []
    hook = model.towers["audio"].register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    loss, metrics = TrainModule(model, cfg)(batch)
    hook.remove()
    loss.backward()
    assert calls == [1]  # one row, multiplied by 0
    grads = [p.grad for p in model.towers["audio"].parameters()]
    assert all(g is not None and not g.any() for g in grads)
    assert float(metrics["pairs/audio_text"]) == 0 and float(metrics["pairs/image_text"]) == 4


@contextlib.contextmanager
def _forward_as(model, forward):
    if forward is None:
        yield
        return
    model.forward = lambda batch, captions=True: forward(model, batch)
    try:
        yield
    finally:
        del model.forward


def test_an_image_text_run_decodes_trains_evaluates_and_exports_without_audio(tiny_data, tmp_path):
    from mmpretrain.data import build_eval_loader, build_tokenizer, build_train_loader
    from mmpretrain.eval.suite import EvalOptions, EvalSuite

    cfg = tiny_cfg(*IMAGE_TEXT, f"data.train=[{{name: tiny, urls: '{tiny_data}/train/train-{{000000..000003}}.tar'}}]",
                   "data.num_workers=0")
    tok = build_tokenizer(cfg.data.tokenizer)
    loader = build_train_loader(cfg, 0, 1, tok)
    batch = next(loader)
    loader.close()
    assert "audio" not in batch.inputs and not batch.masks["audio"].any()  # never decoded, never batched
    assert batch.masks["image"].any()
    model = build_model(cfg, tok.vocab_size)
    module = TrainModule(model, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss, metrics = module(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(metrics["loss/contrastive"]))
    assert losses[-1] < losses[0], losses
    assert set(k for k in metrics if k.startswith("loss/")) == {"loss/image_text", "loss/contrastive", "loss/caption",
                                                                "loss/caption_image"}
    res = EvalSuite(model, cfg, tok).run(f"{tiny_data}/eval/eval-000000.tar", EvalOptions(tasks=("retrieval",)))
    keys = set(res["retrieval"])
    assert "image_to_text/R@1" in keys and not any("audio" in k for k in keys), sorted(keys)[:6]
    assert build_eval_loader(f"{tiny_data}/eval/eval-000000.tar", cfg, tok, 4).plan.active == ("image", "text")
    # an image-text model maps onto a CLIPModel as far as towers go (the tiny conv stem does not):
    # the audio tower's absence changes nothing, the image tower's is the reason
    from mmpretrain.export_clip import clip_incompatibility

    assert clip_incompatibility(cfg, tok) == clip_incompatibility(tiny_cfg(), tok)
    assert clip_incompatibility(tiny_cfg("model.vision.enabled=false"), tok) == "no image or no text tower"


@pytest.mark.distributed
def test_zero3_trains_when_one_rank_never_sees_audio(tiny_data, tmp_path):
    """Rank 1's micro-batches have no audio at all (a faultkit hook clears its audio masks): its
    audio tower runs on one row times 0 each step, so ZeRO-3's parameter gathers line up."""
    import faultkit

    out, log = tmp_path / "run", tmp_path / "run.log"
    over = tk.tiny_overrides(out, tiny_data, "train.zero_stage=3", "train.steps=6", faultkit.plugin("no_audio_on_rank1"))
    assert tk.run("torchrun", 2, over, log, timeout=240) == 0, log.read_text()[-3000:]
    rows = tk.train_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # rank 1 contributed no audio pair: the global count is rank 0's present audio rows only
    assert all(0 < r["pairs/audio_text"] <= 8 for r in rows), [r["pairs/audio_text"] for r in rows]
    assert all(r["pairs/image_text"] > 8 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]
