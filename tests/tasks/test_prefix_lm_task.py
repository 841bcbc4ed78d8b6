"""PrefixLMLoss against a plain reference, and the PrefixLM task (registry, weights, accumulation)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mmcl.config import LossConfig, load_experiment
from mmcl.data.batch import Batch
from mmcl.data.tokenizer_train import save_tokenizer, train_tokenizer
from mmcl.losses.captioning import IGNORE_INDEX, PrefixLMLoss
from mmcl.models import build_model
from mmcl.tasks import build_task
from mmcl.tasks.prefix_lm import PrefixLMTask

CAPTIONS = [
    "a small red circle in the top left corner",
    "two large blue squares along the bottom",
    "a picture of three green stars near the bottom",
    "a drawing of a yellow triangle in the middle",
]


def reference_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Token-mean negative log-likelihood and argmax accuracy by explicit loops."""
    total, hits, n = 0.0, 0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            y = int(labels[b, t])
            if y == IGNORE_INDEX:
                continue
            row = logits[b, t].detach().double()
            total += float(torch.logsumexp(row, 0) - row[y])
            hits += int(int(row.argmax()) == y)
            n += 1
    return total / n, hits / n


def test_loss_matches_reference() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 3
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[0, 3:] = IGNORE_INDEX  # padding
    labels[1, :2] = IGNORE_INDEX  # a prefix would never be labelled; ignore anywhere
    labels[2, :] = IGNORE_INDEX  # a sample without target
    out = PrefixLMLoss()(logits, labels)
    ref_loss, ref_acc = reference_loss(logits, labels)
    assert out["loss"].item() == pytest.approx(ref_loss, rel=1e-5)
    assert out["token_acc"].item() == pytest.approx(ref_acc)
    assert out["ppl"].item() == pytest.approx(math.exp(ref_loss), rel=1e-5)
    assert int(out["num_tokens"]) == int((labels != IGNORE_INDEX).sum())
    # ignored positions get exactly zero gradient
    logits.requires_grad_(True)
    PrefixLMLoss()(logits, labels)["loss"].backward()
    assert (logits.grad[labels == IGNORE_INDEX] == 0).all() and logits.grad[labels != IGNORE_INDEX].abs().sum() > 0
    smoothed = PrefixLMLoss(label_smoothing=0.1)(logits.detach(), labels)
    logp = logits.detach().log_softmax(-1)[labels != IGNORE_INDEX]  # (N, V)
    uniform_ce = float(-logp.mean(-1).mean())
    assert smoothed["loss"].item() == pytest.approx(0.9 * ref_loss + 0.1 * uniform_ce, rel=1e-5)
    assert smoothed["ppl"].item() == pytest.approx(out["ppl"].item(), rel=1e-5)  # perplexity stays unsmoothed


def test_loss_without_targets_is_zero_and_differentiable() -> None:
    logits = torch.randn(2, 4, 7, requires_grad=True)
    out = PrefixLMLoss()(logits, torch.full((2, 4), IGNORE_INDEX))
    assert out["loss"].item() == 0.0 and out["ppl"].item() == 1.0
    out["loss"].backward()
    assert logits.grad is not None and (logits.grad == 0).all()


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prefixlm_task_tok") / "tokenizer.json"
    save_tokenizer(train_tokenizer(CAPTIONS * 5, vocab_size=120, min_frequency=1), path)
    return path


def test_task_from_experiment_config(tok_path: Path) -> None:
    torch.manual_seed(0)
    cfg = load_experiment(
        None, ["model.preset=prefixlm-tiny", f"model.text.tokenizer={tok_path}", "loss.caption_weight=0.5"]
    )
    task = build_task(build_model(cfg.model), cfg)
    assert isinstance(task, PrefixLMTask)
    images = torch.randn(4, 3, 32, 32)
    batch = Batch(images=images, captions=CAPTIONS, keys=["a", "b", "c", "d"])
    task.eval()
    out = task(batch)
    assert set(out) == {"loss", "caption_loss", "token_acc", "ppl"}
    assert out["loss"].item() == pytest.approx(0.5 * out["caption_loss"].item(), rel=1e-6)
    assert torch.equal(task(batch)["loss"], out["loss"]), "cuts are seeded by the keys: same batch, same loss"
    logits_out = task.model(images, CAPTIONS, keys=batch.keys)
    assert out["caption_loss"].item() == pytest.approx(
        reference_loss(logits_out["logits"], logits_out["labels"])[0], rel=1e-5
    )
    other_keys = task(Batch(images=images, captions=CAPTIONS, keys=["e", "f", "g", "h"]))
    assert other_keys["loss"].item() != pytest.approx(out["loss"].item())


def test_forward_backward_accumulates_mean_of_micro_batches(tok_path: Path) -> None:
    torch.manual_seed(0)
    cfg = load_experiment(None, ["model.preset=prefixlm-tiny", f"model.text.tokenizer={tok_path}"])
    task = PrefixLMTask(build_model(cfg.model), LossConfig())
    batch = Batch(images=torch.randn(4, 3, 32, 32), captions=CAPTIONS, keys=["a", "b", "c", "d"])
    calls = []

    def backward(loss: torch.Tensor, last: bool) -> None:
        calls.append(last)
        loss.backward()

    metrics = task.forward_backward(task, batch.split(2), backward)
    assert calls == [False, True]
    accumulated = {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}
    task.zero_grad()
    parts = [task(mb)["loss"] for mb in batch.split(2)]
    (sum(parts) / 2).backward()
    for name, p in task.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(accumulated[name], p.grad, atol=1e-6, rtol=1e-5)
    assert metrics["loss"] == pytest.approx(float(sum(parts).detach() / 2), rel=1e-5)
