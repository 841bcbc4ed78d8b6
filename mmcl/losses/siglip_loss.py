"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training")."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.data.batch import Batch
from mmcl.losses.base import LossTerm
from mmcl.losses.clip_loss import contrastive_outputs
from mmcl.losses.distributed import all_gather_cat, ring_pass, world_info
from mmcl.registry import LOSSES
from mmcl.utils import UserError

Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # loss, acc_i2t, acc_t2i


def _gather_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
    gather_with_grad: bool,
) -> Outputs:
    """All-gather the texts: logits (n, P*n) at once. Memory per process grows with the global batch."""
    rank, world = world_info()
    n = image_features.shape[0]
    all_texts = all_gather_cat(text_features, gather_with_grad)  # (P*n, D)
    logits = logit_scale * image_features @ all_texts.T  # (n, P*n)
    if logit_bias is not None:
        logits = logits + logit_bias
    labels = torch.arange(n, device=logits.device) + rank * n
    signs = torch.full_like(logits, -1.0)
    signs[torch.arange(n, device=logits.device), labels] = 1.0
    loss = -F.logsigmoid(signs * logits).sum() / n
    with torch.no_grad():
        acc_i2t = (logits.argmax(dim=1) == labels).float().mean()
        all_images = all_gather_cat(image_features.detach(), with_grad=False) if world > 1 else image_features
        acc_t2i = ((text_features @ all_images.T).argmax(dim=1) == labels).float().mean()
    return loss, acc_i2t, acc_t2i


def _signed_logits(sims: torch.Tensor, logit_scale: torch.Tensor, bias: torch.Tensor, positives: bool) -> torch.Tensor:
    """z * (t * sims + b) of one (n, n) block, z = +1 on the diagonal of the block of matching pairs and -1
    elsewhere; in place on one new block (no (n, n) sign matrix: the ring keeps at most two blocks alive)."""
    signed = torch.mul(sims, -logit_scale).sub_(bias)
    if positives:
        signed.diagonal().neg_()
    return signed


