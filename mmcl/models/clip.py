"""The CLIP dual encoder (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision"), also used for SigLIP (Zhai et al. 2023) and LiT (Zhai et al. 2022)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.config import ModelConfig
from mmcl.data.text import Tokenizer, build_tokenizer
from mmcl.models.lock import set_locked_eval
from mmcl.models.towers import build_image_tower, build_text_tower
from mmcl.registry import MODELS
from mmcl.utils import UserError


class CLIP(nn.Module):
    """Image tower + text tower projected to one `embed_dim` space, and a learned temperature.

    The model returns features; the loss lives in `mmcl.losses` (the task joins them).

        x = normalize(image_tower(images))                 (B, D)
        y = normalize(text_tower(text, text_mask))         (B, D)
        logit_scale = exp(min(s, log max_logit_scale))     s initialised to log(init_logit_scale)
        logit_bias  = b (SigLIP only, when cfg.init_logit_bias is set)

    Clamping the temperature in the forward pass (CLIP caps it at 100) keeps it bounded without
    touching the parameter after each optimizer step.

    Attributes:
        image, text: the towers (`mmcl.models.towers`).
        tokenizer: the text tower's tokenizer (`mmcl.data.text.Tokenizer`).
        logit_scale: log-space temperature parameter, shape ().
        logit_bias: SigLIP bias parameter, shape (), or None.
    """

    default_terms: tuple[str, ...] = ("clip",)  # the loss terms when loss.terms is empty
    can_encode: bool = True  # what inference may ask of it (`mmcl.inference.Encoder`): embeddings, no captions
    can_caption: bool = False

    def __init__(self, cfg: ModelConfig, tokenizer: Tokenizer | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg.text)
        self.image = build_image_tower(cfg.image, cfg.embed_dim)
        self.text = build_text_tower(cfg.text, cfg.embed_dim, self.tokenizer)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.init_logit_scale)))
        self.max_log_scale = math.log(cfg.max_logit_scale)
        if cfg.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(cfg.init_logit_bias)))
        else:
            self.logit_bias = None
        if cfg.image.lock:
            self.image.lock(cfg.image.unlocked_layers)
        if cfg.text.lock:
            self.text.lock(cfg.text.unlocked_layers)
        self.train()

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, D) features (unit length with `normalize`)."""
        features = self.image(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(
        self, text: torch.Tensor, text_mask: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """(B, L) token ids (+ (B, L) mask) -> (B, D) features (unit length with `normalize`)."""
        features = self.text(text, text_mask)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_image_tokens(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, D) per-patch / per-position features in the joint space (unit length with
        `normalize`), for token-level objectives (FILIP); towers without them: a one-line UserError."""
        tokens = _token_method(self.image, "image", self.cfg.image.kind)(images)
        return F.normalize(tokens, dim=-1) if normalize else tokens

    def encode_text_tokens(
        self, text: torch.Tensor, text_mask: torch.Tensor | None = None, normalize: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) ids (+ mask) -> ((B, L, D) per-token features in the joint space, unit length with `normalize`
        and zero at padding; (B, L) bool mask of the tokens that carry the caption)."""
        tokens, mask = _token_method(self.text, "text", self.cfg.text.kind)(text, text_mask)
        return (F.normalize(tokens, dim=-1) if normalize else tokens), mask

    def scale_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(exp of the clamped logit_scale, logit_bias or None)."""
        return self.logit_scale.clamp(max=self.max_log_scale).exp(), self.logit_bias

    def forward(
        self,
        images: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Normalised features of the towers given inputs: {'image_features' (B, D), 'text_features' (B, D),
        'logit_scale' () exponentiated, 'logit_bias' () when the model has one}."""
        scale, bias = self.scale_and_bias()
        out = {"logit_scale": scale}
        if images is not None:
            out["image_features"] = self.encode_image(images)
        if text is not None:
            out["text_features"] = self.encode_text(text, text_mask)
        if bias is not None:
            out["logit_bias"] = bias
        return out

    def train(self, mode: bool = True) -> CLIP:
        """Set train/eval mode; locked (frozen) parts of the towers always stay in eval mode."""
        super().train(mode)
        for tower in (self.image, self.text):
            if getattr(tower, "locked", False):
                set_locked_eval(tower)
        return self

    def preprocess_cfg(self) -> dict:
        """What the image tower expects (`mmcl.data.transforms.resolve_preprocess`): image_size, mean, std,
        resize_mode, resize_size, interpolation; the tower's defaults (an imported tower: its source's image
        processor) under what the config recorded (`model.image.preprocess`)."""
        from mmcl.data.transforms import resolve_preprocess

        tower = getattr(self.image, "preprocess", {})
        return resolve_preprocess(self.cfg.image.image_size, self.image.mean, self.image.std, tower,
                                  self.cfg.image.preprocess)  # fmt: skip

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute tower activations in the backward pass (memory for compute)."""
        self.image.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)


def _token_method(tower: nn.Module, side: str, kind: str):
    """The tower's `forward_tokens`, or a one-line UserError naming the tower."""
    method = getattr(tower, "forward_tokens", None)
    if method is None:
        raise UserError(
            f"the {side} tower {type(tower).__name__} (model.{side}.kind '{kind}') has no per-token outputs; "
            "token-level terms need a timm/hybrid image tower and a clip/hf text tower"
        )
    return method


@MODELS.register("clip")
def build_clip(cfg: ModelConfig) -> CLIP:
    return CLIP(cfg)
