"""AdamW parameter groups (engine.param_groups): decay by tensor rank with an explicit list of
embeddings that never decay, checked on the real model built from the tiny test config
(which has a captioning decoder)."""
import os
import sys

import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "models"))
from tiny import tiny_cfg  # noqa: E402

from mmpretrain.engine import is_no_decay_embedding, param_groups  # noqa: E402
from mmpretrain.models import build_model  # noqa: E402


def _groups():
    cfg = tiny_cfg()
    assert cfg.model.text.decoder_depth > 0 and cfg.model.text.decoder_queries > 0
    module = nn.Module()  # named like engine.TrainModule, which build_engine groups: "model.<...>"
    module.model = build_model(cfg, 259)
    groups = param_groups(module, 0.1)
    names = {id(p): n for n, p in module.named_parameters()}
    return module, groups, names


def test_every_parameter_is_in_exactly_one_group():
    module, groups, names = _groups()
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in module.parameters()}


def test_decay_by_rank_with_embeddings_exempt():
    module, groups, names = _groups()
    decayed = {names[id(p)] for p in groups[0]["params"]}
    kept = {names[id(p)] for p in groups[1]["params"]}
    mods = dict(module.named_modules())
    params = dict(module.named_parameters())

    def of(kind):
        return [m for m, mod in mods.items() if isinstance(mod, kind)]

    # every linear / conv weight decays: projections, attention, MLPs, both stems, the caption head
    weights = [f"{m}.weight" for m in of((nn.Linear, nn.Conv1d, nn.Conv2d))]
    assert len(of(nn.Conv2d)) >= 2 and set(weights) <= decayed, set(weights) - decayed
    assert any(n.endswith("decoder.head.weight") for n in weights)
    # biases, norms (LayerNorm, the conv stem's GroupNorm), temperatures and logit biases never decay
    norms = [f"{m}.{k}" for m in of((nn.LayerNorm, nn.GroupNorm)) for k in ("weight", "bias")]
    biases = [n for n in params if n.endswith(".bias")]
    temps = [n for n in params if ".logit_scale." in n or ".logit_bias." in n]
    assert norms and biases and len(temps) == 6
    assert set(norms) | set(biases) | set(temps) <= kept
    # embeddings (>= 2-D) never decay: the token table, positions and class tokens of every tower,
    # the decoder's modality embeddings and the attentional poolers' queries
    tok = [f"{m}.weight" for m in of(nn.Embedding)]
    pos = [n for n in params if n.endswith(".pos")]
    cls = [n for n in params if n.endswith(".cls")]
    modality = [n for n in params if ".decoder.modality_embed." in n]
    queries = [n for n in params if ".decoder.poolers." in n and n.endswith(".queries")]
    assert (len(tok), len(pos), len(cls), len(modality), len(queries)) == (1, 3, 2, 2, 2)
    emb = tok + pos + cls + modality + queries
    for n in emb:
        assert params[n].ndim >= 2 and n in kept, n
    # the rule is exactly: ndim < 2 or an embedding
    for n, p in params.items():
        assert (n in kept) == (p.ndim < 2 or n in emb), n


def test_no_decay_names_match_whole_components_only():
    for n in ("text.tok.weight", "model.text.tok.weight", "model.vision.pos", "model.audio.cls",
              "model.decoder.modality_embed.depth", "decoder.poolers.image.queries"):
        assert is_no_decay_embedding(n), n
    for n in ("model.vision.pos_proj.weight", "model.kiln.weight", "model.text.tok.weight_g", "model.cls_head.weight",
              "model.decoder.poolers.image.queries_proj", "model.other.tok.weight", "model.vision.ln_post.weight"):
        assert not is_no_decay_embedding(n), n
    # a >= 2-D parameter whose name only contains "ln"/"norm"/"pos" decays
    m = nn.Module()
    m.kiln = nn.Linear(4, 4)
    m.pos_proj = nn.Linear(4, 4)
    m.normalizer = nn.Linear(4, 4)
    decay, keep = param_groups(m, 0.1)
    assert {id(p) for p in decay["params"]} == {id(m.kiln.weight), id(m.pos_proj.weight), id(m.normalizer.weight)}
    assert len(keep["params"]) == 3
