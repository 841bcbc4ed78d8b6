"""Contrastive image-text pretraining (CLIP / SigLIP), with gradient accumulation that keeps every negative."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mmcl.config import LossConfig
from mmcl.data.batch import Batch
from mmcl.losses import ClipLoss, SigLipLoss
from mmcl.registry import TASKS
from mmcl.tasks.base import Backward, Task
from mmcl.utils import UserError


class RngReplay:
    """Records the CPU (and current accelerator) RNG state so a forward pass can be replayed exactly
    (same dropout masks), as GradCache does (Gao et al. 2021)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if self.cuda else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu_state)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_state, self.device)


class ContrastiveTask(Task):
    """A dual encoder (`encode_image`, `encode_text`, `logit_scale`) trained with `ClipLoss` or `SigLipLoss`.

    `forward(batch)` -> {'loss', 'acc_i2t', 'acc_t2i', 'logit_scale' (+ 'logit_bias')};
    `forward(batch, features_only=True)` -> the model's features dict (used by accumulation).

    Gradient accumulation over k micro-batches (`forward_backward`) keeps the full batch as negatives
    (GradCache, Gao et al. 2021; open_clip's `accum_freq`): pass 1 embeds every micro-batch without
    gradients; pass 2 recomputes micro-batch j with gradients, puts its features into the cached set,
    computes the loss over the whole batch and back-propagates it. Summed over j this is exactly the
    full-batch gradient: each feature gets its gradient once, and the temperature / bias (shared by
    every pass) only in the last pass. Dropout is replayed with the RNG state of pass 1, so the
    recomputed features equal the cached ones. The reported loss is the full-batch loss (not divided
    by k). BatchNorm statistics are updated in both passes.
    """

    def __init__(self, model: nn.Module, loss_cfg: LossConfig) -> None:
        super().__init__()
        self.model = model
        self.weight = loss_cfg.contrastive_weight
        if loss_cfg.contrastive == "clip":
            self.loss = ClipLoss(local_loss=loss_cfg.local_loss, gather_with_grad=loss_cfg.gather_with_grad)
        elif loss_cfg.contrastive == "siglip":
            if getattr(model, "logit_bias", None) is None:
                raise UserError("loss.contrastive=siglip needs a logit bias: set model.init_logit_bias (e.g. -10)")
            self.loss = SigLipLoss(gather_with_grad=loss_cfg.gather_with_grad)
        else:
            raise UserError(
                f"a contrastive model needs loss.contrastive 'clip' or 'siglip', not '{loss_cfg.contrastive}'"
            )

    def features(self, batch: Batch) -> dict[str, torch.Tensor]:
        if batch.images is None or batch.text is None:
            raise UserError("a contrastive batch needs images and tokenized text (batch.images / batch.text are empty)")
        return self.model(batch.images, batch.text, batch.text_mask)

    def compute_loss(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weighted loss and metrics from a features dict (image/text features may span micro-batches)."""
        out = self.loss(feats["image_features"], feats["text_features"], feats["logit_scale"], feats.get("logit_bias"))
        out["loss"] = self.weight * out["loss"]
        out["logit_scale"] = feats["logit_scale"].detach()
        if feats.get("logit_bias") is not None:
            out["logit_bias"] = feats["logit_bias"].detach()
        return out

    def forward(self, batch: Batch, features_only: bool = False) -> dict[str, torch.Tensor]:
        feats = self.features(batch)
        return feats if features_only else self.compute_loss(feats)

    # keyword arguments of accumulation pass 1 (features for the cache only)
    cache_pass_kwargs: dict[str, bool] = {}

    def forward_backward(
        self, prepared: Callable[..., dict[str, torch.Tensor]], micro_batches: list[Batch], backward: Backward
    ) -> dict[str, float]:
        if len(micro_batches) == 1:
            out = prepared(micro_batches[0])
            backward(out["loss"], True)
            return {name: float(value.detach()) for name, value in out.items()}
        outs = self.grad_cache_passes(prepared, micro_batches, backward)
        return {name: float(value.detach()) for name, value in outs[-1].items()}

    def grad_cache_passes(
        self, prepared: Callable[..., dict[str, torch.Tensor]], micro_batches: list[Batch], backward: Backward
    ) -> list[dict[str, torch.Tensor]]:
        """GradCache's two passes over `micro_batches`; returns each pass-2 micro-batch's loss outputs."""
        k = len(micro_batches)
        device = next(self.model.parameters()).device
        states, cached = [], []
        with torch.no_grad():
            for mb in micro_batches:
                states.append(RngReplay(device))
                feats = prepared(mb, last=False, features_only=True, **self.cache_pass_kwargs)
                cached.append((feats["image_features"], feats["text_features"]))
        after = RngReplay(device)

        outs = []
        for j, mb in enumerate(micro_batches):
            last = j == k - 1
            states[j].restore()
            feats = prepared(mb, last=last, features_only=True)
            full = dict(feats)
            for key, col in (("image_features", 0), ("text_features", 1)):
                full[key] = torch.cat([feats[key] if i == j else c[col] for i, c in enumerate(cached)])
            for name in ("logit_scale", "logit_bias"):  # shared scalars: their gradient is counted once, not k times
                if full.get(name) is not None and not last:
                    full[name] = full[name].detach()
            out = self.micro_batch_loss(full, k)
            backward(out["loss"], last)
            outs.append(out)
        after.restore()
        return outs

    def micro_batch_loss(self, full: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
        """Pass 2's loss for one micro-batch, given features spanning the whole batch."""
        return self.compute_loss(full)


@TASKS.register("clip")
def build_contrastive_task(model: nn.Module, loss_cfg: LossConfig) -> ContrastiveTask:
    return ContrastiveTask(model, loss_cfg)
