"""Joint task: weighted contrastive + caption loss; accumulation equals the full-batch objective."""

from __future__ import annotations

import pytest
import torch

from mmcl.config import load_experiment
from mmcl.data.batch import Batch
from mmcl.data.tokenizer_train import save_tokenizer, train_tokenizer
from mmcl.losses import ClipLoss
from mmcl.losses.captioning import PrefixLMLoss
from mmcl.models import build_model
from mmcl.tasks import build_task
from mmcl.tasks.joint import JointTask

CAPTIONS = [
    "a small red circle in the top left corner",
    "two large blue squares along the bottom",
    "a picture of three green stars near the bottom",
    "a drawing of a yellow triangle in the middle",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("joint_task_tok") / "tokenizer.json"
    tok = train_tokenizer(CAPTIONS * 5, vocab_size=100, min_frequency=1)
    save_tokenizer(tok, path)
    cfg = load_experiment(
        None,
        [
            "model.preset=joint-tiny",
            f"model.text.tokenizer={path}",
            f"model.text.vocab_size={tok.get_vocab_size()}",
            "loss.contrastive_weight=0.7",
            "loss.caption_weight=2.0",
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg.model)
    task = build_task(model, cfg)
    text, mask = model.tokenizer(CAPTIONS)
    batch = Batch(images=torch.randn(4, 3, 32, 32), text=text, text_mask=mask, captions=CAPTIONS, keys=list("abcd"))
    return task, batch


def test_forward_weights_both_losses(setup) -> None:
    task, batch = setup
    assert isinstance(task, JointTask)
    out = task(batch)
    expected = {"loss", "contrastive_loss", "caption_loss", "token_acc", "ppl", "acc_i2t", "acc_t2i", "logit_scale"}
    assert expected <= set(out)
    feats = task.model(batch.images, batch.text, batch.text_mask, captions=batch.captions, keys=batch.keys)
    clip = ClipLoss()(feats["image_features"], feats["text_features"], feats["logit_scale"])["loss"]
    cap = PrefixLMLoss()(feats["logits"], feats["labels"])["loss"]
    assert out["contrastive_loss"].item() == pytest.approx(clip.item(), rel=1e-5)
    assert out["caption_loss"].item() == pytest.approx(cap.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.7 * clip.item() + 2.0 * cap.item(), rel=1e-5)
    with pytest.raises(ValueError, match="needs images and tokenized text"):
        task(Batch(images=batch.images, captions=batch.captions))


def test_accumulation_equals_full_batch_objective(setup) -> None:
    """k micro-batches: full-batch contrastive gradient + mean of the micro-batch caption gradients."""
    task, batch = setup
    task.train()
    micro = batch.split(2)
    task.zero_grad()
    metrics = task.forward_backward(lambda mb, **kw: task(mb, **kw), micro, lambda loss, last: loss.backward())
    accumulated = {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}

    task.zero_grad()
    feats = task.model(batch.images, batch.text, batch.text_mask)
    clip = ClipLoss()(feats["image_features"], feats["text_features"], feats["logit_scale"])["loss"]
    caps = []
    for mb in micro:
        f = task.model(mb.images, captions=mb.captions, keys=mb.keys)
        caps.append(PrefixLMLoss()(f["logits"], f["labels"])["loss"])
    reference = 0.7 * clip + 2.0 * sum(caps) / len(caps)
    reference.backward()
    assert metrics["loss"] == pytest.approx(reference.item(), rel=1e-5)
    assert metrics["contrastive_loss"] == pytest.approx(clip.item(), rel=1e-5)
    checked = 0
    for name, p in task.named_parameters():
        if p.grad is None:
            continue
        torch.testing.assert_close(accumulated[name], p.grad, atol=2e-5, rtol=1e-4, msg=name)
        checked += 1
    assert checked == len(accumulated) and any(n.endswith("logit_scale") for n in accumulated)
    task.zero_grad()
