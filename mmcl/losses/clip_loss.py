"""CLIP's symmetric InfoNCE loss (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision"; van den Oord et al. 2018 for InfoNCE)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.data.batch import Batch
from mmcl.losses.base import LossTerm
from mmcl.losses.distributed import gather_features, world_info
from mmcl.registry import LOSSES


class ClipLoss(nn.Module):
    """Symmetric cross-entropy over the image-text similarity matrix.

    With L2-normalised features x_i (image) and y_j (text) of a batch of N pairs and temperature
    t = exp(logit_scale):

        s_ij = t * <x_i, y_j> (+ b)
        L = 1/2 * [ 1/N sum_i -log softmax_j(s_ij)[i]  +  1/N sum_j -log softmax_i(s_ij)[j] ]

    Across P processes the features are gathered so the batch is the global one (N = P * n). With
    `local_loss` each process computes only its own n rows (its images against all texts and its texts
    against all images, labels offset by rank * n) as open_clip does: P times less memory, and with
    `gather_with_grad` the DDP-averaged gradient equals the full-batch gradient. Without
    `gather_with_grad` the other processes' features are constants (open_clip's default, an
    approximation of the full gradient).

    Args:
        local_loss: each process computes the loss rows of its own samples only.
        gather_with_grad: differentiable gather of the other processes' features.

    Shapes: image_features, text_features (n, D) normalised; logit_scale () already exponentiated;
    logit_bias () or None. Returns {'loss', 'acc_i2t', 'acc_t2i'} scalars (accuracies: share of this
    process's images/texts whose best match in the global batch is their pair).
    """

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        rank, world = world_info()
        n = image_features.shape[0]
        labels = torch.arange(n, device=image_features.device)
        if world > 1:
            all_images, all_texts = gather_features(image_features, text_features, self.gather_with_grad)
            if self.local_loss:
                logits_per_image = logit_scale * image_features @ all_texts.T  # (n, P*n)
                logits_per_text = logit_scale * text_features @ all_images.T  # (n, P*n)
                labels = labels + rank * n
            else:
                logits_per_image = logit_scale * all_images @ all_texts.T  # (P*n, P*n)
                logits_per_text = logits_per_image.T
                labels = torch.arange(all_images.shape[0], device=image_features.device)
        else:
            logits_per_image = logit_scale * image_features @ text_features.T  # (n, n)
            logits_per_text = logits_per_image.T
        if logit_bias is not None:
            logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_text + logit_bias
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        with torch.no_grad():
            acc_i2t = (logits_per_image.argmax(dim=1) == labels).float().mean()
            acc_t2i = (logits_per_text.argmax(dim=1) == labels).float().mean()
        return {"loss": loss, "acc_i2t": acc_i2t, "acc_t2i": acc_t2i}


@dataclass
class ClipOptions:
    local_loss: bool = True  # each process computes the rows of its own samples only
    gather_with_grad: bool = True  # differentiable gather of the other processes' features


@LOSSES.register("clip")
class ClipTerm(LossTerm):
    """`ClipLoss` on the model's image and text features (a dual encoder: CLIP, joint).

    Returns {'loss', 'acc_i2t', 'acc_t2i', 'logit_scale' (+ 'logit_bias')}.
    """

    Options = ClipOptions
    inputs = ("images", "text", "text_mask")
    batch_features = ("image_features", "text_features")

    def __init__(self, model: nn.Module, options: ClipOptions | None = None) -> None:
        super().__init__(model, options)
        self.loss = ClipLoss(local_loss=self.options.local_loss, gather_with_grad=self.options.gather_with_grad)

    def forward(self, feats: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        return contrastive_outputs(self.loss, feats)


def contrastive_outputs(loss: nn.Module, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An image-text loss on `feats` plus the temperature (and bias) as metrics."""
    out = loss(feats["image_features"], feats["text_features"], feats["logit_scale"], feats.get("logit_bias"))
    out["logit_scale"] = feats["logit_scale"].detach()
    if feats.get("logit_bias") is not None:
        out["logit_bias"] = feats["logit_bias"].detach()
    return out
