"""Frozen-feature evaluation: the linear probe (parity with CLIP_benchmark), DINO's k-NN, alignment/uniformity."""

import json

import pytest
import torch
import torch.nn.functional as F
from clip_benchmark.metrics import linear_probe as cb
from eval_helpers import labelled_members, write_tar
from test_eval_cli import FakePipeline, cli  # noqa: F401  (the fixture)
from torch.utils.data import DataLoader

from mmcl.eval.alignment import alignment, alignment_uniformity, uniformity
from mmcl.eval.knn import knn_classify, knn_scores
from mmcl.eval.linear_probe import WD_COARSE, WD_GRID, ProbeSettings, linear_probe, sweep_weight_decay, train_linear
from mmcl.eval.runner import probe_metrics


def clusters(n: int, n_classes: int = 4, dim: int = 16, noise: float = 1.2, seed: int = 0):
    """Gaussian clusters around random class means: separable, but noisy enough that weight decay matters."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n_classes, dim, generator=g)
    labels = torch.arange(n) % n_classes
    return means[labels] + noise * torch.randn(n, dim, generator=g), labels


@pytest.fixture
def on_cpu(monkeypatch):
    """CLIP_benchmark's probe calls `.cuda()` on the model and batches; on this CPU machine those are no-ops
    (its DataParallel wrapper already runs the module directly when no GPU exists)."""
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    # its `accuracy` does float() of a 1-element array, which NumPy 2 refuses: the same formula, as a scalar
    monkeypatch.setattr(cb, "accuracy", lambda output, target, topk=(1,): [_accuracy(output, target, k) for k in topk])


def _accuracy(output, target, k):
    pred = output.topk(k, 1, True, True)[1].t()
    return float(pred.eq(target.view(1, -1).expand_as(pred))[:k].reshape(-1).float().sum()) / len(target)


def cb_loader(x, y, batch_size=64):
    return DataLoader(cb.FeatureDataset(x, y), batch_size=batch_size, shuffle=True, num_workers=0)


def test_one_fit_equals_clip_benchmarks(on_cpu):
    x, y = clusters(150)
    x = F.normalize(x, dim=-1)
    for wd in (0.0, 1e-2):
        theirs = cb.train(cb_loader(x, y), 16, 4, wd, 0.1, 3, False, "cpu", seed=3).module
        ours = train_linear(x, y, 4, wd, ProbeSettings(lr=0.1, epochs=3, batch_size=64, seed=3))
        torch.testing.assert_close(ours.weight, theirs.weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.bias, theirs.bias, rtol=0, atol=1e-6)


def test_weight_decay_sweep_equals_clip_benchmarks(on_cpu):
    x, y = clusters(120, noise=2.0, seed=1)
    x = F.normalize(x, dim=-1)
    tr, va = slice(0, 80), slice(80, 120)
    s = ProbeSettings(lr=0.1, epochs=2, batch_size=32, seed=0)
    # CLIP_benchmark's driver (metrics/linear_probe.py `evaluate`), on the same loaders
    args = (cb_loader(x[tr], y[tr], 32), cb_loader(x[va], y[va], 32), 16, 4, 0.1, 2, False, "cpu", False, 0)
    peak = cb.find_peak(WD_GRID, [i for i, v in enumerate(WD_GRID) if v in WD_COARSE], *args)
    span = 8
    while span > 0:
        left, right = max(peak - span, 0), min(peak + span, len(WD_GRID) - 1)
        peak = cb.find_peak(WD_GRID, [left, peak, right], *args)
        span //= 2
    ours, tried = sweep_weight_decay((x[tr], y[tr]), (x[va], y[va]), 4, s)
    assert ours == WD_GRID[peak]
    assert len(set(tried.values())) > 1  # the sweep saw different accuracies: the choice was not a tie


def test_linear_probe_and_knn_learn_far_above_chance():
    x, y = clusters(400, n_classes=8, noise=0.8)
    xt, yt = clusters(200, n_classes=8, noise=0.8, seed=0)  # same means (seed 0), fresh... same draw order
    xt = xt + 0.1 * torch.randn_like(xt)
    lp = linear_probe(x, y, xt, yt, settings=ProbeSettings(epochs=5))["metrics"]
    knn = knn_classify(x, y, xt, yt)["metrics"]
    assert lp["top1"] > 0.8 and knn["top1"] > 0.8  # chance 0.125
    assert lp["n_train"] == 400 and lp["weight_decay"] in WD_GRID  # train + validation for the final fit
    few = linear_probe(x, y, xt, yt, fewshot_k=5, settings=ProbeSettings(epochs=5))["metrics"]
    assert few["n_train"] == 5 * 8
    with pytest.raises(ValueError, match="fewer samples"):
        linear_probe(x[:20], y[:20], xt, yt, fewshot_k=5)


def test_knn_equals_a_plain_loop():
    bank, labels = clusters(60, n_classes=3, seed=2)
    queries, _ = clusters(7, n_classes=3, seed=5)
    ours = knn_scores(bank, labels, queries, 3, k=5, temperature=0.1, block=3)
    b, q = F.normalize(bank, dim=-1), F.normalize(queries, dim=-1)
    for i in range(len(q)):
        sims = [(float(q[i] @ b[j]), int(labels[j])) for j in range(len(b))]
        votes = [0.0, 0.0, 0.0]
        for s, c in sorted(sims, reverse=True)[:5]:
            votes[c] += torch.tensor(s / 0.1).exp().item()
        torch.testing.assert_close(ours[i], torch.tensor(votes), rtol=1e-5, atol=1e-5)


def test_alignment_and_uniformity_equal_plain_loops():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 5, generator=g), torch.randn(9, 5, generator=g)
    t2i = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 5])
    ni, nt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    align = sum(float((ni[t2i[j]] - nt[j]).norm() ** 2) for j in range(9)) / 9
    pairs = [(a, b) for a in range(6) for b in range(a + 1, 6)]
    unif = torch.tensor(sum(float(torch.exp(-2 * (ni[a] - ni[b]).norm() ** 2)) for a, b in pairs) / len(pairs)).log()
    out = alignment_uniformity(img, txt, t2i)
    assert out["align"] == pytest.approx(align, rel=1e-5) and out["uniform_image"] == pytest.approx(
        float(unif), rel=1e-5
    )
    assert alignment(img, img) == pytest.approx(0.0, abs=1e-6)  # identical pairs are perfectly aligned
    collapsed = uniformity(torch.ones(10, 5))
    assert collapsed == pytest.approx(0.0, abs=1e-6) and uniformity(img) < collapsed  # collapse = least uniform


def test_probe_metrics_of_the_eval_hook():
    x, y = clusters(200, n_classes=4, noise=0.5)
    m = probe_metrics(x, y)
    assert set(m) == {"knn_top1", "linear_probe_top1"} and min(m.values()) > 0.8
    assert probe_metrics(x, torch.zeros(200, dtype=torch.long)) == {}  # one class: nothing to probe


def test_linear_probe_and_knn_commands(cli, tmp_path, capsys):  # noqa: F811
    test = write_tar(tmp_path / "test" / "0.tar", labelled_members(list(range(12, 20)), [i % 3 for i in range(8)]))
    (tmp_path / "test" / "classnames.txt").write_text("cat\ndog\nbird\n")
    for task in ("linear-probe", "knn"):
        out = tmp_path / task
        rc = cli(
            "eval", task, cli.run_dir, "--shards", cli.shards, "--test-shards", str(test), "--out", str(out), "--quiet"
        )
        assert rc == 0
        summary = json.loads((out / "eval.json").read_text())
        assert summary["metrics"]["n_train"] == 12 and summary["metrics"]["n_test"] == 8
        assert 0.0 <= summary["metrics"]["top1"] <= 1.0
        assert "top1" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad:
        cli("eval", "knn", cli.run_dir, "--shards", cli.shards, "--test-shards", str(test), "-k", "0")
    assert bad.value.code == 2
    assert "must be >= 1" in capsys.readouterr().err
    assert cli("eval", "retrieval", cli.run_dir, "--shards", cli.shards, "--quiet") == 0
    metrics = json.loads((tmp_path / "run" / "eval" / "retrieval" / "eval.json").read_text())["metrics"]
    assert {"align", "uniform_image", "uniform_text"} <= set(metrics)
