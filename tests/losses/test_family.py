"""The rest of the contrastive family (issue 21), each term against a plain loop: MoCo v3's symmetric
contrast of predicted queries with momentum keys; its key branch an EMA of the online one, checkpointed."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmcl.config import load_experiment
from mmcl.data.batch import Batch
from mmcl.losses.base import StepContext
from mmcl.models import build_model
from mmcl.tasks import build_task
from mmcl.utils import UserError


def lse(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.logsumexp(torch.stack(values), 0)


def _task(terms: str, *extra: str):
    torch.manual_seed(0)
    cfg = load_experiment(None, ["model.preset=clip-tiny", f"loss.terms={terms}", *extra])
    return build_task(build_model(cfg.model), cfg)


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


# ---------------------------------------------------------------- MoCo v3


def test_mocov3_matches_a_loop() -> None:
    task = _task("[{name: mocov3, temperature: 0.3}]")
    term = task.terms["mocov3"]
    q1, q2, k1, k2 = (_unit(5, 16, seed=s) for s in range(4))
    out = term({"q1": q1, "q2": q2, "k1": k1, "k2": k2}, None)
    t, total = 0.3, 0.0
    for q, k in ((q1, k2), (q2, k1)):
        for i in range(5):
            total = total - 2 * t * (q[i].dot(k[i]) / t - lse([q[i].dot(k[j]) / t for j in range(5)])) / 5
    assert out["loss"].item() == pytest.approx(float(total / 2), rel=1e-9)


def test_mocov3_keys_carry_no_gradient_and_follow_the_online_branch() -> None:
    task = _task("[clip, {name: mocov3, momentum: 0.9}]")
    term = task.terms["mocov3"]
    size = task.model.preprocess_cfg()["image_size"]
    views = {"view1": torch.randn(3, 3, size, size), "view2": torch.randn(3, 3, size, size)}
    feats = term.features(task.model, Batch(views=views), {})
    assert feats["q1"].requires_grad and not feats["k1"].requires_grad
    torch.testing.assert_close(feats["q1"].norm(dim=-1), torch.ones(3))
    assert all(not p.requires_grad for p in [*term.key_tower.parameters(), *term.key_projector.parameters()])
    online = [p.detach().clone() for p in term.projector.parameters()]
    key = [p.detach().clone() for p in term.key_projector.parameters()]
    with torch.no_grad():
        for p in term.projector.parameters():
            p.add_(1.0)
    task.on_step_end(StepContext(step=1))
    for p, o, k in zip(term.key_projector.parameters(), online, key):
        torch.testing.assert_close(p, 0.9 * k + 0.1 * (o + 1.0))
    state = task.state_for_checkpoint()
    assert any(k.startswith("terms.mocov3.key_tower.") for k in state)
    assert any(k.startswith("terms.mocov3.key_projector.") for k in state)


# ---------------------------------------------------------------- 2 gloo processes

WORLD = 2


def _gloo_worker(rank: int, port: int) -> None:
    import torch.distributed as dist

    from mmcl.losses.mocov3 import contrast

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        q, k = _unit(8, 6, seed=1), _unit(8, 6, seed=2)  # the global batch, on every rank
        full_q = q.clone().requires_grad_(True)  # the full batch in plain torch (no process group involved)
        full = 2 * 0.2 * F.cross_entropy(full_q @ k.T / 0.2, torch.arange(8))
        full.backward()
        own = slice(rank * 4, (rank + 1) * 4)
        mine_q = q[own].clone().requires_grad_(True)
        mine, _ = contrast(mine_q, k[own], 0.2)
        mine.backward()
        total = mine.detach().clone()
        dist.all_reduce(total)
        torch.testing.assert_close(total / WORLD, full.detach())  # DDP's mean of the ranks' losses = the full batch's
        torch.testing.assert_close(mine_q.grad / WORLD, full_q.grad[own])  # and so is its averaged gradient
    finally:
        dist.destroy_process_group()


def test_mocov3_on_two_processes_equals_the_full_batch() -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_gloo_worker, args=(port,), nprocs=WORLD, join=True, start_method="fork")


# ---------------------------------------------------------------- InvaSpread, as options of the simclr term


def test_invaspread_is_the_simclr_term_with_a_linear_embedding() -> None:
    """Ye et al. 2019 ("Unsupervised Embedding Learning via Invariant and Spreading Instance Feature"):
    in-batch instance discrimination, a linear 128-d L2-normalised embedding, t = 0.1, every other instance's
    views (both) as negatives. The simclr term's options express it: `head_layers: 1, head_out: 128`."""
    task = _task("[{name: simclr, head_layers: 1, head_out: 128, temperature: 0.1}]")
    term = task.terms["simclr"]
    assert [type(m).__name__ for m in term.head] == ["Linear"] and term.head[0].out_features == 128
    a, b = _unit(4, 128, seed=5), _unit(4, 128, seed=6)
    views = {(i, v): (a if v == 0 else b)[i] for i in range(4) for v in (0, 1)}
    total = 0.0
    for (i, v), z in views.items():  # each view: its other view positive, both views of the others negative
        positive = views[(i, 1 - v)].dot(z) / 0.1
        others = [w.dot(z) / 0.1 for (j, u), w in views.items() if (j, u) != (i, v)]
        total = total - (positive - lse(others))
    assert term({"z1": a, "z2": b}, None)["loss"].item() == pytest.approx(float(total / 8), rel=1e-9)


