"""Image stems for PrefixLM: images -> a sequence of d_model tokens for the encoder.

SimVLM (Wang et al. 2021, sec. 3.2) feeds the encoder with patches from the first
three stages of a ResNet ("conv stem"), which beat plain linear patches (ViT-style)
in their ablation. Both are here:

* `ConvStem`: a timm CNN cut after stage `stem_out_index` (`features_only=True`;
  resnet18 at index 3 -> stride 16, 256 channels), a 1x1 projection to d_model.
* `PatchStem`: a strided convolution (= linear patch embedding), for tiny tests.

Both add learned 2-D position embeddings (bilinearly resized when the image size
differs from the configured one) and a LayerNorm, so image tokens enter the
encoder at the same scale as the text embeddings they are concatenated with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.config import ModelConfig
from mmcl.utils import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _GridTokens(nn.Module):
    """(B, C, h, w) feature map -> (B, h*w, D) tokens with learned 2-D position embeddings."""

    def __init__(self, in_channels: int, d_model: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid
        # 1x1 projection of the CNN channels; a patch stem already produces d_model channels
        self.proj = nn.Identity() if in_channels == d_model else nn.Conv2d(in_channels, d_model, kernel_size=1)
        self.pos_embed = nn.Parameter(torch.randn(1, d_model, *grid) * 0.02)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        x = self.proj(fmap)  # (B, D, h, w)
        pos = self.pos_embed
        if x.shape[-2:] != pos.shape[-2:]:  # other resolution than configured: resize, as ViTs do
            pos = F.interpolate(pos, size=x.shape[-2:], mode="bilinear", align_corners=False)
        x = (x + pos).flatten(2).transpose(1, 2)  # (B, h*w, D)
        return self.norm(x)


class ConvStem(nn.Module):
    """First stages of a timm CNN + projection: (B, 3, H, W) -> (B, H/s * W/s, d_model)."""

    def __init__(
        self,
        timm_name: str,
        d_model: int,
        image_size: int,
        out_index: int = 3,
        pretrained: bool = False,
        timm_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        import timm

        self.trunk = timm.create_model(
            timm_name, pretrained=pretrained, features_only=True, out_indices=(out_index,), **(timm_kwargs or {})
        )
        info = self.trunk.feature_info
        channels, stride = info.channels()[-1], info.reduction()[-1]
        side = math.ceil(image_size / stride)
        self.tokens = _GridTokens(channels, d_model, (side, side))
        cfg = timm.data.resolve_data_config({}, model=self.trunk)
        self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])
        self.num_tokens = side * side

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokens(self.trunk(images)[-1])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if hasattr(self.trunk, "set_grad_checkpointing"):
            self.trunk.set_grad_checkpointing(enable)


class PatchStem(nn.Module):
    """Linear patch embedding (ViT-style): (B, 3, H, W) -> (B, (H/p) * (W/p), d_model)."""

    def __init__(self, d_model: int, image_size: int, patch_size: int) -> None:
        super().__init__()
        if patch_size < 1 or image_size % patch_size:
            raise UserError(f"decoder.patch_size={patch_size} must divide image.image_size={image_size}")
        side = image_size // patch_size
        self.patch = nn.Conv2d(3, d_model, kernel_size=patch_size, stride=patch_size)
        self.tokens = _GridTokens(d_model, d_model, (side, side))
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.num_tokens = side * side

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokens(self.patch(images))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        pass  # one convolution: nothing worth recomputing


def build_image_stem(cfg: ModelConfig, d_model: int) -> ConvStem | PatchStem:
    """The stem named by `cfg.decoder.image_stem`, producing `d_model`-wide tokens."""
    if cfg.decoder.image_stem == "patch":
        return PatchStem(d_model, cfg.image.image_size, cfg.decoder.patch_size)
    return ConvStem(
        cfg.image.timm_name,
        d_model,
        cfg.image.image_size,
        out_index=cfg.image.stem_out_index,
        pretrained=cfg.image.pretrained,
        timm_kwargs=cfg.image.timm_kwargs,
    )


class TowerTokens(nn.Module):
    """Token features of a shared image tower -> d_model tokens for the PrefixLM encoder (joint model).

    Takes what a timm trunk's `forward_features` returns: (B, N, C) tokens (ViTs, class token
    included) or a (B, C, h, w) map (CNNs, flattened row-major); LayerNorm + linear to (B, N, d_model).
    The tower's own position embeddings (ViT) or receptive fields (CNN) carry the layout.
    """

    def __init__(self, width: int, d_model: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, d_model)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim == 4:
            features = features.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)
        return self.proj(self.norm(features))
