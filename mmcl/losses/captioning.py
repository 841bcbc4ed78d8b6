"""PrefixLM captioning loss: token cross-entropy on the suffix only.

SimVLM (Wang et al. 2021, eq. 2): with the caption x cut at T_p,

    L_PrefixLM(theta) = - E_{x ~ D} [ sum_{i = T_p}^{T} log P_theta(x_i | x_[T_p, i), x_<T_p) ]

The prefix x_<T_p (and the image) is conditioning only; the model marks every
position that is not a suffix token (prefix, padding, samples without a caption)
with label -100 and the loss ignores it. The sum is normalised by the number of
target tokens in the batch (token-level mean, as in T5/HF), so long captions
weigh more than short ones, as in a language model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.data.batch import Batch
from mmcl.data.views import IGNORE_INDEX, CaptionSplitView
from mmcl.losses.base import LossTerm
from mmcl.registry import LOSSES


class PrefixLMLoss(nn.Module):
    """Mean cross-entropy over target tokens, with token accuracy and perplexity.

    Args:
        label_smoothing: as in `torch.nn.functional.cross_entropy` (0 = plain CE).
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """
        Args:
            logits: (B, T, V) next-token scores.
            labels: (B, T) target ids, IGNORE_INDEX (-100) where there is no target.

        Returns:
            {'loss': mean CE per target token, 'token_acc': share of target tokens predicted
            exactly (argmax), 'ppl': exp(unsmoothed CE), 'num_tokens': number of target tokens}.
            With no target token at all the loss is a zero that still depends on the logits (so
            backward works and gradient accumulation stays in step).
        """
        valid = labels != IGNORE_INDEX
        n = valid.sum()
        if n == 0:
            zero = logits.sum() * 0.0
            return {"loss": zero, "token_acc": zero.detach(), "ppl": torch.ones_like(zero).detach(), "num_tokens": n}
        flat_logits, flat_labels = logits[valid].float(), labels[valid]  # (N, V), (N,)
        loss = F.cross_entropy(flat_logits, flat_labels, label_smoothing=self.label_smoothing)
        with torch.no_grad():
            plain = loss if self.label_smoothing == 0 else F.cross_entropy(flat_logits, flat_labels)
            ppl = plain.exp()
            acc = (flat_logits.argmax(-1) == flat_labels).float().mean()
        return {"loss": loss, "token_acc": acc, "ppl": ppl, "num_tokens": n}


@LOSSES.register("caption")
class CaptionTerm(LossTerm):
    """PrefixLM captioning (SimVLM) on a model with a PrefixLM decoder (`prefix_lm`, `joint`).

    The loader splits and tokenizes each caption (`CaptionSplitView`, deterministic per sample key);
    the model takes the token tensors. A per-sample loss: accumulation weighs micro-batches by
    their target tokens, so k micro-batches give the full batch's token mean.
    Returns {'loss', 'token_acc', 'ppl'}.
    """

    inputs = ("images", "prefix_ids", "prefix_mask", "lm_labels", "text_only")
    test_setup = {"preset": "prefixlm-tiny"}

    def __init__(self, model: nn.Module, options: Any = None) -> None:
        super().__init__(model, options)
        self.loss = PrefixLMLoss()

    def views(self, model: nn.Module) -> dict[str, Any]:
        lm = getattr(model, "lm", model)  # a joint model's captioner, or the PrefixLM itself
        return {"caption_split": CaptionSplitView(lm.tokenizer, lm.dcfg, lm.split_seed)}

    def count(self, batch: Batch) -> float:
        return float((batch.views["lm_labels"] != IGNORE_INDEX).sum())  # a token mean: weigh by tokens

    def forward(self, feats: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        out = self.loss(feats["logits"], feats["labels"])
        out.pop("num_tokens")
        return out
