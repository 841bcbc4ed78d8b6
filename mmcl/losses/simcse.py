"""SimCSE: the same caption through the text tower twice, dropout the only noise (unsupervised SimCSE).

Gao et al. 2021, "SimCSE: Simple Contrastive Learning of Sentence Embeddings":

    y1 = g(text), y2 = g(text)       two forward passes, different dropout masks, (n, D) normalised
    L  = -1/n sum_i log softmax_j(<y1_i, y2_j> / t)[i]      t = 0.05, in-batch negatives

The text tower needs dropout (`model.text.dropout`, SimCSE: 0.1); without it both views are the same.

ESimCSE (Wu et al. 2021, "ESimCSE: Enhanced Sample Building Method for Contrastive Learning of Unsupervised
Sentence Embedding") as options: `repetition` (the paper: 0.32) makes the second view the caption with some
words repeated (`mmcl.data.views.EditedCaptionView`, drawn per sample key), so a positive pair differs in
length and length stops being a shortcut; `queue_size` (the paper: 2.5 x batch) adds a momentum queue: an
EMA copy g' of the text tower (momentum m, 0.995) embeds the second view, and the last `queue_size` of its
embeddings (every process's) are extra negatives:

    L = -1/n sum_i log exp(<y1_i, y2_i> / t) / (sum_j exp(<y1_i, y2_j> / t) + sum_q exp(<y1_i, k_q> / t))

ConSERT (Yan et al. 2021, "ConSERT: A Contrastive Framework for Self-Supervised Sentence Representation
Transfer"), its data-side views as options: token cutoff (`cutoff`, a share of words dropped) and token
shuffling (`shuffle`), applied to the caption's words in the loader; its dropout view is SimCSE's. Its
feature cutoff and adversarial perturbation act on the tower's embedding layer and are not offered here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.data.batch import Batch
from mmcl.data.views import EditedCaptionView
from mmcl.losses.base import LossTerm, StepContext
from mmcl.losses.distributed import all_gather_cat, world_info
from mmcl.losses.nt_xent import info_nce
from mmcl.losses.queue import FeatureQueue
from mmcl.registry import LOSSES
from mmcl.utils import UserError


@dataclass
class SimCSEOptions:
    temperature: float = 0.05
    repetition: float = 0.0  # ESimCSE's word repetition rate of the second view (0 = the caption itself)
    cutoff: float = 0.0  # ConSERT's token cutoff: share of the second view's words dropped
    shuffle: bool = False  # ConSERT's token shuffling of the second view
    queue_size: int = 0  # ESimCSE's momentum queue of past second-view embeddings (0 = none)
    momentum: float = 0.995  # of the queue's encoder
    seed: int = 0  # varies the repetitions


@LOSSES.register("simcse")
class SimCSETerm(LossTerm):
    """Text-text InfoNCE between two dropout views of each caption. Returns {'loss', 'acc'}."""

    Options = SimCSEOptions
    inputs = ("text", "text_mask")
    batch_features = ("text_features", "text2")
    test_setup = {"with": ["clip"], "overrides": ["model.text.dropout=0.1"]}

    def __init__(self, model: nn.Module, options: SimCSEOptions | None = None) -> None:
        super().__init__(model, options)
        text_cfg, o = model.cfg.text, self.options
        if text_cfg.kind == "clip" and text_cfg.dropout == 0 and not self.edits:
            raise UserError("the simcse loss term needs text dropout: set model.text.dropout (SimCSE uses 0.1)")
        if o.queue_size > 0:
            self.batch_features = ("text_features", "text2", "keys")  # type: ignore[misc]
            self.text_m = copy.deepcopy(model.text)
            for p in self.text_m.parameters():
                p.requires_grad_(False)
            self.queue = FeatureQueue(o.queue_size, model.cfg.embed_dim)
            object.__setattr__(self, "_online", model.text)  # not a submodule: the model owns and saves it

    @property
    def edits(self) -> bool:
        """Whether the second view is an edited caption (else the caption itself, dropout the only noise)."""
        o = self.options
        return o.repetition > 0 or o.cutoff > 0 or o.shuffle

    def views(self, model: nn.Module) -> dict[str, Any]:
        if not self.edits:
            return {}
        o = self.options
        return {"edited": EditedCaptionView(model.tokenizer, o.repetition, o.cutoff, o.shuffle, o.seed)}

    def features(self, model: nn.Module, batch: Batch, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids, mask = (batch.views["ids"], batch.views["mask"]) if self.edits else (batch.text, batch.text_mask)
        out = {"text2": F.normalize(model.encode_text(ids, mask), dim=-1)}
        if self.options.queue_size > 0:
            with torch.no_grad():
                out["keys"] = F.normalize(self.text_m(ids, mask), dim=-1)
        return out

    def forward(self, feats: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        o = self.options
        if o.queue_size <= 0:
            return info_nce(feats["text_features"], feats["text2"], o.temperature, symmetric=False)
        rank, _ = world_info()
        y1, y2 = feats["text_features"], feats["text2"]
        labels = torch.arange(y1.shape[0], device=y1.device) + rank * y1.shape[0]
        logits = y1 @ torch.cat([all_gather_cat(y2), self.queue.valid()]).T / o.temperature  # (n, P*n + Q)
        loss = F.cross_entropy(logits, labels)
        return {"loss": loss, "acc": (logits.argmax(1) == labels).float().mean().detach()}

    @torch.no_grad()
    def on_step_end(self, ctx: StepContext) -> None:
        if self.options.queue_size <= 0:
            return
        self.queue.push(ctx.gather(ctx.features["keys"]))
        m = self.options.momentum
        for k, p in zip(self.text_m.parameters(), self._online.parameters()):
            k.mul_(m).add_(p.detach(), alpha=1 - m)
