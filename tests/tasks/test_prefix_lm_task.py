"""PrefixLMLoss against a plain reference, and the caption term (registry, weights, loader splits)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mmcl.config import load_experiment
from mmcl.data.batch import Batch
from mmcl.data.tokenizer_train import save_tokenizer, train_tokenizer
from mmcl.data.views import IGNORE_INDEX
from mmcl.losses.captioning import PrefixLMLoss
from mmcl.models import build_model
from mmcl.tasks import build_task

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


def _batch(task, images: torch.Tensor, keys: list[str]) -> Batch:
    """A batch as the loader builds it: the caption splits come from the term's view."""
    batch = Batch(images=images, captions=CAPTIONS, keys=keys)
    for view in task.views().values():
        batch.views.update(view(CAPTIONS, keys, True))
    return batch


def test_task_from_experiment_config(tok_path: Path) -> None:
    torch.manual_seed(0)
    cfg = load_experiment(
        None,
        ["model.preset=prefixlm-tiny", f"model.text.tokenizer={tok_path}", "loss.terms=[{name: caption, weight: 0.5}]"],
    )
    task = build_task(build_model(cfg.model), cfg)
    assert list(task.terms) == ["caption"] and not task.has_batch_terms
    images = torch.randn(4, 3, 32, 32)
    batch = _batch(task, images, ["a", "b", "c", "d"])
    task.eval()
    total, outputs = task.loss(task(batch), batch)
    metrics = task.metrics({n: {m: float(v) for m, v in o.items()} for n, o in outputs.items()})
    assert set(metrics) == {"loss", "caption_loss", "token_acc", "ppl"}
    assert total.item() == pytest.approx(0.5 * metrics["caption_loss"], rel=1e-6)
    assert metrics["loss"] == pytest.approx(total.item(), rel=1e-6)
    again = _batch(task, images, ["a", "b", "c", "d"])
    assert torch.equal(task.loss(task(again), again)[0], total), "cuts are seeded by the keys: same batch, same loss"
    feats = task.model(
        images, **{k: batch.views[f"caption/{k}"] for k in ("prefix_ids", "prefix_mask", "lm_labels", "text_only")}
    )
    assert metrics["caption_loss"] == pytest.approx(reference_loss(feats["logits"], feats["labels"])[0], rel=1e-5)
    other = _batch(task, images, ["e", "f", "g", "h"])
    assert task.loss(task(other), other)[0].item() != pytest.approx(total.item())


def test_model_without_loader_splits_is_a_user_error(tok_path: Path) -> None:
    from mmcl.utils import UserError

    cfg = load_experiment(None, ["model.preset=prefixlm-tiny", f"model.text.tokenizer={tok_path}"])
    model = build_model(cfg.model)
    with pytest.raises(UserError, match="'caption' loss term"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(UserError, match="needs a model that takes"):
        build_task(model, load_experiment(None, ["model.preset=prefixlm-tiny", "loss.terms=[clip]"]))
