"""Counterfactual CLIP: CLIP's symmetric InfoNCE over the batch's pairs AND their counterfactual pairs.

TripletCLIP (Patel et al. 2024, "TripletCLIP: Improving Compositional Reasoning of CLIP via Synthetic
Vision-Language Negatives") and CounterCurate (Zhang et al. 2024, "CounterCurate: Enhancing Physical and
Semantic Visio-Linguistic Compositional Reasoning via Counterfactual Examples") train on each pair together
with a counterfactual pair: the same scene with one thing changed (`KEY.cf.<ext>` + `KEY.cf.txt` in the
shards, README "Counterfactual images"; `mmcl shards synthetic --counterfactuals` writes them). Text-only hard
negatives (NegCLIP) teach the image side only; here an image must reject its counterfactual's caption AND a
caption its counterfactual image, and the counterfactual pair is itself a positive.

With x, y (N, D) the batch's image/text features, x', y' (N, D) the counterfactuals', v (N,) their valid flags,
X = [x; x'], Y = [y; y'] (2N, D), rows and columns of invalid counterfactuals masked, row weights
w = [1 (N); lambda * v (N)] (lambda = `cf_weight`) and target(k) = k (each row's own pair):

    S = t * X @ Y.T                                     (2N, 2N), columns with w = 0 set to -inf
    L = 1/2 * [ sum_k w_k CE(S[k], k) + sum_k w_k CE(S.T[k], k) ] / sum_k w_k

Without counterfactuals (all v = 0) L is CLIP's loss. Use it instead of `clip` (it is CLIP's loss plus the
counterfactual rows and columns). Under P processes each rank scores its own rows against every rank's columns
(gathered with gradient) and the sum is normalised by the global weight, so DDP's average is the full-batch L.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.data.batch import Batch
from mmcl.data.views import CounterfactualView
from mmcl.losses.base import LossTerm
from mmcl.losses.distributed import all_gather_cat, world_info
from mmcl.registry import LOSSES


@dataclass
class CounterfactualOptions:
    cf_weight: float = 1.0  # lambda: weight of each counterfactual row (image and caption anchors) vs a batch row


@LOSSES.register("counterfactual")
class CounterfactualTerm(LossTerm):
    """CLIP's InfoNCE over [pairs; counterfactual pairs]. Returns {'loss', 'acc_i2t', 'acc_t2i', 'cf_acc_i2t',
    'cf_acc_t2i', 'cf_rate'}: cf_acc_i2t is the share of images scoring their caption above their counterfactual's
    caption, cf_acc_t2i of captions scoring their image above the counterfactual image (over valid pairs);
    cf_rate the share of samples with a counterfactual."""

    Options = CounterfactualOptions
    inputs = ("images", "text", "text_mask")
    batch_features = ("image_features", "text_features", "cf_image_features", "cf_text_features", "cf_valid")

    def views(self, model: nn.Module) -> dict[str, Any]:
        return {"cf": CounterfactualView(model.tokenizer)}

    def features(self, model: nn.Module, batch: Batch, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, ids, mask = batch.views["cf/image"], batch.views["cf/text"], batch.views["cf/mask"]
        valid = batch.views["cf/valid"].bool()
        return {
            "cf_image_features": _encode_valid(model, images, valid, feats["image_features"]),  # (n, D)
            "cf_text_features": model.encode_text(ids, mask),  # (n, D); invalid rows are masked in `forward`
            "cf_valid": valid,  # (n,)
        }

    def forward(self, feats: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        rank, world = world_info()
        x, y, t = feats["image_features"], feats["text_features"], feats["logit_scale"]
        xc, yc, valid = feats["cf_image_features"], feats["cf_text_features"], feats["cf_valid"]
        n = x.shape[0]
        ones = torch.ones(n, dtype=x.dtype, device=x.device)
        w = torch.cat([ones, self.options.cf_weight * valid.to(x.dtype)])  # (2n,) this rank's row weights
        all_w = torch.cat([ones.repeat(world), self.options.cf_weight * all_gather_cat(valid.to(x.dtype), False)])
        col_ok = all_w > 0  # (2Pn,) columns: [every rank's pairs; every rank's counterfactuals]
        cols_y = torch.cat([all_gather_cat(y), all_gather_cat(yc)])  # (2Pn, D)
        cols_x = torch.cat([all_gather_cat(x), all_gather_cat(xc)])
        own = torch.arange(n, device=x.device) + rank * n
        labels = torch.cat([own, own + world * n])  # (2n,) each local row's own pair among the columns
        s_i2t = (t * torch.cat([x, xc]) @ cols_y.T).masked_fill(~col_ok[None, :], float("-inf"))  # (2n, 2Pn)
        s_t2i = (t * torch.cat([y, yc]) @ cols_x.T).masked_fill(~col_ok[None, :], float("-inf"))
        keep = w > 0  # invalid rows have -inf at their own label: leave them out, not 0 * inf
        ce = F.cross_entropy(s_i2t[keep], labels[keep], reduction="none")
        ce = ce + F.cross_entropy(s_t2i[keep], labels[keep], reduction="none")
        loss = world * (w[keep] * ce).sum() / (2 * all_w.sum())  # DDP averages the P ranks: the full-batch mean
        with torch.no_grad():
            acc_i2t = (s_i2t[:n].argmax(1) == own).float().mean()
            acc_t2i = (s_t2i[:n].argmax(1) == own).float().mean()
            m = valid.float().sum().clamp(min=1)
            cf_acc_i2t = (((x * y).sum(-1) > (x * yc).sum(-1)) & valid).float().sum() / m
            cf_acc_t2i = (((y * x).sum(-1) > (y * xc).sum(-1)) & valid).float().sum() / m
        return {"loss": loss, "acc_i2t": acc_i2t, "acc_t2i": acc_t2i, "cf_acc_i2t": cf_acc_i2t,
                "cf_acc_t2i": cf_acc_t2i, "cf_rate": valid.float().mean()}  # fmt: skip


def _encode_valid(model: nn.Module, images: torch.Tensor, valid: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(n, D) features of the valid counterfactual images, zeros elsewhere (masked in `forward`). A sample without
    a counterfactual carries a stand-in image that must not reach the tower: in training mode a BatchNorm tower
    would average it into its batch and running statistics (a CNN trained on the digits, which have no
    counterfactuals, then read 8% zero-shot instead of 97%)."""
    if bool(valid.all()):
        return model.encode_image(images)
    out = like.new_zeros(len(images), like.shape[-1])
    if not bool(valid.any()):
        return out
    rows = valid.nonzero().squeeze(1)
    return out.index_copy(0, rows, model.encode_image(images[rows]).to(out.dtype))