# ---------------------------------------------------------------- DINO


def test_dino_matches_a_loop() -> None:
    task = _task("[{name: dino, out_dim: 6, student_temp: 0.2, teacher_temp: 0.05}]")
    term = task.terms["dino"].double()
    term.center.copy_(torch.randn(6, dtype=torch.float64))
    g = torch.Generator().manual_seed(3)
    s1, s2, t1, t2 = (torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(4))
    out = term({"s1": s1, "s2": s2, "t1": t1, "t2": t2}, None)
    total, entropy = 0.0, 0.0
    for t, s in ((t1, s2), (t2, s1)):
        for i in range(4):
            e = [math.exp((t[i, k] - term.center[k]) / 0.05) for k in range(6)]
            q = [x / sum(e) for x in e]
            log_p = [s[i, k] / 0.2 - lse([s[i, j] / 0.2 for j in range(6)]) for k in range(6)]
            total -= sum(q[k] * log_p[k] for k in range(6)) / 4
            entropy -= sum(x * math.log(x) for x in q if x > 0) / 8
    assert out["loss"].item() == pytest.approx(float(total / 2), rel=1e-9)
    assert out["teacher_entropy"].item() == pytest.approx(entropy, rel=1e-6)


def test_dino_schedules_centre_and_teacher() -> None:
    opts = "out_dim: 8, momentum: 0.9, momentum_steps: 4, warmup_teacher_temp: 0.02, teacher_temp: 0.06"
    task = _task(f"[{{name: dino, {opts}, teacher_temp_warmup_steps: 2}}]")
    term = task.terms["dino"]
    assert term.teacher_temp() == pytest.approx(0.02) and term.teacher_momentum() == pytest.approx(0.9)
    t1, t2 = torch.randn(3, 8), torch.randn(3, 8)
    head, teacher = (
        [p.detach().clone() for p in term.head.parameters()],
        [p.clone() for p in term.teacher_head.parameters()],
    )
    with torch.no_grad():
        for p in term.head.parameters():
            p.add_(1.0)
    task.on_step_end(StepContext(step=1, features={"dino/t1": t1, "dino/t2": t2}))
    torch.testing.assert_close(term.center, 0.1 * torch.cat([t1, t2]).mean(0))  # from zero, momentum 0.9
    for p, o, t in zip(term.teacher_head.parameters(), head, teacher):
        torch.testing.assert_close(p, 0.9 * t + 0.1 * (o + 1.0))
    assert int(term.steps) == 1 and term.teacher_temp() == pytest.approx(0.04)  # half-way through the warm-up
    assert term.teacher_momentum() == pytest.approx(1 - 0.1 * (math.cos(math.pi / 4) + 1) / 2)
    term.steps.fill_(4)
    assert term.teacher_momentum() == 1.0 and term.teacher_temp() == pytest.approx(0.06)
    assert {"terms.dino.center", "terms.dino.steps"} <= set(task.state_for_checkpoint())


