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
shuffling (`shuffle`), applied to the caption's words in the loader; its dropout view is SimCSE's. Its two
embedding-level views act on the second view's token embeddings e (B, n, W), the output of the text tower's
`get_input_embeddings()` (a forward hook for the one pass, `embedding_edit`: the tower is not changed):

    feature cutoff (`feature_cutoff`, a share r):  e' = e * m,  m (B, 1, W) zero on round(r W) dimensions
        per caption, the same for each of its tokens (a column of the embedding matrix), drawn from
        (seed, step, key) so accumulation, resume and every process draw the same
    adversarial (`adversarial`, epsilon; FGM, Miyato et al. 2017):  e' = e + eps g_i / ||g_i||,
        g = d L_SimCSE(y1, g(e)) / d e  from a first pass, per caption normalised over its (n, W) block,
        held constant in the second pass (a view, not a min-max game)

The adversarial direction comes from the in-batch loss of the pass that computes the features: with
gradient accumulation (or several processes) the micro-batch's (process's) own negatives. It costs one more
forward and backward pass through the text tower.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    feature_cutoff: float = 0.0  # ConSERT's feature cutoff: share of the embedding dimensions zeroed (0 = off)
    adversarial: float = 0.0  # ConSERT's adversarial view: epsilon of the embedding perturbation (0 = off)
    queue_size: int = 0  # ESimCSE's momentum queue of past second-view embeddings (0 = none)
    momentum: float = 0.995  # of the queue's encoder
    seed: int = 0  # varies the repetitions


@LOSSES.register("simcse")
class SimCSETerm(LossTerm):
    """Text-text InfoNCE between two dropout views of each caption. Returns {'loss', 'acc'}."""

    Options = SimCSEOptions
    inputs = ("text", "text_mask")
    batch_features = ("text_features", "text2")
    test_setup = {"with": ["clip"], "options": {"feature_cutoff": 0.1}, "overrides": ["model.text.dropout=0.1"]}

    def __init__(self, model: nn.Module, options: SimCSEOptions | None = None) -> None:
        super().__init__(model, options)
        text_cfg, o = model.cfg.text, self.options
        if not (0 <= o.feature_cutoff < 1 and o.adversarial >= 0):
            raise UserError(f"loss.terms simcse: needs 0 <= feature_cutoff < 1 and adversarial >= 0, got {o}")
        if text_cfg.kind == "clip" and text_cfg.dropout == 0 and not (self.edits or self.embedding_noise):
            raise UserError("the simcse loss term needs text dropout: set model.text.dropout (SimCSE uses 0.1)")
        if o.queue_size > 0:
            self.batch_features = ("text_features", "text2", "keys")  # type: ignore[misc]
            self.text_m = copy.deepcopy(model.text)
            for p in self.text_m.parameters():
                p.requires_grad_(False)
            self.queue = FeatureQueue(o.queue_size, model.cfg.embed_dim)
            object.__setattr__(self, "_online", model.text)  # not a submodule: the model owns and saves it
        if o.feature_cutoff > 0:  # the cutoff draws vary by step: the step count is state (exact resume)
            self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @property
    def embedding_noise(self) -> bool:
        """Whether the second view is changed at the embedding layer (feature cutoff, adversarial)."""
        return self.options.feature_cutoff > 0 or self.options.adversarial > 0

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
        edit = self.embedding_view(model, batch, ids, mask, feats) if self.embedding_noise else None
        with embedding_edit(model.text, edit):
            out = {"text2": F.normalize(model.encode_text(ids, mask), dim=-1)}
        if self.options.queue_size > 0:
            with torch.no_grad():
                out["keys"] = F.normalize(self.text_m(ids, mask), dim=-1)
        return out

    def cutoff_mask(self, keys: list[str], width: int) -> torch.Tensor:
        """(B, W) feature-cutoff mask: round(r W) zeros per caption, a pure function of (seed, step, key)."""
        o, step = self.options, int(self.steps)
        rows = torch.ones(len(keys), width)
        for i, key in enumerate(keys):
            seed = int.from_bytes(hashlib.blake2b(f"{o.seed}/{step}/{key}".encode(), digest_size=8).digest(), "little")
            dims = torch.randperm(width, generator=torch.Generator().manual_seed(seed))[
                : round(o.feature_cutoff * width)
            ]
            rows[i, dims] = 0.0
        return rows

    def embedding_view(
        self, model: nn.Module, batch: Batch, ids: torch.Tensor, mask: torch.Tensor | None, feats: Any
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The edit of the second view's token embeddings (B, n, W): feature cutoff, then the adversarial step."""
        o, edits = self.options, []
        if o.feature_cutoff > 0:
            width = model.text.get_input_embeddings().embedding_dim
            keep = self.cutoff_mask(batch.keys or list(batch.captions or []), width).to(ids.device)[:, None]
            if keep.shape[0] != ids.shape[0]:
                raise UserError("the simcse feature cutoff needs a key (or caption) per sample of the batch")
            edits.append(lambda e: e * keep.to(e.dtype))

        def edit(e: torch.Tensor) -> torch.Tensor:
            for f in edits:
                e = f(e)
            return e

        if o.adversarial <= 0:
            return edit
        leaf: dict[str, torch.Tensor] = {}

        def clean(e: torch.Tensor) -> torch.Tensor:
            leaf["e"] = edit(e).detach().requires_grad_(True)
            return leaf["e"]

        with torch.enable_grad(), embedding_edit(model.text, clean):  # the cache pass of accumulation runs no_grad
            y2 = F.normalize(model.encode_text(ids, mask, normalize=False), dim=-1)
            loss = info_nce(feats["text_features"].detach(), y2, o.temperature, symmetric=False)["loss"]
            (g,) = torch.autograd.grad(loss, leaf["e"])  # the parameters' .grad untouched
        r = o.adversarial * g / g.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]  # ||r_i|| = eps
        return lambda e: edit(e) + r.to(e.dtype)

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
        if self.options.feature_cutoff > 0:
            self.steps += 1
        if self.options.queue_size <= 0:
            return
        self.queue.push(ctx.gather(ctx.features["keys"]))
        m = self.options.momentum
        for k, p in zip(self.text_m.parameters(), self._online.parameters()):
            k.mul_(m).add_(p.detach(), alpha=1 - m)


@contextmanager
def embedding_edit(tower: nn.Module, edit: Callable[[torch.Tensor], torch.Tensor] | None) -> Iterator[None]:
    """Within the block, `tower`'s token embeddings (`get_input_embeddings()`'s output, (B, n, W)) pass through
    `edit` (a forward hook, removed on exit); None: unchanged."""
    if edit is None:
        yield
        return
    handle = tower.get_input_embeddings().register_forward_hook(lambda module, args, out: edit(out))
    try:
        yield
    finally:
        handle.remove()
