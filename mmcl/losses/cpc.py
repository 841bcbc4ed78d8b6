"""CPC: contrastive predictive coding on caption tokens, predicting the token k steps ahead from its left context.

van den Oord, Li & Vinyals 2018, "Representation Learning with Contrastive Predictive Coding". CLIP's text
tower is causal, so its state at position t is an autoregressive context c_t of tokens 0..t; the local
code of a token is its input embedding e_u, projected. For each step k in 1..K, a linear map W_k predicts
the code k tokens ahead, scored against every other position u of the same caption (the negatives):

    c = token_states(text)         (B, n, W)      causal: c_t sees tokens <= t
    z = P e                        (B, n, D)      e the token embedding (B, n, W)
    s_k(t, u) = <W_k c_t, z_u>     (B, n, n)      u over the caption's real tokens
    L = 1/|T| sum_{(b, k, t) in T} -log softmax_u s_k(t, u)[t + k],   T = positions with t + k a real token

(InfoNCE over the caption's positions; the paper also draws negatives from other sequences.) A per-sample
loss (each caption's positives and negatives are its own): accumulation weighs micro-batches by their
number of predictions (`count`). The image side (Hénaff et al. 2019: rows of image patches predicting the rows
below) is the `cpc_image` term; a bidirectional text tower (`kind: hf`) would see the future it predicts
and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.data.batch import Batch
from mmcl.losses.base import LossTerm
from mmcl.registry import LOSSES
from mmcl.utils import UserError


@dataclass
class CPCOptions:
    steps: int = 3  # K: predict 1..K tokens ahead
    dim: int = 64  # D, the codes' width


@LOSSES.register("cpc")
class CPCTerm(LossTerm):
    """InfoNCE of the k-ahead token code among the caption's positions. Returns {'loss', 'acc'}."""

    Options = CPCOptions
    test_setup = {"with": ["clip"], "options": {"steps": 2, "dim": 16}}

    def __init__(self, model: nn.Module, options: CPCOptions | None = None) -> None:
        super().__init__(model, options)
        tower = getattr(model, "text", None)
        if tower is None or not hasattr(tower, "token_states") or getattr(model.cfg.text, "kind", "") != "clip":
            raise UserError("the cpc loss term needs a causal text tower with per-token states (model.text.kind: clip)")
        o = self.options
        if o.steps < 1:
            raise UserError(f"loss.terms cpc: steps must be >= 1, got {o.steps}")
        self.code = nn.Linear(tower.width, o.dim)
        self.predict = nn.Linear(tower.width, o.dim * o.steps)  # W_1..W_K side by side

    def features(self, model: nn.Module, batch: Batch, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        context = model.text.token_states(batch.text, batch.text_mask)  # (B, n, W)
        n = context.shape[1]
        z = self.code(model.text.get_input_embeddings()(batch.text[:, :n]))  # (B, n, D)
        pred = self.predict(context).unflatten(-1, (self.options.steps, self.options.dim))  # (B, n, K, D)
        scores = torch.einsum("btkd,bud->bktu", pred, z)  # (B, K, n, n)
        mask = self._mask(batch)[:, :n]
        return {"scores": scores, "mask": mask}

    def _mask(self, batch: Batch) -> torch.Tensor:
        return (batch.text_mask if batch.text_mask is not None else torch.ones_like(batch.text)).bool()

    def count(self, batch: Batch) -> float:
        lengths = self._mask(batch).sum(1)
        return float(sum(torch.clamp(lengths - k, min=0).sum() for k in range(1, self.options.steps + 1)))

    def forward(self, feats: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        scores, mask = feats["scores"], feats["mask"]  # (B, K, n, n), (B, n)
        b, steps, n, _ = scores.shape
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))  # negatives: real tokens only
        t = torch.arange(n, device=scores.device)
        losses, hits = [], []
        for k in range(1, min(steps, n - 1) + 1):
            valid = mask[:, k:]  # (B, n - k): t + k is a real token
            logits = scores[:, k - 1, : n - k][valid]  # (m, n)
            target = (t[: n - k] + k).expand(b, -1)[valid]  # (m,)
            losses.append(F.cross_entropy(logits, target, reduction="sum"))
            hits.append((logits.argmax(-1) == target).sum())
        total = sum(int(mask[:, k:].sum()) for k in range(1, min(steps, n - 1) + 1))
        if total == 0:  # captions of one token: nothing to predict, a zero that still reaches the heads
            zero = scores.nan_to_num(0.0, neginf=0.0).sum() * 0.0
            return {"loss": zero, "acc": zero.detach()}
        return {"loss": sum(losses) / total, "acc": (sum(hits) / total).float().detach()}