def test_dino_centre_sees_every_micro_batch_of_the_step() -> None:
    """A per-sample term's step statistic: with 2 micro-batches `on_step_end` gets the teacher rows of both."""
    task = _task("[clip, {name: dino, out_dim: 8, center_momentum: 0.0}]")
    size = task.model.preprocess_cfg()["image_size"]
    ids, mask = task.model.tokenizer(["a red circle"] * 6)
    batch = Batch(images=torch.randn(6, 3, size, size), text=ids, text_mask=mask, keys=[str(i) for i in range(6)])
    batch.views = {f"dino/view{v}": torch.randn(6, 3, size, size) for v in (1, 2)}
    out = task.step(batch.split(2))
    assert out.features["dino/t1"].shape == (6, 8)
    with torch.no_grad():
        views = torch.cat([batch.views["dino/view1"], batch.views["dino/view2"]])
        expected = task.terms["dino"].teacher_head(task.terms["dino"].teacher_tower(views)).mean(0)
    task.on_step_end(StepContext(step=1, features=out.features))
    torch.testing.assert_close(task.terms["dino"].center, expected, atol=1e-5, rtol=1e-5)


def _dino_centre_worker(rank: int, port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        task = _task("[{name: dino, out_dim: 4, center_momentum: 0.5}]")

        def gather(t: torch.Tensor) -> torch.Tensor:
            parts = [torch.empty_like(t) for _ in range(WORLD)]
            dist.all_gather(parts, t.contiguous())
            return torch.cat(parts)

        rows = {r: torch.full((3, 4), float(r + 1)) for r in range(WORLD)}  # rank r's teacher rows: all r + 1
        task.on_step_end(StepContext(1, rank, WORLD, gather, {"dino/t1": rows[rank], "dino/t2": -rows[rank]}))
        centre = task.terms["dino"].center
        torch.testing.assert_close(centre, torch.zeros(4))  # (1 + 2 - 1 - 2) / 4 rows-means: the global mean
        task.on_step_end(StepContext(2, rank, WORLD, gather, {"dino/t1": rows[rank], "dino/t2": rows[rank]}))
        torch.testing.assert_close(centre, torch.full((4,), 0.5 * 1.5))  # the same on every rank
    finally:
        dist.destroy_process_group()


def test_dino_centre_is_the_mean_over_every_process() -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_dino_centre_worker, args=(port,), nprocs=WORLD, join=True, start_method="fork")


# ---------------------------------------------------------------- SwAV


