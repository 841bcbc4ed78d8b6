from __future__ import annotations

import pytest
import torch
from loss_reference import LOG_SCALE, accuracy_reference, random_features, siglip_loss_reference

from mmcl.losses import SigLipLoss


def test_matches_reference_loss_and_gradients() -> None:
    img, txt = random_features(6, 4, seed=1)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    log_scale = torch.tensor(LOG_SCALE, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)

    out = SigLipLoss()(img, txt, log_scale.exp(), bias)
    grads = torch.autograd.grad(out["loss"], [img, txt, log_scale, bias])
    ref = siglip_loss_reference(img, txt, log_scale.exp(), bias)
    ref_grads = torch.autograd.grad(ref, [img, txt, log_scale, bias])

    torch.testing.assert_close(out["loss"], ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    assert float(out["acc_i2t"]) == pytest.approx(accuracy_reference(img, txt))
    assert float(out["acc_t2i"]) == pytest.approx(accuracy_reference(txt, img))


def test_normalised_by_batch_size_not_pairs() -> None:
    """Paper: the sum over all N^2 pairs divided by N, so the loss grows with the batch at fixed logits."""
    img = torch.eye(8, dtype=torch.float64)
    loss8 = SigLipLoss()(img, img, torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    loss4 = SigLipLoss()(
        img[:4], img[:4], torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    )
    # per row: one positive (logit 1) and N-1 negatives (logit 0)
    log2 = torch.log(torch.tensor(2.0, dtype=torch.float64))
    expected = lambda n: -torch.nn.functional.logsigmoid(torch.tensor(1.0, dtype=torch.float64)) + (n - 1) * log2  # noqa: E731
    torch.testing.assert_close(loss8["loss"], expected(8))
    torch.testing.assert_close(loss4["loss"], expected(4))
