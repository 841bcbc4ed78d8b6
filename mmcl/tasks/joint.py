"""Joint task: contrastive (CLIP / SigLIP) + PrefixLM captioning on a shared image tower.

    loss = contrastive_weight * L_contrastive + caption_weight * L_PrefixLM

Gradient accumulation keeps every contrastive negative as `ContrastiveTask` does
(GradCache): pass 1 embeds all micro-batches without gradients (towers only, no
decoder); pass 2 recomputes micro-batch j with gradients, towers and decoder,
substitutes its features into the cached set and back-propagates

    contrastive_weight * L_contrastive(full batch) + caption_weight * L_PrefixLM(j) / k

Summed over j this is the full-batch contrastive gradient plus the mean of the
micro-batch caption gradients (what plain accumulation gives for a per-sample loss).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mmcl.config import LossConfig
from mmcl.data.batch import Batch
from mmcl.losses.captioning import PrefixLMLoss
from mmcl.registry import TASKS
from mmcl.tasks.base import Backward
from mmcl.tasks.contrastive import ContrastiveTask
from mmcl.utils import UserError

CAPTION_METRICS = ("caption_loss", "token_acc", "ppl")


class JointTask(ContrastiveTask):
    """`forward(batch)` -> {'loss', 'contrastive_loss', 'caption_loss', 'token_acc', 'ppl', 'acc_i2t',
    'acc_t2i', 'logit_scale' (+ 'logit_bias')}; `forward(batch, features_only=True)` -> the model's
    outputs (`with_caption=False`: contrastive features only, used by accumulation pass 1)."""

    def __init__(self, model: nn.Module, loss_cfg: LossConfig) -> None:
        super().__init__(model, loss_cfg)
        self.caption_weight = loss_cfg.caption_weight
        self.caption_loss = PrefixLMLoss()

    def features(self, batch: Batch, with_caption: bool = True) -> dict[str, torch.Tensor]:
        if batch.images is None or batch.text is None:
            raise UserError("a joint batch needs images and tokenized text (batch.images / batch.text are empty)")
        captions = batch.captions if with_caption else None
        if with_caption and len(batch.captions) != batch.images.shape[0]:
            raise UserError(f"a joint batch needs one caption per image ({len(batch.captions)} for {len(batch)})")
        return self.model(batch.images, batch.text, batch.text_mask, captions=captions, keys=batch.keys or None)

    def joint_loss(self, feats: dict[str, torch.Tensor], caption_scale: float = 1.0) -> dict[str, torch.Tensor]:
        """Weighted sum of the contrastive loss (on `feats`' image/text features) and the caption loss."""
        out = self.compute_loss(feats)  # contrastive, already times contrastive_weight
        lm = self.caption_loss(feats["logits"], feats["labels"])
        out["contrastive_loss"] = out["loss"].detach() / self.weight if self.weight else out["loss"].detach()
        out["loss"] = out["loss"] + self.caption_weight * caption_scale * lm["loss"]
        out["caption_loss"] = lm["loss"].detach()
        out["token_acc"] = lm["token_acc"]
        out["ppl"] = lm["ppl"]
        return out

    def forward(
        self, batch: Batch, features_only: bool = False, with_caption: bool = True, **_
    ) -> dict[str, torch.Tensor]:
        feats = self.features(batch, with_caption=with_caption)
        return feats if features_only else self.joint_loss(feats)

    cache_pass_kwargs = {"with_caption": False}  # pass 1 only fills the contrastive cache

    def micro_batch_loss(self, full: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
        return self.joint_loss(full, caption_scale=1.0 / k)  # each micro-batch's captions are its own

    def forward_backward(
        self, prepared: Callable[..., dict[str, torch.Tensor]], micro_batches: list[Batch], backward: Backward
    ) -> dict[str, float]:
        k = len(micro_batches)
        if k == 1:
            return super().forward_backward(prepared, micro_batches, backward)
        outs = self.grad_cache_passes(prepared, micro_batches, backward)
        result = {name: float(value.detach()) for name, value in outs[-1].items()}
        for name in CAPTION_METRICS:
            result[name] = sum(float(out[name]) for out in outs) / k
        # reported loss: full-batch contrastive + mean caption loss (the objective, not the last pass's share)
        result["loss"] = self.weight * result["contrastive_loss"] + self.caption_weight * result["caption_loss"]
        return result


@TASKS.register("joint")
def build_joint_task(model: nn.Module, loss_cfg: LossConfig) -> JointTask:
    return JointTask(model, loss_cfg)
