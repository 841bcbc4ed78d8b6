"""SimCLR / SLIP: NT-Xent between two strongly augmented views of each image, through an MLP head.

Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations"; added
to CLIP's loss as in SLIP (Mu et al. 2021, "SLIP: Self-supervision meets Language-Image
Pre-training"): weight 1.0, temperature 0.1, a 3-layer MLP head on the image embedding, the CLIP
view mildly cropped and the two SimCLR views strongly augmented (`mmcl.data.augment`).

    z1 = head(f(aug1(x))), z2 = head(f(aug2(x)))          (n, out_dim), L2-normalised
    L  = NT-Xent(z1, z2; t)                               (see `nt_xent.nt_xent`)

SimCLRv2 (Chen et al. 2020b, "Big Self-Supervised Models are Strong Semi-Supervised Learners") as options:
a deeper head (`head_layers: 3`, the default; the paper fine-tunes from the head's first layer, `head[0]`)
and a momentum encoder (`momentum > 0`): an EMA copy f', head' of the tower and head makes the keys, and a
queue of past keys (`queue_size`) adds negatives, as in MoCo:

    k_v = normalize(head'(f'(aug_v(x))))                  (n, out_dim), no gradient
    L   = 1/2 [ InfoNCE(z1 -> [k2; queue]) + InfoNCE(z2 -> [k1; queue]) ]     keys of every process
    theta' <- m theta' + (1 - m) theta after each step; the step's keys (every process) enter the queue
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
from mmcl.losses.heads import image_features, mlp
from mmcl.losses.nt_xent import nt_xent
from mmcl.losses.queue import FeatureQueue
from mmcl.registry import LOSSES


@dataclass
class SimCLROptions:
    temperature: float = 0.1
    head_layers: int = 3  # SimCLRv2: 3 (SimCLR: 2)
    head_hidden: int = 512  # SLIP: 4096 at ViT-B size
    head_out: int = 128  # SLIP: 256
    momentum: float = 0.0  # SimCLRv2's momentum encoder (0 = none; the paper: 0.999)
    queue_size: int = 0  # past momentum keys as more negatives (with momentum > 0; the paper: 65536)
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
        if o.momentum > 0:
            self.batch_features = ("z1", "z2", "k1", "k2")  # type: ignore[misc]
            self.key_tower, self.key_head = copy.deepcopy(model.image), copy.deepcopy(self.head)
            for p in [*self.key_tower.parameters(), *self.key_head.parameters()]:
                p.requires_grad_(False)
            self.queue = FeatureQueue(max(o.queue_size, 1), o.head_out)
            object.__setattr__(self, "_online", model.image)  # not a submodule: the model owns and saves it

    def views(self, model: nn.Module) -> dict[str, Any]:
        pre = model.preprocess_cfg()
        augment = StrongAugment(pre["image_size"], self.options.augment, pre["mean"], pre["std"])
        return {"view1": ImageView(augment), "view2": ImageView(augment)}

    def features(self, model: nn.Module, batch: Batch, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        views = torch.cat([batch.views["view1"], batch.views["view2"]])  # one tower pass for both
        z1, z2 = F.normalize(self.head(image_features(model, views)), dim=-1).chunk(2)
        if self.options.momentum <= 0:
            return {"z1": z1, "z2": z2}
        with torch.no_grad():
            k1, k2 = F.normalize(self.key_head(self.key_tower(views)), dim=-1).chunk(2)
        return {"z1": z1, "z2": z2, "k1": k1, "k2": k2}

    def forward(self, feats: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        if self.options.momentum <= 0:
            return nt_xent(feats["z1"], feats["z2"], self.options.temperature)
        rank, _ = world_info()
        t, n = self.options.temperature, feats["z1"].shape[0]
        queue = self.queue.valid() if self.options.queue_size > 0 else feats["k1"][:0]
        labels = torch.arange(n, device=feats["z1"].device) + rank * n
        loss, acc = 0.0, 0.0
        for q, k in ((feats["z1"], feats["k2"]), (feats["z2"], feats["k1"])):
            logits = q @ torch.cat([all_gather_cat(k, with_grad=False), queue]).T / t  # (n, P*n + Q)
            loss = loss + F.cross_entropy(logits, labels) / 2
            acc = acc + (logits.argmax(1) == labels).float().mean().detach() / 2
        return {"loss": loss, "acc": acc}

    @torch.no_grad()
    def on_step_end(self, ctx: StepContext) -> None:
        o = self.options
        if o.momentum <= 0:
            return
        if o.queue_size > 0:
            self.queue.push(ctx.gather(torch.cat([ctx.features["k1"], ctx.features["k2"]])))
        for key, online in ((self.key_tower, self._online), (self.key_head, self.head)):
            for k, p in zip(key.parameters(), online.parameters()):
                k.mul_(o.momentum).add_(p.detach(), alpha=1 - o.momentum)
            for k, p in zip(key.buffers(), online.buffers()):
                k.copy_(p)
