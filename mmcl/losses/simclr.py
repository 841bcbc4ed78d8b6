"""SimCLR / SLIP: NT-Xent between two strongly augmented views of each image, through an MLP head.

Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations"; added
to CLIP's loss as in SLIP (Mu et al. 2021, "SLIP: Self-supervision meets Language-Image
Pre-training"): weight 1.0, temperature 0.1, a 3-layer MLP head on the image embedding, the CLIP
view mildly cropped and the two SimCLR views strongly augmented (`mmcl.data.augment`).

    z1 = head(f(aug1(x))), z2 = head(f(aug2(x)))          (n, out_dim), L2-normalised
    L  = NT-Xent(z1, z2; t)                               (see `nt_xent.nt_xent`)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.data.augment import AugmentConfig, StrongAugment
from mmcl.data.batch import Batch
from mmcl.data.views import ImageView
from mmcl.losses.base import LossTerm
from mmcl.losses.heads import image_features, mlp
from mmcl.losses.nt_xent import nt_xent
from mmcl.registry import LOSSES


@dataclass
class SimCLROptions:
    temperature: float = 0.1
    head_layers: int = 3
    head_hidden: int = 512  # SLIP: 4096 at ViT-B size
    head_out: int = 128  # SLIP: 256
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@LOSSES.register("simclr")
class SimCLRTerm(LossTerm):
    """Image-image NT-Xent on two strong views. Returns {'loss', 'acc'} (the other view ranked first)."""

    Options = SimCLROptions
    batch_features = ("z1", "z2")
    test_setup = {"with": ["clip"]}

    def __init__(self, model: nn.Module, options: SimCLROptions | None = None) -> None:
        super().__init__(model, options)
        o = self.options
        self.head = mlp(model.cfg.embed_dim, o.head_hidden, o.head_out, o.head_layers)

    def views(self, model: nn.Module) -> dict[str, Any]:
        pre = model.preprocess_cfg()
        augment = StrongAugment(pre["image_size"], self.options.augment, pre["mean"], pre["std"])
        return {"view1": ImageView(augment), "view2": ImageView(augment)}

    def features(self, model: nn.Module, batch: Batch, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        views = torch.cat([batch.views["view1"], batch.views["view2"]])  # one tower pass for both
        z1, z2 = F.normalize(self.head(image_features(model, views)), dim=-1).chunk(2)
        return {"z1": z1, "z2": z2}

    def forward(self, feats: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        return nt_xent(feats["z1"], feats["z2"], self.options.temperature)
