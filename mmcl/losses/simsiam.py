"""SimSiam and BYOL: image-image terms without negatives (a predictor and a stop-gradient).

SimSiam (Chen & He 2021, "Exploring Simple Siamese Representation Learning"):

    z_k = proj(f(x_k)), p_k = pred(z_k)                       two augmented views k = 1, 2
    L   = 1/2 D(p1, sg(z2)) + 1/2 D(p2, sg(z1)),   D(p, z) = -cos(p, z)

BYOL (Grill et al. 2020, "Bootstrap Your Own Latent"): the targets come from a target network, an
exponential moving average of the online encoder and projector, updated after every optimizer step
(`on_step_end`: xi <- m xi + (1 - m) theta), and the loss is 2 - 2 cos (= the normalised MSE):

    L = 1/2 (2 - 2 cos(p1, z2')) + 1/2 (2 - 2 cos(p2, z1'))   z' from the target network

Both are per-sample losses (no in-batch negatives): gradient accumulation averages micro-batches.
The target network (a copy of the image tower + projector) is part of the task state: checkpointed,
restored on resume, never optimised.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.data.augment import AugmentConfig, StrongAugment
from mmcl.data.batch import Batch
from mmcl.data.views import ImageView
from mmcl.losses.base import LossTerm, StepContext
from mmcl.losses.heads import mlp
from mmcl.registry import LOSSES


@dataclass
class SiameseOptions:
    proj_hidden: int = 512
    proj_out: int = 128
    pred_hidden: int = 64  # SimSiam's bottleneck predictor (2048 -> 512 -> 2048 at ResNet-50 size)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class BYOLOptions(SiameseOptions):
    momentum: float = 0.99  # BYOL: 0.996 (-> 1 on a cosine schedule) for long runs


class _Siamese(LossTerm):
    """Two strong views, an online projector + predictor; subclasses say where the targets come from.
    Views and features live under the term's name (the task scopes them): both can train together."""

    def __init__(self, model: nn.Module, options: Any = None) -> None:
        super().__init__(model, options)
        o = self.options
        self.projector = mlp(model.cfg.embed_dim, o.proj_hidden, o.proj_out, 2)
        self.predictor = mlp(o.proj_out, o.pred_hidden, o.proj_out, 2)

    def views(self, model: nn.Module) -> dict[str, Any]:
        pre = model.preprocess_cfg()
        augment = StrongAugment(pre["image_size"], self.options.augment, pre["mean"], pre["std"])
        return {"view1": ImageView(augment), "view2": ImageView(augment)}

    def _views(self, batch: Batch) -> torch.Tensor:
        return torch.cat([batch.views["view1"], batch.views["view2"]])  # (2n, 3, S, S)

    def features(self, model: nn.Module, batch: Batch, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        z = self.projector(model.encode_image(self._views(batch), normalize=False))
        p1, p2 = self.predictor(z).chunk(2)
        t1, t2 = self.targets(model, batch, z)
        return {"p1": p1, "p2": p2, "t1": t1, "t2": t2}

    def targets(self, model: nn.Module, batch: Batch, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, feats: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        p1, p2, t1, t2 = (feats[n] for n in ("p1", "p2", "t1", "t2"))
        cos1 = F.cosine_similarity(p1, t2, dim=-1)  # (n,)
        cos2 = F.cosine_similarity(p2, t1, dim=-1)
        cos = (cos1 + cos2) / 2
        return {"loss": self.distance(cos).mean(), "view_cos": cos.mean().detach()}

    def distance(self, cos: torch.Tensor) -> torch.Tensor:
        return -cos


@LOSSES.register("simsiam")
class SimSiamTerm(_Siamese):
    """SimSiam: the targets are the other view's online projection, gradient stopped.
    Returns {'loss' (-cos, in [-1, 1]), 'view_cos'}."""

    Options = SiameseOptions
    test_setup = {"with": ["clip"]}

    def targets(self, model: nn.Module, batch: Batch, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z1, z2 = z.detach().chunk(2)
        return z1, z2


@LOSSES.register("byol")
class BYOLTerm(_Siamese):
    """BYOL: the targets come from an EMA copy of the image tower and projector.
    Returns {'loss' (2 - 2 cos, in [0, 4]), 'view_cos'}."""

    Options = BYOLOptions

    def __init__(self, model: nn.Module, options: BYOLOptions | None = None) -> None:
        super().__init__(model, options)
        self.target_tower = copy.deepcopy(model.image)
        self.target_projector = copy.deepcopy(self.projector)
        for p in [*self.target_tower.parameters(), *self.target_projector.parameters()]:
            p.requires_grad_(False)
        object.__setattr__(self, "_online", model.image)  # not a submodule: the model owns and saves it

    def targets(self, model: nn.Module, batch: Batch, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            t = self.target_projector(self.target_tower(self._views(batch)))
        t1, t2 = t.chunk(2)
        return t1, t2

    def distance(self, cos: torch.Tensor) -> torch.Tensor:
        return 2 - 2 * cos

    @torch.no_grad()
    def on_step_end(self, ctx: StepContext) -> None:
        m = self.options.momentum
        pairs = [(self.target_tower, self._online), (self.target_projector, self.projector)]
        for target, online in pairs:
            for t, o in zip(target.parameters(), online.parameters()):
                t.mul_(m).add_(o.detach(), alpha=1 - m)
            for t, o in zip(target.buffers(), online.buffers()):
                t.copy_(o)
