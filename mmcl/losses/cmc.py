"""CMC: contrastive multiview coding, InfoNCE between every pair of three or more views of a sample.

Tian, Krishnan & Isola 2019, "Contrastive Multiview Coding". Here the views of a sample are its image
(the model's image embedding), its caption (the text embedding) and more strong augmentations of its
image through the image tower, all L2-normalised in the shared embedding space (n, D). With V views:

    full graph:  L = 1/|E| sum_{(a, b) in E} InfoNCE_sym(v_a, v_b; t),   E = every pair a < b
    core view:   L = 1/(V - 1) sum_{b != c} InfoNCE_sym(v_c, v_b; t),     c = the core view (the paper's
                 "core view" graph; with c = text every image view is tied to the caption)

InfoNCE_sym(a, b) = 1/2 [ -1/n sum_i log softmax_j(<a_i, b_j> / t)[i] + (a <-> b) ], the negatives every
other sample of the global batch (`nt_xent.info_nce`, gathered across processes). t is the term's own
temperature (`temperature`, the paper: 0.07) or, with `temperature: 0`, the model's learned logit scale.
With two views (image, text) and the model's scale this is CLIP's loss.

A batch term (in-batch negatives): gradient accumulation caches every view's rows.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.data.augment import AugmentConfig, StrongAugment
from mmcl.data.batch import Batch
from mmcl.data.views import ImageView
from mmcl.losses.base import LossTerm
from mmcl.losses.nt_xent import info_nce
from mmcl.registry import LOSSES
from mmcl.utils import UserError


@dataclass
class CMCOptions:
    image_views: int = 1  # strong augmentations of the image besides the model's own view (V = 2 + this)
    graph: str = "full"  # full | core
    core: str = "text"  # the core view: image | text | view1, view2, ...
    temperature: float = 0.07  # 0 = the model's logit scale
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@LOSSES.register("cmc")
class CMCTerm(LossTerm):
    """InfoNCE over the pairs of views of the view graph. Returns {'loss', 'acc' (mean over pairs)}."""

    Options = CMCOptions
    inputs = ("images", "text", "text_mask")
    test_setup = {"options": {"image_views": 1}}

    def __init__(self, model: nn.Module, options: CMCOptions | None = None) -> None:
        super().__init__(model, options)
        o = self.options
        names = self.view_names()
        if o.graph not in ("full", "core"):
            raise UserError(f"loss.terms cmc: graph must be 'full' or 'core', got {o.graph!r}")
        if o.graph == "core" and o.core not in names:
            raise UserError(f"loss.terms cmc: core must be one of {names}, got {o.core!r}")
        self.pairs = (
            list(itertools.combinations(names, 2)) if o.graph == "full" else [(o.core, b) for b in names if b != o.core]
        )
        self.batch_features = ("image_features", "text_features", *names[2:])  # type: ignore[misc]

    def view_names(self) -> list[str]:
        return ["image", "text", *(f"view{i + 1}" for i in range(self.options.image_views))]

    def views(self, model: nn.Module) -> dict[str, Any]:
        pre = model.preprocess_cfg()
        augment = StrongAugment(pre["image_size"], self.options.augment, pre["mean"], pre["std"])
        return {name: ImageView(augment) for name in self.view_names()[2:]}

    def features(self, model: nn.Module, batch: Batch, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = self.view_names()[2:]
        if not names:
            return {}
        images = torch.cat([batch.views[n] for n in names])  # one tower pass for every extra view
        return dict(zip(names, F.normalize(model.encode_image(images, normalize=False), dim=-1).chunk(len(names))))

    def forward(self, feats: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        rows = {"image": feats["image_features"], "text": feats["text_features"]}
        rows.update({n: feats[n] for n in self.view_names()[2:]})
        if self.options.temperature > 0:
            t: Any = self.options.temperature
        else:
            t = 1.0 / feats["logit_scale"]
        outs = [info_nce(rows[a], rows[b], t) for a, b in self.pairs]
        return {
            "loss": sum(o["loss"] for o in outs) / len(outs),
            "acc": sum(o["acc"] for o in outs) / len(outs),
        }