def sinkhorn_loop(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """Sinkhorn-Knopp entry by entry, as the paper's algorithm states it."""
    b, k = scores.shape
    q = [[math.exp(float(scores[i, j]) / eps) for i in range(b)] for j in range(k)]  # (K, B)
    total = sum(map(sum, q))
    q = [[x / total for x in row] for row in q]
    for _ in range(iters):
        q = [[x / (sum(row) * k) for x in row] for row in q]
        cols = [sum(q[j][i] for j in range(k)) for i in range(b)]
        q = [[q[j][i] / (cols[i] * b) for i in range(b)] for j in range(k)]
    return torch.tensor([[q[j][i] * b for j in range(k)] for i in range(b)], dtype=torch.float64)


def test_sinkhorn_matches_a_loop_and_equipartitions() -> None:
    from mmcl.losses.swav import sinkhorn

    scores = _unit(6, 4, seed=7) @ _unit(3, 4, seed=8).T  # (B, K) cosine scores
    codes = sinkhorn(scores, 0.05, 3)
    torch.testing.assert_close(codes, sinkhorn_loop(scores, 0.05, 3))
    torch.testing.assert_close(codes.sum(1), torch.ones(6, dtype=torch.float64))  # rows: distributions
    long = sinkhorn(scores, 0.05, 200)
    torch.testing.assert_close(long.sum(0), torch.full((3,), 2.0, dtype=torch.float64), atol=1e-5, rtol=0)  # equal use


def test_swav_matches_a_loop() -> None:
    task = _task("[{name: swav, prototypes: 3, temperature: 0.2}]")
    term = task.terms["swav"].double()
    p1, p2 = _unit(5, 3, seed=9), _unit(5, 3, seed=10)
    out = term({"p1": p1, "p2": p2}, None)
    q1, q2 = sinkhorn_loop(p1, 0.05, 3), sinkhorn_loop(p2, 0.05, 3)
    total = 0.0
    for q, p in ((q1, p2), (q2, p1)):
        for i in range(5):
            total -= sum(q[i, k] * (p[i, k] / 0.2 - lse([p[i, j] / 0.2 for j in range(3)])) for k in range(3)) / 5
    assert out["loss"].item() == pytest.approx(float(total / 2), rel=1e-9)


def test_swav_queue_joins_the_codes_once_full_and_prototypes_start_frozen() -> None:
    task = _task("[{name: swav, prototypes: 4, proj_out: 8, queue_size: 6, freeze_prototypes_steps: 1}]")
    term = task.terms["swav"].double()
    p = _unit(3, 4, seed=11)
    alone = term.codes(p, term.queues[0])
    z = _unit(3, 8, seed=12)
    task.on_step_end(StepContext(1, features={"swav/z1": z, "swav/z2": z}))
    torch.testing.assert_close(term.codes(p, term.queues[0]), alone)  # 3 of 6 rows: not used yet
    task.on_step_end(StepContext(2, features={"swav/z1": z, "swav/z2": z}))
    with_queue = sinkhorn_loop(torch.cat([term.queues[0].feats @ term.prototypes.detach().T, p]), 0.05, 3)[-3:]
    torch.testing.assert_close(term.codes(p, term.queues[0]), with_queue)
    torch.testing.assert_close(term.prototypes.norm(dim=-1), torch.ones(4, dtype=torch.float64))

    fresh = _task("[clip, {name: swav, prototypes: 4, freeze_prototypes_steps: 1}]")
    swav = fresh.terms["swav"]
    size = fresh.model.preprocess_cfg()["image_size"]
    batch = Batch(views={"view1": torch.randn(4, 3, size, size), "view2": torch.randn(4, 3, size, size)})
    feats = swav.features(fresh.model, batch, {})
    swav(feats, batch)["loss"].backward()
    assert swav.prototypes.grad is None and swav.projector[0].weight.grad is not None  # frozen for step 0
    swav.steps.fill_(1)
    swav(swav.features(fresh.model, batch, {}), batch)["loss"].backward()
    assert swav.prototypes.grad is not None and swav.prototypes.grad.abs().sum() > 0


def _swav_codes_worker(rank: int, port: int) -> None:
    import torch.distributed as dist

    from mmcl.losses.swav import sinkhorn

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        task = _task("[{name: swav, prototypes: 3, proj_out: 4, queue_size: 2}]")
        term = task.terms["swav"].double()
        term.queues[0].push(_unit(2, 4, seed=13))  # a full queue, the same on every rank
        p = _unit(8, 3, seed=14)  # the global batch's scores
        queue_scores = term.queues[0].feats @ term.prototypes.detach().T
        full = sinkhorn(torch.cat([queue_scores, p]))[2:]  # one process, the whole batch
        mine = term.codes(p[rank * 4 : (rank + 1) * 4], term.queues[0])
        torch.testing.assert_close(mine, full[rank * 4 : (rank + 1) * 4])
    finally:
        dist.destroy_process_group()


def test_swav_codes_on_two_processes_are_the_full_batch_codes() -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_swav_codes_worker, args=(port,), nprocs=WORLD, join=True, start_method="fork")


