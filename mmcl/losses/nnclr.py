"""Nearest-neighbour positives: each image is also pulled to the nearest past caption embedding of
its own caption (DeCLIP's nearest-neighbour supervision; NNCLR's support set).

Li et al. 2022, "Supervision Exists Everywhere: A Data Efficient Contrastive Language-Image
Pre-training Paradigm" (DeCLIP); Dwibedi et al. 2021, "With a Little Help from My Friends" (NNCLR).

    nn(y_i) = argmax_{q in Q} <y_i, q>             Q: queue of past (gathered) text embeddings
    L = -1/n sum_i log softmax_j(t <x_i, nn(y_j)>)[i]       in-batch negatives, t = the model's scale

Before the queue holds anything the loss is 0. The queue is task state (checkpointed); after each
step the batch's text embeddings of every rank are enqueued.
"""

from __future__ import annotations

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
class NNOptions:
    queue_size: int = 4096  # DeCLIP: 64k


@LOSSES.register("nnclr")
class NearestNeighbourTerm(LossTerm):
    """Image -> nearest-neighbour caption InfoNCE. Returns {'loss', 'nn_acc', 'nn_sim'}."""

    Options = NNOptions
    inputs = ("images", "text", "text_mask")
    batch_features = ("image_features", "text_features")
    test_setup = {"with": ["clip"], "options": {"queue_size": 64}}

    def __init__(self, model: nn.Module, options: NNOptions | None = None) -> None:
        super().__init__(model, options)
        self.queue = FeatureQueue(self.options.queue_size, model.cfg.embed_dim)

    def forward(self, feats: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        x, y, t = feats["image_features"], feats["text_features"], feats["logit_scale"]
        bank = self.queue.valid()
        if bank.shape[0] == 0:
            zero = (x.sum() + y.sum()) * 0.0  # keeps every feature in the graph (accumulation, DDP)
            return {"loss": zero, "nn_acc": zero.detach(), "nn_sim": zero.detach()}
        rank, _ = world_info()
        with torch.no_grad():
            sim, idx = (y.detach() @ bank.T).max(dim=1)
            neighbours = bank[idx]  # (n, D)
        all_nn = all_gather_cat(neighbours, with_grad=False)  # (P*n, D)
        labels = torch.arange(x.shape[0], device=x.device) + rank * x.shape[0]
        logits = t * x @ all_nn.T
        loss = F.cross_entropy(logits, labels)
        with torch.no_grad():
            acc = (logits.argmax(1) == labels).float().mean()
        return {"loss": loss, "nn_acc": acc, "nn_sim": sim.mean()}

    @torch.no_grad()
    def on_step_end(self, ctx: StepContext) -> None:
        self.queue.push(ctx.gather(ctx.features["text_features"]))
