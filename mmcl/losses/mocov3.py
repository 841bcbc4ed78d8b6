"""MoCo v3: symmetric contrast of a predictor's queries with a momentum encoder's keys, no queue.

Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers" (MoCo v3).
Two strong views x1, x2 of each image; the online branch is the image tower f, a projector g and a
predictor h; the key branch an exponential moving average f', g' of the tower and projector:

    q_v = normalize(h(g(f(x_v))))          (n, out), v = 1, 2       queries, with gradient
    k_v = normalize(g'(f'(x_v)))           (n, out)                  keys, no gradient
    ctr(q, k) = 2 t * CE(q @ k_all^T / t, i)                         k_all: the keys of every process (P*n, out)
    L = 1/2 [ ctr(q1, k2) + ctr(q2, k1) ]                            (the paper sums the two; halved here
                                                                      so the weight compares with other terms)

The 2t factor is the paper's (it makes the gradient scale insensitive to t); t = 0.2, the paper's ViT value.
After each optimizer step (`on_step_end`) the key branch moves: theta' <- m theta' + (1 - m) theta (the
paper raises m from 0.99 to 1 on a cosine schedule over training; here m is constant, `momentum`).
The key branch is task state (checkpointed, restored on resume, never optimised). The paper's ViT
stability trick (a frozen random patch projection) is a model option, not part of the loss.

Heads use LayerNorm, not the paper's BatchNorm, so gradient accumulation stays exact (`heads.mlp`).
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
from mmcl.losses.distributed import all_gather_cat, world_info
from mmcl.losses.heads import mlp
from mmcl.registry import LOSSES


@dataclass
class MoCoV3Options:
    temperature: float = 0.2  # the paper's ViT value (ResNet: 1.0)
    momentum: float = 0.99  # the paper: 0.99 -> 1 (cosine)
    proj_hidden: int = 512  # the paper: 4096
    proj_out: int = 128  # the paper: 256
    proj_layers: int = 3
    pred_hidden: int = 512
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def contrast(q: torch.Tensor, k: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo v3's ctr(q, k): this process's queries (n, D) against every process's keys (P*n, D).
    Returns (2t * CE, accuracy)."""
    rank, _ = world_info()
    keys = all_gather_cat(k, with_grad=False)
    labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
    logits = q @ keys.T / temperature
    with torch.no_grad():
        acc = (logits.argmax(1) == labels).float().mean()
    return 2 * temperature * F.cross_entropy(logits, labels), acc


@LOSSES.register("mocov3")
class MoCoV3Term(LossTerm):
    """Image-image MoCo v3 on two strong views. Returns {'loss', 'acc' (key of the other view ranked first)}."""

    Options = MoCoV3Options
    batch_features = ("q1", "q2", "k1", "k2")
    test_setup = {"with": ["clip"], "options": {"proj_hidden": 32, "proj_out": 16, "pred_hidden": 32}}

    def __init__(self, model: nn.Module, options: MoCoV3Options | None = None) -> None:
        super().__init__(model, options)
        o = self.options
        self.projector = mlp(model.cfg.embed_dim, o.proj_hidden, o.proj_out, o.proj_layers)
        self.predictor = mlp(o.proj_out, o.pred_hidden, o.proj_out, 2)
        self.key_tower, self.key_projector = copy.deepcopy(model.image), copy.deepcopy(self.projector)
        for p in [*self.key_tower.parameters(), *self.key_projector.parameters()]:
            p.requires_grad_(False)
        object.__setattr__(self, "_online", model.image)  # not a submodule: the model owns and saves it

    def views(self, model: nn.Module) -> dict[str, Any]:
        pre = model.preprocess_cfg()
        augment = StrongAugment(pre["image_size"], self.options.augment, pre["mean"], pre["std"])
        return {"view1": ImageView(augment), "view2": ImageView(augment)}

    def features(self, model: nn.Module, batch: Batch, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        views = torch.cat([batch.views["view1"], batch.views["view2"]])  # (2n, 3, S, S): one pass for both
        q1, q2 = F.normalize(self.predictor(self.projector(model.encode_image(views, normalize=False))), dim=-1).chunk(
            2
        )
        with torch.no_grad():
            k1, k2 = F.normalize(self.key_projector(self.key_tower(views)), dim=-1).chunk(2)
        return {"q1": q1, "q2": q2, "k1": k1, "k2": k2}

    def forward(self, feats: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        t = self.options.temperature
        loss12, acc12 = contrast(feats["q1"], feats["k2"], t)
        loss21, acc21 = contrast(feats["q2"], feats["k1"], t)
        return {"loss": (loss12 + loss21) / 2, "acc": (acc12 + acc21) / 2}

    @torch.no_grad()
    def on_step_end(self, ctx: StepContext) -> None:
        m = self.options.momentum
        for key, online in ((self.key_tower, self._online), (self.key_projector, self.projector)):
            for k, o in zip(key.parameters(), online.parameters()):
                k.mul_(m).add_(o.detach(), alpha=1 - m)
            for k, o in zip(key.buffers(), online.buffers()):
                k.copy_(o)