def _keep_best(
    best: torch.Tensor, best_idx: torch.Tensor, scores: torch.Tensor, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running argmax over blocks visited out of index order; ties go to the lower index, as argmax."""
    take = (scores > best) | ((scores == best) & (idx < best_idx))
    return torch.where(take, scores, best), torch.where(take, idx, best_idx)


def _accumulator_dtype(features: torch.Tensor, logit_scale: torch.Tensor) -> torch.dtype:
    """Sums over blocks in at least float32 (bf16 features under autocast), float64 stays float64."""
    return torch.promote_types(torch.promote_types(features.dtype, logit_scale.dtype), torch.float32)


class _RingSigLip(torch.autograd.Function):
    """The sigmoid loss block by block round the ring, recomputing each block in backward.

    Forward keeps no (n, P*n) logits: only this rank's features are saved. Backward passes each text
    block round the ring again together with its gradient accumulator, so that after P hops the
    accumulator (every rank's contribution, summed as the all-gather's backward would) is back home.
    """

    @staticmethod
    def forward(
        ctx: Any,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None,
        with_grad: bool,
    ) -> Outputs:
        rank, world = world_info()
        n = image_features.shape[0]
        bias = logit_bias if logit_bias is not None else torch.zeros((), device=logit_scale.device)
        img, block = image_features.detach(), text_features.detach()
        own = torch.arange(n, device=img.device) + rank * n  # global indices of this rank's pairs
        acc = _accumulator_dtype(img, logit_scale)
        loss = torch.zeros((), dtype=acc, device=img.device)
        i2t = (torch.full((n,), -torch.inf, dtype=acc, device=img.device), own.clone())
        t2i = (torch.full((n,), -torch.inf, dtype=acc, device=img.device), own.clone())
        for step in range(world):
            owner = (rank - step) % world  # whose texts `block` holds
            sims = img @ block.T  # (n images, n texts of `owner`)
            signed = _signed_logits(sims, logit_scale, bias, positives=step == 0)
            loss = loss - F.logsigmoid(signed).sum().to(acc)
            out_dtype = signed.dtype
            del signed
            sims = sims.to(acc)
            best, idx = sims.max(dim=1)
            i2t = _keep_best(*i2t, best, idx + owner * n)
            best, idx = sims.max(dim=0)
            t2i = _keep_best(*t2i, best, idx + rank * n)
            if step < world - 1:
                block, *t2i = ring_pass([block, *t2i])
        if world > 1:  # the texts' running best image goes its last hop home
            t2i = ring_pass(list(t2i))
        ctx.save_for_backward(image_features, text_features, logit_scale, logit_bias)
        # backward recomputes the blocks: under the same autocast as here (mixed-dtype features, bf16 matmuls)
        ctx.device_type = img.device.type
        ctx.autocast = (torch.is_autocast_enabled(ctx.device_type), torch.get_autocast_dtype(ctx.device_type))
        ctx.with_grad = with_grad
        acc_i2t = (i2t[1] == own).float().mean()
        acc_t2i = (t2i[1] == own).float().mean()
        ctx.mark_non_differentiable(acc_i2t, acc_t2i)
        return (loss / n).to(out_dtype), acc_i2t, acc_t2i

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        enabled, dtype = ctx.autocast
        with torch.autocast(ctx.device_type, dtype=dtype, enabled=enabled):
            return _RingSigLip._backward(ctx, grad)

    @staticmethod
    def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        img, txt, logit_scale, logit_bias = ctx.saved_tensors
        rank, world = world_info()
        n = img.shape[0]
        bias = logit_bias if logit_bias is not None else torch.zeros((), device=logit_scale.device)
        grad_img = torch.zeros_like(img)
        acc = _accumulator_dtype(img, logit_scale)
        grad_scale = torch.zeros((), dtype=acc, device=img.device)
        grad_bias = torch.zeros((), dtype=acc, device=img.device)
        block, grad_block = txt, torch.zeros_like(txt)
        for step in range(world):
            sims = img @ block.T
            # d/dx -log sigmoid(z x) = -z sigmoid(-z x), x = t * sims + b; the loss is divided by n
            d_logits = _signed_logits(sims, logit_scale, bias, positives=step == 0).neg_().sigmoid_()
            if step == 0:
                d_logits.diagonal().neg_()
            d_logits.mul_(grad / n)
            grad_img += torch.mm(d_logits, block).mul_(logit_scale)
            if step == 0 or ctx.with_grad:  # without it the other ranks' texts are constants
                grad_block += torch.mm(d_logits.T, img).mul_(logit_scale)
            grad_scale += torch.dot(d_logits.flatten(), sims.flatten()).to(acc)
            grad_bias += d_logits.sum().to(acc)
            if step < world - 1:
                block, grad_block = ring_pass([block, grad_block])
        if world > 1:
            (grad_block,) = ring_pass([grad_block])  # every rank's share of this rank's text gradient, home
        return (
            grad_img if ctx.needs_input_grad[0] else None,
            grad_block if ctx.needs_input_grad[1] else None,
            grad_scale.to(logit_scale.dtype) if ctx.needs_input_grad[2] else None,
            grad_bias.to(logit_bias.dtype) if logit_bias is not None and ctx.needs_input_grad[3] else None,
            None,
        )


def _ring_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
    gather_with_grad: bool,
) -> Outputs:
    """The paper's chunked implementation: texts passed round the ring, (n, n) blocks, recomputed in backward."""
    return _RingSigLip.apply(image_features, text_features, logit_scale, logit_bias, gather_with_grad)


# how the other processes' texts reach this process's images (registry: one function per strategy)
DIST_IMPLS: dict[str, Callable[..., Outputs]] = {"gather": _gather_loss, "ring": _ring_loss}


class SigLipLoss(nn.Module):
    """Binary classification of every image-text pair as matching or not.

    With L2-normalised features x_i (image), y_j (text) of a batch of N pairs, temperature
    t = exp(logit_scale), bias b and z_ij = 1 if i == j else -1:

        L = -1/N * sum_i sum_j log sigmoid(z_ij * (t * <x_i, y_j> + b))

    (sum over all N^2 pairs, divided by the batch size, as in the paper). Across P processes each
    process computes the rows of its own n images against the P * n texts, normalised by n; the mean
    over processes is the full-batch loss and, with `gather_with_grad`, the DDP-averaged gradient is the
    full-batch gradient. How the texts arrive is `dist_impl`:

    - 'gather': one all-gather, logits (n, P*n) kept for backward: memory grows with the global batch.
    - 'ring': the paper's chunked implementation (Sec. 3.3): each process's texts travel round the
      ring of processes in P - 1 hops, one (n, n) block of logits at a time; backward recomputes the
      blocks and sends each text block's gradient round with it. Memory grows with the local batch only,
      at the cost of a second round of P - 1 hops (and the blocks' matmuls) in backward.

    Both give the same loss, gradients and accuracies.

    Args:
        gather_with_grad: gradients of this process's loss reach the other processes' text features.
        dist_impl: 'gather' or 'ring' (see above).

    Shapes: image_features, text_features (n, D) normalised; logit_scale () exponentiated; logit_bias ()
    (None = 0). Returns {'loss', 'acc_i2t', 'acc_t2i'} scalars (top-1 retrieval in the global batch).
    """

    def __init__(self, gather_with_grad: bool = True, dist_impl: str = "gather") -> None:
        super().__init__()
        if dist_impl not in DIST_IMPLS:
            raise UserError(f"siglip: dist_impl must be one of {sorted(DIST_IMPLS)}, not {dist_impl!r}")
        self.gather_with_grad = gather_with_grad
        self.dist_impl = dist_impl

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        impl = DIST_IMPLS[self.dist_impl]
        loss, acc_i2t, acc_t2i = impl(image_features, text_features, logit_scale, logit_bias, self.gather_with_grad)
        return {"loss": loss, "acc_i2t": acc_i2t, "acc_t2i": acc_t2i}


@dataclass
class SigLipOptions:
    gather_with_grad: bool = True  # gradients of this process's loss reach the other processes' texts
    # 'ring': the paper's chunked loss, memory per process grows with the local batch, not the global one
    dist_impl: Literal["gather", "ring"] = "gather"


@LOSSES.register("siglip")
class SigLipTerm(LossTerm):
    """`SigLipLoss` on the model's image and text features; the model needs a logit bias
    (`model.init_logit_bias`, e.g. -10). Returns {'loss', 'acc_i2t', 'acc_t2i', 'logit_scale', 'logit_bias'}.
    `{name: siglip, dist_impl: ring}` selects the chunked loss for large global batches."""

    Options = SigLipOptions
    test_setup = {"preset": "siglip-tiny"}  # the registry-driven tests' toy model (it has a logit bias)
    inputs = ("images", "text", "text_mask")
    batch_features = ("image_features", "text_features")

    def __init__(self, model: nn.Module, options: SigLipOptions | None = None) -> None:
        super().__init__(model, options)
        if getattr(model, "logit_bias", None) is None:
            raise UserError("the siglip loss term needs a logit bias: set model.init_logit_bias (e.g. -10)")
        self.loss = SigLipLoss(gather_with_grad=self.options.gather_with_grad, dist_impl=self.options.dist_impl)

    def forward(self, feats: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        return contrastive_outputs(self.loss, feats)
