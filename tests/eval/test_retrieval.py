"""Retrieval metrics against hand-computed cases, a brute-force reference with ties, chunking
invariance, the chance formula, the all-pairs report and the distributed gather."""
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmpretrain.eval import chance_recall, gather_features, retrieval_metrics, retrieval_ranks, retrieval_report


def test_no_labels_hand_case_with_ties():
    # normalised sims: q0 [1, 1, 0], q1 [0, 0, 1], q2 [.71, .71, .71]
    q = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]])  # scale must not matter
    g = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # pessimistic ties: q0's partner g0 ties with g1 -> rank 2; q1's partner g1 (0) ties g0, below g2 -> 3;
    # q2 ties all three -> 3
    assert retrieval_ranks(q, g).tolist() == [2.0, 3.0, 3.0]
    m = retrieval_metrics(q, g, ks=(1, 2, 5))
    assert m["R@1"] == 0.0 and m["R@2"] == pytest.approx(1 / 3) and m["R@5"] == 1.0
    assert m["median_rank"] == 3.0 and m["mean_rank"] == pytest.approx(8 / 3)
    assert m["num_queries"] == 3 and m["chance_R@1"] == pytest.approx(1 / 3)


def test_labels_hand_case_4x5():
    g = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1]], dtype=torch.float)
    g_lab = torch.tensor([0, 1, 2, 1, 0])
    q = torch.tensor([[1, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 0], [1, 0, 0]], dtype=torch.float)
    q_lab = torch.tensor([0, 1, 2, 1, 3])  # the last query's class is not in the gallery
    # q0: best match g0 (1.0), nothing above -> 1
    # q1: matches g1, g3 both 0; non-matching >= 0: g0 (0, tie), g2 (1), g4 (.71) -> 4
    # q2: match g2 = 0; all four others >= 0 -> 5
    # q3: match g1 = 1 -> 1;  q4: no match -> inf (left out of the metrics)
    ranks = retrieval_ranks(q, g, q_lab, g_lab)
    assert ranks[:4].tolist() == [1.0, 4.0, 5.0, 1.0] and math.isinf(ranks[4])
    m = retrieval_metrics(q, g, q_lab, g_lab, ks=(1, 4, 5, 10))
    assert m["num_queries"] == 4
    assert m["R@1"] == 0.5 and m["R@4"] == 0.75 and m["R@5"] == 1.0 and m["R@10"] == 1.0
    assert m["median_rank"] == 2.5 and m["mean_rank"] == 2.75  # ranks 1, 1, 4, 5
    assert m["chance_R@1"] == pytest.approx((2 + 2 + 1 + 2) / 4 / 5)  # mean n_q / Ng
    assert chance_recall(q_lab, g_lab, k=2) == pytest.approx((3 * (1 - 3 / 10) + (1 - 6 / 10)) / 4)


def _brute_ranks(q, g, ql, gl):
    """Full matrix; among equal scores non-matching items come first (pessimistic). Float64 sims
    rounded to 9 decimals make the mathematically equal scores of integer features exactly equal."""
    q = torch.nn.functional.normalize(q.double(), dim=-1)
    g = torch.nn.functional.normalize(g.double(), dim=-1)
    sims = torch.round(q @ g.t(), decimals=9)
    out = []
    for i in range(q.shape[0]):
        match = (gl == ql[i]) if ql is not None else (torch.arange(g.shape[0]) == i)
        order = sorted(range(g.shape[0]), key=lambda j: (-sims[i, j].item(), bool(match[j])))
        hits = [r + 1 for r, j in enumerate(order) if match[j]]
        out.append(float(hits[0]) if hits else math.inf)
    return out


@pytest.mark.parametrize("labels", [False, True])
def test_brute_force_and_chunking(labels):
    gen = torch.Generator().manual_seed(0)
    n = 37
    # small integer features -> many exact ties; duplicated rows too
    q = torch.randint(-1, 2, (n, 3), generator=gen).float()
    g = torch.randint(-1, 2, (n, 3), generator=gen).float()
    g[5] = g[6]
    ql = torch.randint(0, 5, (n,), generator=gen) if labels else None
    gl = torch.randint(0, 5, (n,), generator=gen) if labels else None
    ref = _brute_ranks(q, g, ql, gl)
    for cs in (1, 4, 1000):
        assert retrieval_ranks(q, g, ql, gl, chunk_size=cs).tolist() == ref
    big = retrieval_metrics(q, g, ql, gl, chunk_size=4096)
    assert retrieval_metrics(q, g, ql, gl, chunk_size=1) == big


def test_chunking_random_float():
    gen = torch.Generator().manual_seed(1)
    q, g = torch.randn(50, 16, generator=gen), torch.randn(50, 16, generator=gen)
    assert torch.equal(retrieval_ranks(q, g, chunk_size=1), retrieval_ranks(q, g, chunk_size=64))


