from __future__ import annotations

import pytest
import torch
from loss_reference import LOG_SCALE, accuracy_reference, clip_loss_reference, random_features

from mmcl.losses import ClipLoss


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("local_loss", [False, True])
def test_matches_reference_loss_and_gradients(with_bias: bool, local_loss: bool) -> None:
    img, txt = random_features(7, 5)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    log_scale = torch.tensor(LOG_SCALE, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True) if with_bias else None

    out = ClipLoss(local_loss=local_loss)(img, txt, log_scale.exp(), bias)
    grads = torch.autograd.grad(out["loss"], [img, txt, log_scale])
    ref = clip_loss_reference(img, txt, log_scale.exp(), bias)
    ref_grads = torch.autograd.grad(ref, [img, txt, log_scale])

    assert set(out) == {"loss", "acc_i2t", "acc_t2i"}
    torch.testing.assert_close(out["loss"], ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    assert float(out["acc_i2t"]) == pytest.approx(accuracy_reference(img, txt))
    assert float(out["acc_t2i"]) == pytest.approx(accuracy_reference(txt, img))
    assert 0 < float(out["acc_i2t"]) < 1  # the features are neither random nor perfect


def test_perfectly_aligned_features_give_low_loss_and_full_accuracy() -> None:
    img, _ = random_features(16, 64)
    out = ClipLoss()(img, img.clone(), torch.tensor(100.0, dtype=torch.float64))
    assert float(out["loss"]) < 1e-3
    assert float(out["acc_i2t"]) == float(out["acc_t2i"]) == 1.0
    shuffled = ClipLoss()(img, img.roll(1, dims=0), torch.tensor(100.0, dtype=torch.float64))
    assert float(shuffled["loss"]) > 10 and float(shuffled["acc_i2t"]) == 0.0
