"""SimCSE: the same caption through the text tower twice, dropout the only noise (unsupervised SimCSE).

Gao et al. 2021, "SimCSE: Simple Contrastive Learning of Sentence Embeddings":

    y1 = g(text), y2 = g(text)       two forward passes, different dropout masks, (n, D) normalised
    L  = -1/n sum_i log softmax_j(<y1_i, y2_j> / t)[i]      t = 0.05, in-batch negatives

The text tower needs dropout (`model.text.dropout`, SimCSE: 0.1); without it both views are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.data.batch import Batch
from mmcl.losses.base import LossTerm
from mmcl.losses.nt_xent import info_nce
from mmcl.registry import LOSSES
from mmcl.utils import UserError


@dataclass
class SimCSEOptions:
    temperature: float = 0.05


@LOSSES.register("simcse")
class SimCSETerm(LossTerm):
    """Text-text InfoNCE between two dropout views of each caption. Returns {'loss', 'acc'}."""

    Options = SimCSEOptions
    inputs = ("text", "text_mask")
    batch_features = ("text_features", "text2")
    test_setup = {"with": ["clip"], "overrides": ["model.text.dropout=0.1"]}

    def __init__(self, model: nn.Module, options: SimCSEOptions | None = None) -> None:
        super().__init__(model, options)
        text_cfg = model.cfg.text
        if text_cfg.kind == "clip" and text_cfg.dropout == 0:
            raise UserError("the simcse loss term needs text dropout: set model.text.dropout (SimCSE uses 0.1)")

    def features(self, model: nn.Module, batch: Batch, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"text2": F.normalize(model.encode_text(batch.text, batch.text_mask), dim=-1)}

    def forward(self, feats: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        return info_nce(feats["text_features"], feats["text2"], self.options.temperature, symmetric=False)