def test_constant_features_score_chance():
    m = retrieval_metrics(torch.zeros(10, 4), torch.zeros(10, 4))
    assert m["R@1"] == 0.0 and m["median_rank"] == 10.0  # ties never count as hits


def test_chance_matches_monte_carlo():
    gen = torch.Generator().manual_seed(2)
    ql, gl = torch.randint(0, 4, (60,), generator=gen), torch.randint(0, 4, (40,), generator=gen)
    hits1, hits5, trials = 0.0, 0.0, 200
    for _ in range(trials):
        m = retrieval_metrics(torch.randn(60, 32, generator=gen), torch.randn(40, 32, generator=gen), ql, gl, ks=(1, 5))
        hits1 += m["R@1"] / trials
        hits5 += m["R@5"] / trials
    assert hits1 == pytest.approx(chance_recall(ql, gl, 1), abs=0.03)
    assert hits5 == pytest.approx(chance_recall(ql, gl, 5), abs=0.03)


def test_bad_inputs():
    with pytest.raises(ValueError):
        retrieval_metrics(torch.randn(3, 4), torch.randn(4, 4))  # no labels needs Nq == Ng
    with pytest.raises(ValueError):
        retrieval_metrics(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError):
        retrieval_metrics(torch.randn(3, 4), torch.randn(3, 4), torch.zeros(3), None)


def test_report_pairs_masks_and_perfect_embeddings():
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    onehot = torch.nn.functional.one_hot(labels, 4).float()
    gen = torch.Generator().manual_seed(3)
    emb = {"image": onehot + 0.01 * torch.randn(8, 4, generator=gen), "audio": onehot * 2,
           "text": torch.randn(8, 4, generator=gen)}
    masks = {"image": torch.tensor([1, 1, 1, 1, 1, 1, 0, 1]).bool(),
             "audio": torch.tensor([1, 0, 1, 1, 1, 1, 1, 1]).bool()}  # text: all present
    rep = retrieval_report(emb, masks, labels)
    dirs = {k.split("/")[0] for k in rep if "/" in k}
    assert dirs == {"image_to_text", "text_to_image", "audio_to_text", "text_to_audio", "image_to_audio", "audio_to_image"}
    assert rep["image_to_audio/R@1"] == 1.0 and rep["audio_to_image/R@1"] == 1.0
    assert rep["image_to_audio/num_queries"] == 6 and rep["image_to_text/num_queries"] == 7
    both = masks["image"] & masks["audio"]
    direct = retrieval_metrics(emb["audio"][both], emb["image"][both], labels[both], labels[both])
    assert rep["audio_to_image/mean_rank"] == direct["mean_rank"]
    sub = labels[masks["image"]]
    assert rep["image_to_text/chance"] == pytest.approx(chance_recall(sub, sub))
    assert rep["chance"] == pytest.approx(2 / 8)  # every class has 2 of the 8 samples
    # instance-level without labels; chance 1/N
    rep2 = retrieval_report({"image": emb["image"], "audio": emb["audio"]})
    assert set(rep2) >= {"image_to_audio/R@1", "audio_to_image/R@10", "chance"} and rep2["chance"] == 1 / 8


def _gather_worker(rank: int, world: int, init_file: str, q):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        n = [3, 0, 2][rank]  # variable sizes, one rank empty
        feats = torch.full((n, 4), float(rank)) + torch.arange(n)[:, None].float() / 10
        masks = torch.tensor([True, False, True])[:n]  # slice the tensor: an empty list would be float
        labels = torch.arange(n) + 10 * rank
        # numpy arrays, pickled by value: a tensor on an mp.Queue travels as a file descriptor that
        # the parent fetches from this process's resource_sharer, gone once this process exits
        # (FileNotFoundError in the parent, issue 13 item 13)
        q.put((rank, *(gather_features(t).numpy() for t in (feats, masks, labels))))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_gather_features_variable_sizes():
    world = 3
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_gather_worker, args=(r, world, os.path.join(d, "init"), q)) for r in range(world)]
        for p in procs:
            p.start()
        results = [(r, *map(torch.from_numpy, arrays)) for r, *arrays in (q.get(timeout=60) for _ in range(world))]
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
    exp_f = torch.tensor([[0.0] * 4, [0.1] * 4, [0.2] * 4, [2.0] * 4, [2.1] * 4])
    for _, f, m, lab in results:
        assert torch.allclose(f, exp_f)
        assert m.dtype == torch.bool and m.tolist() == [True, False, True, True, False]
        assert lab.tolist() == [0, 1, 2, 20, 21]


def test_gather_features_single_process_identity():
    t = torch.randn(3, 2)
    assert gather_features(t) is t
