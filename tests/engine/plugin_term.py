"""A throwaway loss term defined only here, to show that a new objective needs no edit in mmcl: it is
registered, named in a config, builds its own second image view in the loader, has a trainable head
and a buffer updated after each optimizer step, and all of it trains, accumulates and resumes.

    a = head(encode_image(x)), b = head(encode_image(x'))     x' = a second crop of the same image
    c <- m * c + (1 - m) * mean over processes of mean_rows(head.weight)    (after each step)
    L = InfoNCE((a - c) / |a - c|, (b - c) / |b - c|) at temperature t
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.data.transforms import image_transform
from mmcl.data.views import ImageView
from mmcl.losses.base import LossTerm, StepContext
from mmcl.registry import LOSSES

NAME = "test_head_term"


@dataclass
class HeadOptions:
    dim: int = 16
    temperature: float = 0.2
    momentum: float = 0.5
    crop_scale_min: float = 0.3


@LOSSES.register(NAME)
class HeadTerm(LossTerm):
    Options = HeadOptions
    inputs = ("images",)
    batch_features = ("head_a", "head_b")

    def __init__(self, model: nn.Module, options: HeadOptions | None = None) -> None:
        super().__init__(model, options)
        self.head = nn.Linear(model.cfg.embed_dim, self.options.dim)
        self.register_buffer("center", torch.zeros(self.options.dim))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def views(self, model: nn.Module) -> dict:
        pre = model.preprocess_cfg()
        crop = image_transform(
            pre["image_size"], pre["mean"], pre["std"], train=True, scale=(self.options.crop_scale_min, 1.0)
        )
        return {"image_aug2": ImageView(crop)}

    def features(self, model: nn.Module, batch, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        a = (
            self.head(feats["image_features"])
            if "image_features" in feats
            else self.head(model.encode_image(batch.images))
        )
        b = self.head(model.encode_image(batch.views["image_aug2"]))
        return {"head_a": a, "head_b": b}

    def forward(self, feats: dict[str, torch.Tensor], batch) -> dict[str, torch.Tensor]:
        a = F.normalize(feats["head_a"] - self.center, dim=-1)
        b = F.normalize(feats["head_b"] - self.center, dim=-1)
        logits = a @ b.T / self.options.temperature
        labels = torch.arange(a.shape[0], device=a.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        return {"loss": loss, "view_acc": (logits.argmax(1) == labels).float().mean()}

    @torch.no_grad()
    def on_step_end(self, ctx: StepContext) -> None:
        m = self.options.momentum
        mean = ctx.gather(self.head.weight.detach().mean(1)[None]).mean(0)  # (dim,), the same on every rank
        self.center.mul_(m).add_((1 - m) * mean)
        self.updates += 1
