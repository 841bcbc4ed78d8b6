"""Multi-crop (mmcl.data.multicrop): view shapes, per-key determinism through a resumed stream, the DINO and
SwAV losses with local crops against plain loops, and the accumulated gradient equal to the full batch."""

from __future__ import annotations

import math
import random

import pytest
import torch

from mmcl.config import load_experiment
from mmcl.data.batch import Batch
from mmcl.data.pipeline import build_stream
from mmcl.data.shards import StreamState, make_loader
from mmcl.data.synthetic import generate
from mmcl.models import build_model
from mmcl.tasks import build_task

pytestmark = pytest.mark.usefixtures("one_thread")

DINO = "{name: dino, out_dim: 8, hidden: 16, bottleneck: 8, local_crops: 3, local_size: 16}"
SWAV = "{name: swav, prototypes: 6, proj_hidden: 16, proj_out: 8, local_crops: 2, local_size: 16}"


def _task(terms: str, *extra: str):
    torch.manual_seed(0)
    cfg = load_experiment(None, ["model.preset=clip-tiny", f"loss.terms={terms}", *extra])
    return build_task(build_model(cfg.model), cfg), cfg


def _lse(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def _cross_entropy(q: list[float], logits: list[float]) -> float:
    z = _lse(logits)
    return -sum(qk * (s - z) for qk, s in zip(q, logits))


def test_views_are_two_global_and_n_local_crops() -> None:
    task, _ = _task(f"[clip, {DINO}]")
    views = task.views()
    assert sorted(views) == ["dino/local0", "dino/local1", "dino/local2", "dino/view1", "dino/view2"]
    image = generate(0, image_size=64).image
    shapes = {name: tuple(view(image, random.Random(0)).shape) for name, view in views.items()}
    assert shapes["dino/view1"] == shapes["dino/view2"] == (3, 32, 32)
    assert all(shapes[f"dino/local{i}"] == (3, 16, 16) for i in range(3))
    # the ViT takes both sizes: locals through the resampled position embedding, globals as before
    out = task.model.encode_image(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 64)
    plain, _ = _task("[clip, {name: dino, out_dim: 8, hidden: 16, bottleneck: 8}]")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(task.model.encode_image(x), plain.model.encode_image(x))


def test_crops_depend_on_the_sample_key_and_a_resumed_stream_repeats_them() -> None:
    task, cfg = _task(f"[clip, {DINO}]", "data.batch_size=4", "data.shuffle_buffer=8")

    def loader(state: StreamState):  # the trainer's loader, its worker processes on
        s = build_stream(cfg.data, task.model, ["builtin:shapes/val"], train=True, seed=3, views=task.views())
        return make_loader(s, 2, state)

    first = loader(StreamState())
    it = iter(first)
    batches = [next(it) for _ in range(3)]
    del it
    state = StreamState()
    state.record(batches[0], first.num_workers)
    resumed = iter(loader(StreamState.from_dict(state.to_dict())))
    for expected in batches[1:]:
        got = next(resumed)
        assert got.keys == expected.keys
        for name in expected.views:
            torch.testing.assert_close(got.views[name], expected.views[name], rtol=0, atol=0)
    local = batches[0].views["dino/local0"]
    assert local.shape == (4, 3, 16, 16)
    assert not torch.equal(local[0], local[1])  # each sample its own crop
    assert not torch.equal(batches[0].views["dino/local0"], batches[0].views["dino/local1"])


def test_dino_with_local_crops_matches_a_loop() -> None:
    task, _ = _task(DINO.replace("{name: dino,", "[{name: dino, student_temp: 0.2, teacher_temp: 0.05,") + "]")
    term = task.terms["dino"].double()
    term.center.copy_(torch.randn(8, dtype=torch.float64))
    g = torch.Generator().manual_seed(3)
    n, big_n, k = 4, 3, 8
    s1, s2, t1, t2 = (torch.randn(n, k, generator=g, dtype=torch.float64) for _ in range(4))
    s_local = torch.randn(n, big_n, k, generator=g, dtype=torch.float64)
    out = term({"s1": s1, "s2": s2, "t1": t1, "t2": t2, "s_local": s_local}, None)
    total, pairs = 0.0, 0
    students = [s1, s2] + [s_local[:, j] for j in range(big_n)]
    for v, t in enumerate((t1, t2)):
        for u, s in enumerate(students):
            if u == v:
                continue
            pairs += 1
            for i in range(n):
                e = [math.exp((t[i, c] - term.center[c]) / 0.05) for c in range(k)]
                q = [x / sum(e) for x in e]
                total += _cross_entropy(q, [float(s[i, c]) / 0.2 for c in range(k)]) / n
    assert pairs == 2 * (big_n + 1)
    assert out["loss"].item() == pytest.approx(total / pairs, rel=1e-9)


def _sinkhorn(p: torch.Tensor, eps: float = 0.05, iters: int = 3) -> list[list[float]]:
    b, k = p.shape
    q = [[math.exp(float(p[i, c]) / eps) for i in range(b)] for c in range(k)]
    total = sum(map(sum, q))
    q = [[x / total for x in row] for row in q]
    for _ in range(iters):
        q = [[x / (sum(row) * k) for x in row] for row in q]
        cols = [sum(q[c][i] for c in range(k)) for i in range(b)]
        q = [[q[c][i] / (cols[i] * b) for i in range(b)] for c in range(k)]
    return [[q[c][i] * b for c in range(k)] for i in range(b)]


def test_swav_with_local_crops_codes_the_globals_and_predicts_every_view() -> None:
    task, _ = _task(SWAV.replace("{name: swav,", "[{name: swav, temperature: 0.2,") + "]")
    term = task.terms["swav"].double()
    assert term.batch_features == ("p1", "p2", "p_local")
    g = torch.Generator().manual_seed(5)
    n, big_n, k = 5, 2, 6
    p1, p2 = (
        torch.nn.functional.normalize(torch.randn(n, k, generator=g, dtype=torch.float64), dim=-1) for _ in range(2)
    )
    p_local = torch.nn.functional.normalize(torch.randn(n, big_n, k, generator=g, dtype=torch.float64), dim=-1)
    out = term({"p1": p1, "p2": p2, "p_local": p_local}, None)
    total, pairs = 0.0, 0
    preds = [p1, p2] + [p_local[:, j] for j in range(big_n)]
    for v, q in enumerate((_sinkhorn(p1), _sinkhorn(p2))):  # codes from the global views only
        for u, p in enumerate(preds):
            if u == v:
                continue
            pairs += 1
            total += sum(_cross_entropy(q[i], [float(p[i, c]) / 0.2 for c in range(k)]) for i in range(n)) / n
    assert out["loss"].item() == pytest.approx(total / pairs, rel=1e-7)


@pytest.mark.parametrize("terms", [DINO, SWAV, f"{DINO}, {SWAV}"])
def test_training_with_local_crops_accumulates_to_the_full_batch(terms: str) -> None:
    task, _ = _task(f"[clip, {terms}]")
    size, n = 32, 8
    samples = [generate(i, image_size=size) for i in range(n)]
    ids, mask = task.model.tokenizer([s.caption for s in samples])
    rngs = [random.Random(i) for i in range(n)]  # one per sample, drawn by each view in turn: the views differ
    views = {
        name: torch.stack([view(s.image, rng) for s, rng in zip(samples, rngs)]) for name, view in task.views().items()
    }
    images = next(v for name, v in views.items() if name.endswith("/view1"))  # any (n, 3, 32, 32) images
    batch = Batch(images=images, text=ids, text_mask=mask, keys=[f"{i:04d}" for i in range(n)], views=views)
    grads = []
    for k in (1, 4):
        task.zero_grad()
        out = task.step(batch.split(k)).metrics
        grads.append((out, {p: w.grad.clone() for p, w in task.named_parameters() if w.grad is not None}))
    (full_out, full), (acc_out, acc) = grads
    assert full.keys() == acc.keys() and any("trunk.blocks" in p for p in full)
    for name in full:
        torch.testing.assert_close(acc[name], full[name], atol=2e-5, rtol=1e-4, msg=name)
    assert acc_out["loss"] == pytest.approx(full_out["loss"], rel=1e-5)


def test_terms_asking_for_identical_views_share_the_views_and_the_tower_pass() -> None:
    task, _ = _task(f"[clip, {DINO}, {SWAV}]")
    views = task.views()
    # swav (a batch term) comes first and owns the two global views and the first two local ones
    assert sorted(views) == ["dino/local2", "swav/local0", "swav/local1", "swav/view1", "swav/view2"]
    g = torch.Generator().manual_seed(0)
    shapes = {"view1": 32, "view2": 32, "local0": 16, "local1": 16, "local2": 16}
    batch = Batch(
        images=torch.randn(3, 3, 32, 32, generator=g),
        keys=["a", "b", "c"],
        views={n: torch.randn(3, 3, shapes[n.split("/")[1]], shapes[n.split("/")[1]], generator=g) for n in views},
    )
    batch.text, batch.text_mask = task.model.tokenizer(["x", "y", "z"])
    assert torch.equal(task.scoped_batch("dino", batch).views["view1"], batch.views["swav/view1"])
    assert torch.equal(task.scoped_batch("dino", batch).views["local2"], batch.views["dino/local2"])
    calls: list[tuple[int, ...]] = []
    hook = task.model.image.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    feats = task(batch)
    hook.remove()
    # clip's images, the globals (2n) once, swav's locals (2n), dino's locals (3n): dino's are new tensors
    assert calls.count((6, 3, 32, 32)) == 1, calls
    # the shared pass gives each term what its own pass would
    for name in ("dino", "swav"):
        term = task.terms[name]
        own = term.features(task.model, task.scoped_batch(name, batch), {})
        for key, value in own.items():
            torch.testing.assert_close(feats[f"{name}/{key}"], value, msg=f"{name}/{key}")
