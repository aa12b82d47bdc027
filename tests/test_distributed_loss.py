"""Two real gloo processes: the distributed loss (global negatives, gathered with gradient)
and the DeepSpeed-style averaged parameter gradients equal one process on the whole batch."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmpretrain.config import load_config
from mmpretrain import modalities as M
from mmpretrain.losses import ContrastiveLoss

N, D_IN, D = 12, 5, 4  # global batch, input dim, embed dim


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = {m: torch.randn(N, D_IN, generator=g, dtype=torch.float64) for m in ("image", "audio", "text")}
    masks = {m: torch.rand(N, generator=g) > 0.25 for m in ("image", "audio", "text")}
    torch.manual_seed(1)
    enc = torch.nn.ModuleDict({m: torch.nn.Linear(D_IN, D).double() for m in ("image", "audio", "text")})
    return x, masks, enc


LABELS = torch.tensor([0, 1, 2, 0, -1, 1, 1, 2, -1, 0, 2, 1])  # -1: no label; classes across both ranks


def _forward(enc, x, masks, cfg, rows):
    emb = {m: torch.nn.functional.normalize(enc[m](x[m][rows]), dim=-1) for m in enc}
    scales = {p: torch.tensor(7.0, dtype=torch.float64) for p in M.pair_names()}
    biases = {p: torch.tensor(-10.0, dtype=torch.float64) for p in M.pair_names()}
    return ContrastiveLoss(cfg)(emb, scales, biases, {m: masks[m][rows] for m in masks}, LABELS[rows])


def _worker(rank, world, init_file, result_file, same_label):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cfg = load_config(None, ["loss.pairs.audio_text=0.7", f"loss.same_label={same_label}"])
    x, masks, enc = _setup()
    n = N // world
    loss, metrics = _forward(enc, x, masks, cfg, slice(rank * n, (rank + 1) * n))
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in enc.parameters()])
    dist.all_reduce(grads)
    grads /= world  # what DeepSpeed's data-parallel averaging does
    if rank == 0:
        torch.save({"grads": grads, "metrics": {k: float(v) for k, v in metrics.items()}}, result_file)
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("same_label", ["negative", "ignore", "positive"])
def test_two_process_loss_and_grads_equal_single_process(tmp_path, same_label):
    """loss.same_label too: the labels are gathered with the features (same-class columns on the other rank)."""
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path / "res.pt"), same_label), nprocs=world,
             join=True)
    res = torch.load(tmp_path / "res.pt", weights_only=True)
    cfg = load_config(None, ["loss.pairs.audio_text=0.7", f"loss.same_label={same_label}"])
    x, masks, enc = _setup()
    loss, metrics = _forward(enc, x, masks, cfg, slice(0, N))
    loss.backward()
    ref = torch.cat([p.grad.flatten() for p in enc.parameters()])
    assert ref.abs().sum() > 0
    torch.testing.assert_close(res["grads"], ref, rtol=1e-5, atol=1e-7)
    for k in ("loss/image_text", "loss/audio_text", "loss/image_audio"):
        assert res["metrics"][k] == pytest.approx(float(metrics[k]), rel=1e-6)
