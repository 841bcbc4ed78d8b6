"""NegCLIP: CLIP's loss with rule-made hard-negative captions as extra columns of the image-to-text softmax.

Yuksekgonul et al. 2023, "When and Why Vision-Language Models Behave like Bags-of-Words, and What to
Do About It". Each caption comes with `count` negatives made in the loader (`mmcl.data.negatives`:
swapped words, replaced attributes, shuffled trigrams); each image must pick its caption among the
batch's captions AND all the batch's hard negatives:

    s_i2t = t * x @ [y ; y_neg].T                (n, N + N * count), invalid negatives masked
    s_t2i = t * y @ x.T                          (n, N)
    L = 1/2 [ CE(s_i2t, i) + CE(s_t2i, i) ]

Use it instead of `clip` (it is CLIP's loss plus the negatives).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.data.batch import Batch
from mmcl.data.negatives import RULES, HardNegativesView
from mmcl.losses.base import LossTerm
from mmcl.losses.distributed import all_gather_cat, world_info
from mmcl.registry import LOSSES


@dataclass
class NegCLIPOptions:
    count: int = 3  # hard negatives per caption
    rules: tuple[str, ...] = RULES  # swap, replace, shuffle


@LOSSES.register("negclip")
class NegCLIPTerm(LossTerm):
    """CLIP's symmetric InfoNCE with hard-negative captions. Returns {'loss', 'acc_i2t', 'acc_t2i', 'hard_acc'}
    (hard_acc: share of images scoring their caption above all its own negatives)."""

    Options = NegCLIPOptions
    inputs = ("images", "text", "text_mask")
    batch_features = ("image_features", "text_features", "neg_features", "neg_valid")

    def views(self, model: nn.Module) -> dict[str, Any]:
        return {"hard_negatives": HardNegativesView(model.tokenizer, self.options.count, self.options.rules)}

    def features(self, model: nn.Module, batch: Batch, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids, mask = batch.views["neg_text"], batch.views["neg_mask"]  # (n, m, L)
        n, m = ids.shape[:2]
        neg = model.encode_text(ids.flatten(0, 1), mask.flatten(0, 1)).view(n, m, -1)  # (n, m, D)
        return {"neg_features": neg, "neg_valid": batch.views["neg_valid"]}

    def forward(self, feats: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        rank, _ = world_info()
        x, y, t = feats["image_features"], feats["text_features"], feats["logit_scale"]
        n = x.shape[0]
        labels = torch.arange(n, device=x.device) + rank * n
        all_x, all_y = all_gather_cat(x), all_gather_cat(y)
        neg = all_gather_cat(feats["neg_features"]).flatten(0, 1)  # (P*n*m, D)
        valid = all_gather_cat(feats["neg_valid"], with_grad=False).flatten()  # (P*n*m,)
        s_i2t = t * x @ torch.cat([all_y, neg]).T
        pad = torch.ones(all_y.shape[0], dtype=torch.bool, device=x.device)
        s_i2t = s_i2t.masked_fill(~torch.cat([pad, valid])[None, :], float("-inf"))
        s_t2i = t * y @ all_x.T
        loss = (F.cross_entropy(s_i2t, labels) + F.cross_entropy(s_t2i, labels)) / 2
        with torch.no_grad():
            m = feats["neg_features"].shape[1]
            own_neg = (x[:, None, :] * feats["neg_features"]).sum(-1)  # (n, m) image vs its own negatives
            own_neg = own_neg.masked_fill(~feats["neg_valid"], float("-inf"))
            pos = (x * y).sum(-1)
            hard_acc = (pos > own_neg.max(1).values).float().mean() if m else torch.ones(())
            acc_i2t = (s_i2t.argmax(1) == labels).float().mean()
            acc_t2i = (s_t2i.argmax(1) == labels).float().mean()
        return {"loss": loss, "acc_i2t": acc_i2t, "acc_t2i": acc_t2i, "hard_acc": hard_acc}
