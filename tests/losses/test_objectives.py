"""The contrastive-family terms against plain loops: NT-Xent (SimCLR), two-view InfoNCE (SimCSE),
ALBEF's momentum-queue contrast with distillation (MoCo), nearest-neighbour positives (NNCLR /
DeCLIP), NegCLIP's hard-negative columns, SimSiam / BYOL's distances; the rule-made hard negatives;
BYOL's EMA and the queue updates; and MoCo's queue under 2 gloo processes (identical, no duplicates)."""

from __future__ import annotations

import random
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from loss_reference import random_features

from mmcl.config import load_experiment
from mmcl.data.batch import Batch
from mmcl.data.negatives import KIND_OF, hard_negatives, replace, shuffle, swap
from mmcl.losses.base import StepContext
from mmcl.losses.nt_xent import info_nce, nt_xent
from mmcl.losses.queue import FeatureQueue
from mmcl.models import build_model
from mmcl.tasks import build_task


def lse(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.logsumexp(torch.stack(values), 0)


def test_nt_xent_matches_a_loop() -> None:
    a, b = random_features(6, 8, seed=1)
    t = 0.1
    z = torch.cat([a, b])
    total = 0.0
    for k in range(12):
        pos = (k + 6) % 12
        others = [z[k].dot(z[j]) / t for j in range(12) if j != k]
        total = total - (z[k].dot(z[pos]) / t - lse(others))
    assert nt_xent(a, b, t)["loss"].item() == pytest.approx(float(total / 12), rel=1e-9)


def test_info_nce_matches_a_loop() -> None:
    a, b = random_features(5, 8, seed=2)
    t = 0.05
    one_way = sum(-(a[i].dot(b[i]) / t - lse([a[i].dot(b[j]) / t for j in range(5)])) for i in range(5)) / 5
    other = sum(-(b[i].dot(a[i]) / t - lse([b[i].dot(a[j]) / t for j in range(5)])) for i in range(5)) / 5
    assert info_nce(a, b, t, symmetric=False)["loss"].item() == pytest.approx(float(one_way), rel=1e-9)
    assert info_nce(a, b, t)["loss"].item() == pytest.approx(float((one_way + other) / 2), rel=1e-9)


def _task(terms: str, *extra: str):
    torch.manual_seed(0)
    cfg = load_experiment(None, ["model.preset=clip-tiny", f"loss.terms={terms}", *extra])
    return build_task(build_model(cfg.model), cfg)


def test_moco_matches_a_loop() -> None:
    task = _task("[{name: moco, queue_size: 5, alpha: 0.4}]")
    term = task.terms["moco"]
    g = torch.Generator().manual_seed(0)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    term.double()
    term.text_queue.push(unit(3, 64))
    term.image_queue.push(unit(3, 64))
    x, y, xm, ym = unit(4, 64), unit(4, 64), unit(4, 64), unit(4, 64)
    t = torch.tensor(7.0, dtype=torch.float64)
    out = term({"image_features": x, "text_features": y, "image_m": xm, "text_m": ym, "logit_scale": t}, None)
    keys_y, keys_x = torch.cat([ym, term.text_queue.valid()]), torch.cat([xm, term.image_queue.valid()])
    total = 0.0
    for q, qm, keys in ((x, xm, keys_y), (y, ym, keys_x)):
        for i in range(4):
            s = [t * q[i].dot(k) for k in keys]
            sm = torch.softmax(torch.stack([t * qm[i].dot(k) for k in keys]), 0)
            target = [0.4 * sm[j] + 0.6 * (j == i) for j in range(len(keys))]
            total = total - sum(target[j] * (s[j] - lse(s)) for j in range(len(keys))) / 4
    assert out["loss"].item() == pytest.approx(float(total / 2), rel=1e-9)


def test_nearest_neighbour_term_matches_a_loop() -> None:
    task = _task("[clip, nnclr]")
    term = task.terms["nnclr"].double()
    x, y = random_features(4, 64, seed=3)
    t = torch.tensor(5.0, dtype=torch.float64)
    feats = {"image_features": x, "text_features": y, "logit_scale": t}
    assert term(feats, None)["loss"].item() == 0.0  # an empty queue: no neighbour yet
    bank = F.normalize(torch.randn(6, 64, dtype=torch.float64), dim=-1)
    term.queue.push(bank)
    nn = [bank[max(range(6), key=lambda j: float(y[i].dot(bank[j])))] for i in range(4)]
    ref = sum(-(t * x[i].dot(nn[i]) - lse([t * x[i].dot(nn[j]) for j in range(4)])) for i in range(4)) / 4
    assert term(feats, None)["loss"].item() == pytest.approx(float(ref), rel=1e-9)


def test_negclip_matches_a_loop() -> None:
    task = _task("[{name: negclip, count: 2}]")
    term = task.terms["negclip"]
    x, y = random_features(3, 8, seed=4)
    neg = F.normalize(torch.randn(3, 2, 8, dtype=torch.float64), dim=-1)
    valid = torch.tensor([[True, True], [True, False], [False, False]])
    t = torch.tensor(4.0, dtype=torch.float64)
    out = term(
        {"image_features": x, "text_features": y, "neg_features": neg, "neg_valid": valid, "logit_scale": t}, None
    )
    columns = [y[j] for j in range(3)] + [neg[j, m] for j in range(3) for m in range(2) if valid[j, m]]
    i2t = sum(-(t * x[i].dot(y[i]) - lse([t * x[i].dot(c) for c in columns])) for i in range(3)) / 3
    t2i = sum(-(t * y[i].dot(x[i]) - lse([t * y[i].dot(x[j]) for j in range(3)])) for i in range(3)) / 3
    assert out["loss"].item() == pytest.approx(float((i2t + t2i) / 2), rel=1e-9)


def test_siamese_distances_and_stop_gradient() -> None:
    task = _task("[simsiam]")
    term = task.terms["simsiam"]
    p1, p2, t1, t2 = (torch.randn(5, 16, requires_grad=True) for _ in range(4))
    out = term({"p1": p1, "p2": p2, "t1": t1, "t2": t2}, None)
    ref = (
        sum(
            -(p1[i].dot(t2[i]) / (p1[i].norm() * t2[i].norm())) - p2[i].dot(t1[i]) / (p2[i].norm() * t1[i].norm())
            for i in range(5)
        )
        / 10
    )
    assert out["loss"].detach().item() == pytest.approx(float(ref), rel=1e-5)
    size = task.model.preprocess_cfg()["image_size"]
    views = {"view1": torch.randn(4, 3, size, size), "view2": torch.randn(4, 3, size, size)}
    feats = term.features(task.model, Batch(views=views), {})
    assert not feats["t1"].requires_grad and feats["p1"].requires_grad  # SimSiam's stop-gradient


def test_byol_target_is_an_ema_of_the_online_network() -> None:
    task = _task("[{name: byol, momentum: 0.9}]")
    term = task.terms["byol"]
    assert all(not p.requires_grad for p in term.target_tower.parameters())
    online = [p.detach().clone() for p in task.model.image.parameters()]
    target = [p.detach().clone() for p in term.target_tower.parameters()]
    with torch.no_grad():
        for p in task.model.image.parameters():
            p.add_(1.0)
    term.on_step_end(StepContext(step=1))
    for p, o, t in zip(term.target_tower.parameters(), online, target):
        torch.testing.assert_close(p, 0.9 * t + 0.1 * (o + 1.0))
    state = task.state_for_checkpoint()
    assert any(k.startswith("terms.byol.target_tower.") for k in state)
    assert not any(".target_tower." in n for n, p in task.named_parameters() if p.requires_grad)


def test_feature_queue_wraps_around() -> None:
    q = FeatureQueue(5, 2)
    q.push(torch.arange(6.0).view(3, 2))
    q.push(torch.arange(6.0, 12.0).view(3, 2))
    assert int(q.filled) == 5 and int(q.ptr) == 1
    assert sorted(q.valid()[:, 0].tolist()) == [2.0, 4.0, 6.0, 8.0, 10.0]  # the oldest row (0) was overwritten
    q.push(torch.arange(100.0, 120.0).view(10, 2))  # more rows than the queue: the last 5 are kept
    assert sorted(q.valid()[:, 0].tolist()) == [110.0, 112.0, 114.0, 116.0, 118.0]


# ---------------------------------------------------------------- rule-made hard negatives


CAPTION = "a small red circle at the top left next to two blue squares"


def test_each_rule_changes_the_caption_the_way_it_says() -> None:
    for seed in range(20):
        rng = random.Random(seed)
        s = swap(CAPTION, rng)
        assert s != CAPTION and sorted(s.split()) == sorted(CAPTION.split())
        r = replace(CAPTION, rng, {"colour": ["red", "blue", "green"]})
        diff = [(a, b) for a, b in zip(CAPTION.split(), r.split()) if a != b]
        assert len(diff) == 1 and KIND_OF[diff[0][0]] == KIND_OF[diff[0][1]]
        sh = shuffle(CAPTION, rng)
        words, out = CAPTION.split(), sh.split()
        assert sh != CAPTION and all(
            sorted(words[i : i + 3]) == sorted(out[i : i + 3]) for i in range(0, len(words), 3)
        )


def test_negatives_are_distinct_and_never_the_caption() -> None:
    negs = hard_negatives(CAPTION, random.Random(0), 5)
    assert len(negs) == 5 and len(set(negs)) == 5 and CAPTION not in negs
    assert hard_negatives("dog", random.Random(0), 3) == []  # nothing to change


def test_hard_negative_view_is_deterministic_per_key() -> None:
    task = _task("[negclip]")
    view = task.terms["negclip"].views(task.model)["hard_negatives"]
    captions = [CAPTION, "two green stars", "dog"]
    a = view(captions, ["k1", "k2", "k3"])
    b = view(list(reversed(captions)), ["k3", "k2", "k1"])
    assert torch.equal(a["neg_text"][0], b["neg_text"][2]) and a["neg_valid"][2].tolist() == [False] * 3
    assert a["neg_text"].shape[:2] == (3, 3)


# ---------------------------------------------------------------- MoCo's queue under 2 gloo processes

WORLD = 2


def _queue_worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        task = _task("[{name: moco, queue_size: 10}]")
        term = task.terms["moco"]

        def gather(t: torch.Tensor) -> torch.Tensor:
            parts = [torch.empty_like(t) for _ in range(WORLD)]
            dist.all_gather(parts, t.contiguous())
            return torch.cat(parts)

        for step in range(3):  # 3 steps x 2 ranks x 2 keys = 12 keys into a queue of 10
            keys = torch.full((2, 64), float(100 * step + 10 * rank)) + torch.arange(2.0)[:, None]
            term.on_step_end(StepContext(step, rank, WORLD, gather, {"image_m": keys, "text_m": -keys}))
        queue = term.image_queue.valid()
        everywhere = gather(queue[None])  # (WORLD, 10, 64)
        assert torch.equal(everywhere[0], everywhere[1]), "the queue differs between ranks"
        ids = sorted(queue[:, 0].tolist())
        assert len(set(ids)) == 10, "a key is queued twice"
        expected = sorted(100 * s + 10 * r + i for s in range(3) for r in range(WORLD) for i in range(2))[2:]
        assert ids == expected, (ids, expected)  # the newest 10 keys of both ranks
        assert torch.equal(term.text_queue.valid(), -queue)
    finally:
        dist.destroy_process_group()


def test_moco_queue_is_identical_on_every_rank_without_duplicates() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_queue_worker, args=(port,), nprocs=WORLD, join=True, start_method="fork")
