"""Multi-crop (SwAV, Caron et al. 2020; DINO, Caron et al. 2021): 2 global views + N small local views.

The global views are strong augmentations at the model's image size with a crop of `global_scale` of
the image (the papers: 0.4-1, or 0.14-1); the local views are the same augmentation at `local_size`
pixels with a crop of `local_scale` (the papers: 96 px of 224, 0.05-0.4). Each is an `ImageView`, so
every crop is drawn from the sample's own RNG in the loader workers: a pure function of
(seed, epoch, key), exact resume unchanged. Named `view1`, `view2` (global) and `local0` .. `local{N-1}`.

A ViT encodes the local crops at their lower resolution through timm's dynamic image size (its position
embedding resampled to the smaller grid, `enable_dynamic_size`); a CNN takes any size as it is. All local
crops of a batch go through the tower in one pass, (N B, 3, s, s).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mmcl.data.augment import AugmentConfig, StrongAugment
from mmcl.data.views import ImageView
from mmcl.utils import UserError


def multicrop_views(
    model: Any,
    augment: AugmentConfig,
    local_crops: int = 0,
    local_size: int = 16,
    local_scale: tuple[float, float] = (0.05, 0.4),
    global_scale: tuple[float, float] = (0.4, 1.0),
) -> dict[str, ImageView]:
    """The views of a multi-crop term: {'view1', 'view2'} global, {'local0', ...} local.

    With `local_crops` 0 the two views are the plain strong views (`augment.crop_scale`), as before.
    """
    pre = model.preprocess_cfg()
    if local_crops <= 0:
        strong = StrongAugment(pre["image_size"], augment, pre["mean"], pre["std"])
        return {"view1": ImageView(strong), "view2": ImageView(strong)}
    if not 0 < local_scale[0] <= local_scale[1] <= 1 or not 0 < global_scale[0] <= global_scale[1] <= 1:
        raise UserError(f"multi-crop scales must lie in (0, 1]: local {local_scale}, global {global_scale}")
    if local_size < 1:
        raise UserError(f"local_size must be >= 1 (got {local_size})")
    enable_dynamic_size(model.image, local_size)
    glob = StrongAugment(
        pre["image_size"], dataclasses.replace(augment, crop_scale=tuple(global_scale)), pre["mean"], pre["std"]
    )
    loc = StrongAugment(
        local_size, dataclasses.replace(augment, crop_scale=tuple(local_scale)), pre["mean"], pre["std"]
    )
    return {"view1": ImageView(glob), "view2": ImageView(glob)} | {
        name: ImageView(loc) for name in local_names(local_crops)
    }


def local_names(local_crops: int) -> list[str]:
    """The names of the local views: `local0` .. `local{N-1}`."""
    return [f"local{i}" for i in range(local_crops)]


def enable_dynamic_size(tower: Any, local_size: int) -> None:
    """Let a timm ViT image tower take images of another size (its position embedding resampled per input).

    A no-op for CNNs; a one-line UserError for towers that cannot (no timm trunk, a size not a multiple of
    the patch). Same outputs as before at the model's own size (the resampling is then the identity).
    """
    trunk = getattr(tower, "trunk", None)
    if trunk is None:
        raise UserError(
            f"local crops need a timm image tower (model.image.kind 'timm' or 'hybrid'), not {type(tower).__name__}"
        )
    embed = getattr(trunk, "patch_embed", None)
    if embed is None:
        return  # a CNN: any size as it is
    patch = getattr(embed, "patch_size", None)
    patch = patch[0] if isinstance(patch, tuple) else patch
    if not hasattr(trunk, "dynamic_img_size") or not hasattr(embed, "strict_img_size"):
        raise UserError(f"local crops: {type(trunk).__name__} cannot take images of another size")
    if patch and local_size % patch:
        raise UserError(f"local_size {local_size} is not a multiple of the ViT's patch size {patch}")
    if trunk.dynamic_img_size:
        return
    from timm.layers import Format

    trunk.dynamic_img_size = True  # timm's own switch: patches kept as (B, h, w, C) until the position embedding
    embed.strict_img_size, embed.flatten, embed.output_fmt = False, False, Format.NHWC