# ---------------------------------------------------------------- CMC


def _info_nce_loop(a: torch.Tensor, b: torch.Tensor, t: float) -> float:
    n = a.shape[0]
    ab = sum(-(a[i].dot(b[i]) / t - lse([a[i].dot(b[j]) / t for j in range(n)])) for i in range(n)) / n
    ba = sum(-(b[i].dot(a[i]) / t - lse([b[i].dot(a[j]) / t for j in range(n)])) for i in range(n)) / n
    return float((ab + ba) / 2)


@pytest.mark.parametrize("graph", ["full", "core"])
def test_cmc_matches_a_loop(graph: str) -> None:
    task = _task(f"[{{name: cmc, image_views: 2, graph: {graph}, core: text, temperature: 0.1}}]")
    term = task.terms["cmc"]
    rows = {n: _unit(4, 8, seed=20 + i) for i, n in enumerate(["image", "text", "view1", "view2"])}
    feats = {"image_features": rows["image"], "text_features": rows["text"], "view1": rows["view1"],
             "view2": rows["view2"]}  # fmt: skip
    names = list(rows)
    pairs = (
        [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
        if graph == "full"
        else [("text", b) for b in names if b != "text"]
    )
    assert len(pairs) == (6 if graph == "full" else 3)
    ref = sum(_info_nce_loop(rows[a], rows[b], 0.1) for a, b in pairs) / len(pairs)
    assert term(feats, None)["loss"].item() == pytest.approx(ref, rel=1e-9)


def test_cmc_with_two_views_and_the_models_scale_is_clip() -> None:
    from mmcl.losses.clip_loss import ClipLoss

    task = _task("[{name: cmc, image_views: 0, temperature: 0}]")
    x, y = _unit(5, 8, seed=30), _unit(5, 8, seed=31)
    scale = torch.tensor(9.0, dtype=torch.float64)
    out = task.terms["cmc"]({"image_features": x, "text_features": y, "logit_scale": scale}, None)
    assert out["loss"].item() == pytest.approx(ClipLoss()(x, y, scale)["loss"].item(), rel=1e-9)
    with pytest.raises(UserError, match="core must be one of"):
        _task("[{name: cmc, graph: core, core: colour}]")


# ---------------------------------------------------------------- InstDisc


@pytest.mark.parametrize("kind", ["softmax", "nce"])
def test_instdisc_matches_a_loop(kind: str) -> None:
    task = _task(f"[{{name: instdisc, bank_size: 10, dim: 6, negatives: 3, loss: {kind}, proximal: 2.0}}]")
    term = task.terms["instdisc"].double()
    bank = term.bank.double()
    v, slots = _unit(4, 6, seed=40), torch.tensor([1, 7, 3, 1])
    negatives = term.draw(["a", "b", "c", "d"])
    out = term({"v": v, "slot": slots, "negatives": negatives}, None)
    t, z, total = 0.07, float(term.z), 0.0
    for i in range(4):
        pos = float(v[i].dot(bank[slots[i]])) / t
        negs = [float(v[i].dot(bank[j])) / t for j in negatives[i]]
        if kind == "softmax":
            li = -(pos - math.log(sum(math.exp(s) for s in [pos, *negs])))
        else:
            h = lambda s: (math.exp(s) / z) / (math.exp(s) / z + 3 / 10)  # noqa: E731
            li = -math.log(h(pos)) - sum(math.log(1 - h(s)) for s in negs)
        total += li + 2.0 * float((v[i] - bank[slots[i]]).pow(2).sum())
    assert out["loss"].item() == pytest.approx(total / 4, rel=1e-6)


def test_instdisc_bank_is_addressed_by_key_and_moves_after_the_step() -> None:
    from mmcl.losses.instdisc import key_slot

    task = _task("[clip, {name: instdisc, bank_size: 32, dim: 8, negatives: 4, momentum: 0.25}]")
    term = task.terms["instdisc"]
    assert term.bank.dtype == torch.float16 and key_slot("000007", 32) == key_slot("000007", 32)
    assert torch.equal(term.draw(["k"]), term.draw(["k"])) and not torch.equal(term.draw(["k"]), term.draw(["j"]))
    size = task.model.preprocess_cfg()["image_size"]
    keys = ["s0", "s1", "s2"]
    feats = term.features(task.model, Batch(images=torch.randn(3, 3, size, size), keys=keys), {})
    assert feats["slot"].tolist() == [key_slot(k, 32) for k in keys]
    before = term.bank.float().clone()
    step = {"instdisc/v": feats["v"].detach(), "instdisc/slot": feats["slot"], "instdisc/owner": feats["owner"]}
    task.on_step_end(StepContext(1, features=step))
    for i, s in enumerate(feats["slot"].tolist()):
        expected = F.normalize(0.25 * before[s] + 0.75 * feats["v"][i].detach(), dim=0)
        torch.testing.assert_close(term.bank[s].float(), expected, atol=2e-3, rtol=0)  # fp16 entries
    untouched = [j for j in range(32) if j not in feats["slot"].tolist()]
    assert torch.equal(term.bank[untouched].float(), before[untouched])
    assert {"terms.instdisc.bank", "terms.instdisc.z", "terms.instdisc.steps"} <= set(task.state_for_checkpoint())


# ---------------------------------------------------------------- CPC


def test_cpc_matches_a_loop() -> None:
    task = _task("[{name: cpc, steps: 2, dim: 8}]")
    term = task.terms["cpc"].double()
    task.model.double().eval()
    captions = ["a red circle at the top", "two blue squares", "a"]
    ids, mask = task.model.tokenizer(captions)
    batch = Batch(text=ids, text_mask=mask, captions=captions)
    out = term(term.features(task.model, batch, {}), batch)
    tower = task.model.text
    total, count = 0.0, 0
    for b in range(3):
        length = int(mask[b].sum())
        states = tower.token_states(ids[b : b + 1, :length], mask[b : b + 1, :length])[0]  # this caption alone
        z = term.code(tower.token_embedding.weight[ids[b, :length]])
        for k in (1, 2):
            w = term.predict.weight[(k - 1) * 8 : k * 8]
            bias = term.predict.bias[(k - 1) * 8 : k * 8]
            for t in range(length - k):
                pred = states[t] @ w.T + bias
                s = [pred.dot(z[u]) for u in range(length)]
                total -= float((s[t + k] - lse(s)).detach())
                count += 1
    assert count == term.count(batch)
    assert out["loss"].item() == pytest.approx(total / count, rel=1e-6)


def test_cpc_needs_a_causal_text_tower() -> None:
    with pytest.raises(UserError, match="causal text tower"):
        _task("[cpc]", "model.preset=lit-minilm-tiny")


# ---------------------------------------------------------------- SimCLRv2, as options of the simclr term


def test_simclrv2_momentum_keys_and_queue_match_a_loop() -> None:
    task = _task("[{name: simclr, momentum: 0.9, queue_size: 4, head_out: 8}]")
    term = task.terms["simclr"].double()
    assert len([m for m in term.head if isinstance(m, torch.nn.Linear)]) == 3  # SimCLRv2's 3-layer head
    term.queue.push(_unit(3, 8, seed=50))
    z1, z2, k1, k2 = (_unit(4, 8, seed=51 + i) for i in range(4))
    out = term({"z1": z1, "z2": z2, "k1": k1, "k2": k2}, None)
    queue, total = term.queue.valid(), 0.0
    for q, k in ((z1, k2), (z2, k1)):
        columns = [*k, *queue]
        for i in range(4):
            total -= float(q[i].dot(k[i]) / 0.1 - lse([q[i].dot(c) / 0.1 for c in columns])) / 8
    assert out["loss"].item() == pytest.approx(total, rel=1e-9)

    online = [p.detach().clone() for p in term.head.parameters()]
    key = [p.detach().clone() for p in term.key_head.parameters()]
    with torch.no_grad():
        for p in term.head.parameters():
            p.add_(1.0)
    task.on_step_end(StepContext(1, features={"simclr/k1": k1, "simclr/k2": k2}))
    for p, o, k in zip(term.key_head.parameters(), online, key):
        torch.testing.assert_close(p, 0.9 * k + 0.1 * (o + 1.0))
    assert int(term.queue.filled) == 4 and {"terms.simclr.queue.feats"} <= set(task.state_for_checkpoint())


# ---------------------------------------------------------------- ESimCSE, as options of the simcse term


def test_word_repetition_keeps_the_words_in_order_and_depends_on_the_key() -> None:
    import random

    from mmcl.data.views import EditedCaptionView, repeat_words

    caption = "a small red circle at the top left next to two blue squares"
    lengths = set()
    for seed in range(30):
        out = repeat_words(caption, 0.32, random.Random(seed)).split()
        assert [w for i, w in enumerate(out) if i == 0 or w != out[i - 1]] == caption.split()  # only doublings
        lengths.add(len(out) - len(caption.split()))
    assert 0 < max(lengths) <= max(2, int(0.32 * len(caption.split())))  # lengths differ, within the bound
    task = _task("[{name: simcse, repetition: 0.32}]")
    view = task.terms["simcse"].views(task.model)["edited"]
    assert isinstance(view, EditedCaptionView)
    a, b = view([caption, "two green stars"], ["k1", "k2"]), view(["two green stars", caption], ["k2", "k1"])
    assert torch.equal(a["ids"][0], b["ids"][1])


def test_esimcse_queue_matches_a_loop() -> None:
    task = _task("[{name: simcse, repetition: 0.3, queue_size: 3, momentum: 0.5}]")
    term = task.terms["simcse"].double()
    term.queue.push(_unit(3, 64, seed=60))
    y1, y2, keys = _unit(4, 64, seed=61), _unit(4, 64, seed=62), _unit(4, 64, seed=63)
    out = term({"text_features": y1, "text2": y2, "keys": keys}, None)
    columns = [*y2, *term.queue.valid()]
    ref = sum(-(y1[i].dot(y2[i]) / 0.05 - lse([y1[i].dot(c) / 0.05 for c in columns])) for i in range(4)) / 4
    assert out["loss"].item() == pytest.approx(float(ref), rel=1e-9)
    online = [p.detach().clone() for p in task.model.text.parameters()]
    with torch.no_grad():
        for p in task.model.text.parameters():
            p.add_(1.0)
    task.on_step_end(StepContext(1, features={"simcse/keys": keys}))
    for p, o in zip(term.text_m.parameters(), online):
        torch.testing.assert_close(p, (0.5 * o + 0.5 * (o + 1.0)).to(p.dtype))
    assert sorted(term.queue.valid()[:, 0].tolist()) == sorted(keys[1:, 0].tolist())  # the newest 3 keys


def test_consert_cutoff_and_shuffle_views() -> None:
    import random

    from mmcl.data.views import EditedCaptionView, cut_words, shuffle_words

    caption = "a small red circle at the top left next to two blue squares"
    for seed in range(20):
        cut = cut_words(caption, 0.3, random.Random(seed)).split()
        words = iter(caption.split())
        assert cut and all(any(w == x for x in words) for w in cut)  # a subsequence: words dropped, order kept
        assert sorted(shuffle_words(caption, random.Random(seed)).split()) == sorted(caption.split())
    assert cut_words("dog", 1.0, random.Random(0)) == "dog"  # at least one word kept
    task = _task("[{name: simcse, cutoff: 0.2, shuffle: true}]")  # no dropout needed: the views differ
    view = task.terms["simcse"].views(task.model)["edited"]
    assert isinstance(view, EditedCaptionView) and view.shuffle and view.cutoff == 0.2
    assert view.edit(caption, "k") == view.edit(caption, "k") != caption
