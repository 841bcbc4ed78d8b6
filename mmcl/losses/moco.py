"""Image-text contrast with momentum encoders and queues of past keys (MoCo / ALBEF style).

He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning"; Li et al. 2021,
"Align before Fuse" (ALBEF), whose image-text contrastive loss this is. Momentum copies of both
towers (m = 0.995) embed the batch as keys; the queues hold the keys of the last K samples as extra
negatives; with momentum distillation (alpha = 0.4) the targets mix the one-hot pairs with the
momentum model's own softmax, which softens the penalty on plausible but unpaired captions:

    keys:  x'_j, y'_j = normalize(f'(x_j)), normalize(g'(y_j))        j over batch (all ranks) + queue
    s_i2t(i, j) = t <x_i, y'_j>,  s_t2i(i, j) = t <y_i, x'_j>          t = the model's logit scale
    q_i2t = alpha * softmax(t <x'_i, y'_.>) + (1 - alpha) * onehot(i)  (likewise q_t2i)
    L = 1/2 [ CE(s_i2t, q_i2t) + CE(s_t2i, q_t2i) ]

After each optimizer step (`on_step_end`) the step's keys of every rank are enqueued (identical
queues on all ranks, no duplicates) and the momentum towers move: theta' <- m theta' + (1 - m) theta.
Momentum towers and queues are task state: checkpointed and restored exactly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.data.batch import Batch
from mmcl.losses.base import LossTerm, StepContext
from mmcl.losses.distributed import all_gather_cat, world_info
from mmcl.losses.queue import FeatureQueue
from mmcl.registry import LOSSES


@dataclass
class MoCoOptions:
    momentum: float = 0.995
    queue_size: int = 4096  # ALBEF: 65536
    alpha: float = 0.4  # momentum distillation (0 = one-hot targets)


@LOSSES.register("moco")
class MoCoTerm(LossTerm):
    """ALBEF's image-text contrast with a momentum queue. Returns {'loss', 'acc_i2t', 'acc_t2i', 'queue'}."""

    Options = MoCoOptions
    inputs = ("images", "text", "text_mask")
    batch_features = ("image_features", "text_features", "image_m", "text_m")
    test_setup = {"options": {"queue_size": 64}}

    def __init__(self, model: nn.Module, options: MoCoOptions | None = None) -> None:
        super().__init__(model, options)
        dim = model.cfg.embed_dim
        self.image_m, self.text_m = copy.deepcopy(model.image), copy.deepcopy(model.text)
        for p in [*self.image_m.parameters(), *self.text_m.parameters()]:
            p.requires_grad_(False)
        self.image_queue = FeatureQueue(self.options.queue_size, dim)
        self.text_queue = FeatureQueue(self.options.queue_size, dim)
        object.__setattr__(self, "_online", (model.image, model.text))  # the model owns and saves them

    def features(self, model: nn.Module, batch: Batch, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {
                "image_m": F.normalize(self.image_m(batch.images), dim=-1),
                "text_m": F.normalize(self.text_m(batch.text, batch.text_mask), dim=-1),
            }

    def forward(self, feats: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        rank, _ = world_info()
        x, y, t = feats["image_features"], feats["text_features"], feats["logit_scale"]
        n = x.shape[0]
        keys_y = torch.cat([all_gather_cat(feats["text_m"], with_grad=False), self.text_queue.valid()])
        keys_x = torch.cat([all_gather_cat(feats["image_m"], with_grad=False), self.image_queue.valid()])
        labels = torch.arange(n, device=x.device) + rank * n
        s_i2t, s_t2i = t * x @ keys_y.T, t * y @ keys_x.T  # (n, P*n + K)
        with torch.no_grad():
            onehot = F.one_hot(labels, keys_y.shape[0]).to(x.dtype)
            a = self.options.alpha
            q_i2t = a * F.softmax(t * feats["image_m"] @ keys_y.T, dim=1) + (1 - a) * onehot
            q_t2i = a * F.softmax(t * feats["text_m"] @ keys_x.T, dim=1) + (1 - a) * onehot
        loss_i2t = -(F.log_softmax(s_i2t, dim=1) * q_i2t).sum(1).mean()
        loss_t2i = -(F.log_softmax(s_t2i, dim=1) * q_t2i).sum(1).mean()
        with torch.no_grad():
            acc_i2t = (s_i2t.argmax(1) == labels).float().mean()
            acc_t2i = (s_t2i.argmax(1) == labels).float().mean()
        queue = torch.tensor(float(self.text_queue.filled))
        return {"loss": (loss_i2t + loss_t2i) / 2, "acc_i2t": acc_i2t, "acc_t2i": acc_t2i, "queue": queue}

    @torch.no_grad()
    def on_step_end(self, ctx: StepContext) -> None:
        self.image_queue.push(ctx.gather(ctx.features["image_m"]))
        self.text_queue.push(ctx.gather(ctx.features["text_m"]))
        m = self.options.momentum
        for momentum, online in zip((self.image_m, self.text_m), self._online):
            for p_m, p in zip(momentum.parameters(), online.parameters()):
                p_m.mul_(m).add_(p.detach(), alpha=1 - m)
