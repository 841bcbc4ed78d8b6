"""MLM: masked-token prediction on the text tower (BERT's masked language modelling, as DeCLIP adds it to CLIP).

Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding";
Li et al. 2022, "Supervision Exists Everywhere: A Data Efficient Contrastive Language-Image Pre-training
Paradigm" (DeCLIP). With M the masked positions of the batch's captions (`mmcl.data.masking`: 15% of each
caption's tokens, BERT's 80/10/10 mask/random/keep rule, drawn in the loader per sample key):

    h      = text_tower.token_states(masked ids)                      (B, n, W)
    logits = s * E @ LN(GELU(W_d h_m)) + b  for m in M                 (|M|, V), E the token embedding (tied)
    L      = -1/|M| sum_{m in M} log softmax(logits_m)[x_m]            x_m the original id

The head is BERT's (dense, GELU, LayerNorm, a decoder tied to the tower's token embedding plus a bias)
with a learned logit scale s: the decoder adds no (V, W) matrix, 3.2M parameters at CLIP's 49408 x 64.
CLIP's tower is causal, so the state at a masked position sees only the tokens before it (and the mask
itself): the term predicts a masked word from its left context; a bidirectional HF encoder (`kind: hf`)
sees both sides, as BERT does. A tower without per-token states (`hf_clip`, PrefixLM) is refused.

A per-sample term: a micro-batch weighs by its number of masked tokens (`count`), so accumulated
micro-batches give exactly the full batch's token mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.data.batch import Batch
from mmcl.data.masking import MaskedTokensView, mask_token_id
from mmcl.data.views import IGNORE_INDEX
from mmcl.losses.base import LossTerm
from mmcl.registry import LOSSES
from mmcl.utils import UserError


@dataclass
class MLMOptions:
    mask_prob: float = 0.15  # share of each caption's tokens to predict (BERT: 0.15), at least one
    tie: bool = True  # decoder = the tower's token embedding (False: a head-owned (V, D) decoder)
    seed: int = 0  # varies the masks (the loader draws them per sample key)


class MLMHead(nn.Module):
    """BERT's prediction head: (N, W) token states -> (N, V) logits.

    Args:
        width: the states' width.
        embedding: the tower's token embedding (V, D): sizes the head (and its scale when tied).
        tie: use the embedding weight passed to `forward` as the decoder; else own a (V, D) one.
    """

    def __init__(self, width: int, embedding: nn.Embedding, tie: bool = True) -> None:
        super().__init__()
        vocab_size, embed_dim = embedding.weight.shape
        self.dense = nn.Linear(width, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder = None if tie else nn.Parameter(torch.randn(vocab_size, embed_dim) * embed_dim**-0.5)
        # A tied decoder's logits are scaled so they start at unit spread whatever the embedding's init
        # (as T5 rescales its tied output by d^-1/2 for N(0, 1) embeddings): CLIP's N(0, 0.02^2) rows give
        # logits of spread 0.16 at width 64, and the term learned no more than the unigram counts in 60 steps.
        scale = 1.0 if not tie else 1.0 / (float(embedding.weight.detach().std()) * embed_dim**0.5)
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, states: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        weight = embedding if self.decoder is None else self.decoder  # (V, D)
        return F.linear(self.norm(F.gelu(self.dense(states))) * self.log_scale.exp(), weight, self.bias)


@LOSSES.register("mlm")
class MLMTerm(LossTerm):
    """Cross-entropy of the original ids at masked caption positions. Returns {'loss', 'acc'} (acc: share of
    masked tokens predicted exactly)."""

    Options = MLMOptions
    test_setup = {"with": ["clip"]}

    def __init__(self, model: nn.Module, options: MLMOptions | None = None) -> None:
        super().__init__(model, options)
        tower = getattr(model, "text", None)
        if tower is None:
            raise UserError(f"the mlm loss term needs a dual encoder's text tower; {type(model).__name__} has none")
        if not hasattr(tower, "token_states"):
            raise UserError(
                f"the mlm loss term needs per-token states of the text tower (kind clip or hf), not {type(tower).__name__}"
            )
        if not 0 < self.options.mask_prob <= 1:
            raise UserError(f"loss.terms mlm: mask_prob must be in (0, 1], got {self.options.mask_prob}")
        self.mask_id = mask_token_id(model.tokenizer)
        self.head = MLMHead(tower.width, tower.get_input_embeddings(), self.options.tie)

    def views(self, model: nn.Module) -> dict[str, Any]:
        o = self.options
        return {"tokens": MaskedTokensView(model.tokenizer, self.mask_id, o.mask_prob, o.seed)}

    def features(self, model: nn.Module, batch: Batch, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        states = model.text.token_states(batch.views["ids"], batch.views["mask"])  # (B, n, W)
        labels = batch.views["labels"][:, : states.shape[1]]  # positions past the longest row are never masked
        chosen = labels != IGNORE_INDEX
        logits = self.head(states[chosen], model.text.get_input_embeddings().weight)  # (|M|, V)
        return {"logits": logits, "targets": labels[chosen]}

    def count(self, batch: Batch) -> float:
        return float((batch.views["labels"] != IGNORE_INDEX).sum())  # a token mean: weigh by masked tokens

    def forward(self, feats: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        logits = feats["logits"]
        logits, targets = logits.to(torch.promote_types(logits.dtype, torch.float32)), feats["targets"]
        if targets.numel() == 0:  # no masked token (empty captions): a zero that still reaches the head
            zero = logits.sum() * 0.0
            return {"loss": zero, "acc": zero.detach()}
        loss = F.cross_entropy(logits, targets)
        with torch.no_grad():
            acc = (logits.argmax(-1) == targets).float().mean()
        return {"loss": loss, "acc": acc}
