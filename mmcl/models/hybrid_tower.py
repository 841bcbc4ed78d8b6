"""Hybrid image tower (`kind: hybrid`): a small convolutional stem feeding a CLIP-layout timm ViT.

Xiao et al. 2021, "Early Convolutions Help Transformers See Better": a ViT's patch embedding is one
stride-p linear map per patch, so every spatial relation inside a patch and between neighbouring
patches must be learnt by attention from data. Replacing it with a few 3x3 stride-2 conv + BN + ReLU
layers and a 1x1 projection (their "C" stem) gives the tokens the locality of a CNN at almost no cost:
the same token grid (p = 2 ** layers), the same blocks, class token, norms and pooling, so everything
that works on `ImageTower` (class-token shortcut, CLIP init, patch dropout, locking, checkpointing)
works here. On the built-in shapes this is what a tiny ViT lacks: trained on the shape labels alone
(200 AdamW steps of 128, 64 px) clip-tiny-64's ViT stays at chance (21%, chance 20%), this tower at
clip-tiny-64's size reaches 38% and resnet10t 91% (bench/bench_recipe.py, `shape-supervised-*`).

The stem's BatchNorm uses batch statistics in training, as resnet10t's does (GradCache chunks and
processes normalise with their own chunk's). Built from timm's parts: `vision_transformer_hybrid.ConvStem`
inside `layers.HybridEmbed`, passed to `VisionTransformer` as its `embed_layer`. The stem is the only
difference from a plain ViT, so open_clip and transformers (whose CLIP ViTs have a linear patch
embedding) cannot express the tower: their exporters refuse it in one line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from mmcl.config import ImageTowerConfig
from mmcl.models.towers import ImageTower, _create_timm
from mmcl.registry import IMAGE_TOWERS
from mmcl.utils import UserError


def conv_stem_embed(widths: list[int]) -> Callable[..., nn.Module]:
    """A timm `embed_layer`: 3x3 stride-2 conv + BN + ReLU per width, then a 1x1 conv to the ViT width.

    Shapes: (B, 3, H, W) -> (B, H/2^n * W/2^n, embed_dim), n = len(widths), as a patch embedding with
    p = 2^n. The 1x1 conv (bias, no norm) stands where the patch embedding's linear map stood.
    """

    def build(img_size: int, in_chans: int, embed_dim: int, **_: Any) -> nn.Module:
        from timm.layers import HybridEmbed
        from timm.models.vision_transformer_hybrid import ConvStem

        n = len(widths)
        stem = ConvStem(
            in_chans,
            depth=n + 1,
            channels=(*widths, embed_dim),
            kernel_size=(3,) * n + (1,),
            stride=(2,) * n + (1,),
        )
        return HybridEmbed(stem, img_size=img_size, patch_size=1, in_chans=in_chans, embed_dim=embed_dim, proj=False)

    return build


@IMAGE_TOWERS.register("hybrid")
class HybridImageTower(ImageTower):
    """`ImageTower` whose timm ViT embeds patches with a conv stem (`model.image.conv_stem` widths).

    `timm_name` / `timm_kwargs` size the ViT as for `kind: timm`; its `patch_size` (when given) must be
    2 ** len(conv_stem), the stem's stride. Shapes: images (B, 3, H, W) -> (B, embed_dim).
    """

    def _create_trunk(self, cfg: ImageTowerConfig, num_classes: int | None) -> nn.Module:
        from timm.layers import HybridEmbed

        widths = [int(w) for w in cfg.conv_stem]
        if not widths or min(widths) < 1:
            raise UserError(f"model.image.conv_stem must list the stem's conv widths (got {cfg.conv_stem})")
        if cfg.pretrained:
            raise UserError("model.image.pretrained: timm has no weights for a ViT with a conv stem (kind 'hybrid')")
        stride = 2 ** len(widths)
        patch = cfg.timm_kwargs.get("patch_size", stride)
        if patch != stride:
            raise UserError(
                f"model.image.conv_stem: {len(widths)} stride-2 layers make {stride} px tokens but "
                f"model.image.timm_kwargs.patch_size is {patch}"
            )
        if cfg.image_size % stride:
            raise UserError(
                f"model.image.image_size {cfg.image_size} is not a multiple of the conv stem's stride {stride}"
            )
        kwargs = {**cfg.timm_kwargs, "patch_size": stride, "embed_layer": conv_stem_embed(widths)}
        not_vit = UserError(f"model.image.timm_name: kind 'hybrid' needs a timm ViT, not {cfg.timm_name}")
        try:
            trunk = _create_timm(dataclasses.replace(cfg, timm_kwargs=kwargs), num_classes)
        except TypeError as e:
            if "unexpected keyword argument" not in str(e):  # a CNN takes neither patch_size nor embed_layer
                raise
            raise not_vit from None
        if not isinstance(getattr(trunk, "patch_embed", None), HybridEmbed):
            raise not_vit
        return trunk
