"""PrefixLM task: the SimVLM captioner + its suffix cross-entropy."""

from __future__ import annotations

import torch
from torch import nn

from mmcl.config import LossConfig
from mmcl.data.batch import Batch
from mmcl.losses.captioning import PrefixLMLoss
from mmcl.registry import TASKS
from mmcl.tasks.base import Task


class PrefixLMTask(Task):
    """`forward(batch)` -> {'loss', 'caption_loss', 'token_acc', 'ppl'}.

    loss = caption_weight * caption_loss. The model splits and tokenizes `batch.captions`
    itself (seeded by `batch.keys`); `batch.text` is not used. Gradient accumulation uses the
    base class default (mean of micro-batch losses): captioning has no cross-sample term.
    """

    def __init__(self, model: nn.Module, cfg: LossConfig | None = None) -> None:
        super().__init__()
        self.model = model
        self.weight = (cfg or LossConfig()).caption_weight
        self.loss = PrefixLMLoss()

    def forward(self, batch: Batch, **kwargs) -> dict[str, torch.Tensor]:
        out = self.model(batch.images, batch.captions, keys=batch.keys or None)
        lm = self.loss(out["logits"], out["labels"])
        return {
            "loss": self.weight * lm["loss"],
            "caption_loss": lm["loss"].detach(),
            "token_acc": lm["token_acc"],
            "ppl": lm["ppl"],
        }


@TASKS.register("prefix_lm")
def build_prefix_lm_task(model: nn.Module, cfg: LossConfig) -> PrefixLMTask:
    return PrefixLMTask(model, cfg)
