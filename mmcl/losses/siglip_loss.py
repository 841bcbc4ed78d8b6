"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.data.batch import Batch
from mmcl.losses.base import LossTerm
from mmcl.losses.clip_loss import contrastive_outputs
from mmcl.losses.distributed import all_gather_cat, world_info
from mmcl.registry import LOSSES
from mmcl.utils import UserError


class SigLipLoss(nn.Module):
    """Binary classification of every image-text pair as matching or not.

    With L2-normalised features x_i (image), y_j (text) of a batch of N pairs, temperature
    t = exp(logit_scale), bias b and z_ij = 1 if i == j else -1:

        L = -1/N * sum_i sum_j log sigmoid(z_ij * (t * <x_i, y_j> + b))

    (sum over all N^2 pairs, divided by the batch size, as in the paper). Across P processes each
    process gathers the texts of all processes and computes the rows of its own n images against the
    P * n texts, normalised by n; the mean over processes is the full-batch loss and, with
    `gather_with_grad`, the DDP-averaged gradient is the full-batch gradient. (The paper's chunked
    neighbour exchange saves memory on large meshes; the all-gather is simpler and exact.)

    Args:
        gather_with_grad: differentiable gather of the other processes' text features.

    Shapes: image_features, text_features (n, D) normalised; logit_scale () exponentiated; logit_bias ()
    (None = 0). Returns {'loss', 'acc_i2t', 'acc_t2i'} scalars (top-1 retrieval in the global batch).
    """

    def __init__(self, gather_with_grad: bool = True) -> None:
        super().__init__()
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
        all_texts = all_gather_cat(text_features, self.gather_with_grad)  # (P*n, D)
        logits = logit_scale * image_features @ all_texts.T  # (n, P*n)
        if logit_bias is not None:
            logits = logits + logit_bias
        labels = torch.arange(n, device=logits.device) + rank * n
        signs = torch.full_like(logits, -1.0)
        signs[torch.arange(n, device=logits.device), labels] = 1.0
        loss = -F.logsigmoid(signs * logits).sum() / n
        with torch.no_grad():
            acc_i2t = (logits.argmax(dim=1) == labels).float().mean()
            all_images = all_gather_cat(image_features.detach(), with_grad=False) if world > 1 else image_features
            acc_t2i = ((text_features @ all_images.T).argmax(dim=1) == labels).float().mean()
        return {"loss": loss, "acc_i2t": acc_i2t, "acc_t2i": acc_t2i}


@dataclass
class SigLipOptions:
    gather_with_grad: bool = True  # differentiable gather of the other processes' text features


@LOSSES.register("siglip")
class SigLipTerm(LossTerm):
    """`SigLipLoss` on the model's image and text features; the model needs a logit bias
    (`model.init_logit_bias`, e.g. -10). Returns {'loss', 'acc_i2t', 'acc_t2i', 'logit_scale', 'logit_bias'}."""

    Options = SigLipOptions
    test_setup = {"preset": "siglip-tiny"}  # the registry-driven tests' toy model (it has a logit bias)
    inputs = ("images", "text", "text_mask")
    batch_features = ("image_features", "text_features")

    def __init__(self, model: nn.Module, options: SigLipOptions | None = None) -> None:
        super().__init__(model, options)
        if getattr(model, "logit_bias", None) is None:
            raise UserError("the siglip loss term needs a logit bias: set model.init_logit_bias (e.g. -10)")
        self.loss = SigLipLoss(gather_with_grad=self.options.gather_with_grad)

    def forward(self, feats: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        return contrastive_outputs(self.loss, feats)
