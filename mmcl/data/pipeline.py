"""Build the train/eval streams of an experiment from its DataConfig and the model's preprocessing."""

from __future__ import annotations

from typing import Any

import torch

from mmcl.config import DataConfig
from mmcl.data.device_decode import DeviceDecoder, EncodedSampleDecoder
from mmcl.data.remote import FetchOptions
from mmcl.data.shards import Collator, SampleDecoder, ShardStream, expand_shards
from mmcl.data.transforms import ImageTransform, transform_from_preprocess
from mmcl.utils import UserError


def build_stream(
    cfg: DataConfig,
    model,
    shards: list[str],
    *,
    train: bool,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int | None = None,
    need_caption: bool = True,
    views: dict[str, Any] | None = None,
) -> ShardStream:
    """A ShardStream over `shards` with `model`'s transform and tokenizer, plus the named `views`
    the loss terms asked for (`mmcl.data.views`; `Task.views()` collects them).

    Training: shuffled, augmented, full batches only. Eval: one ordered pass, no augmentation.
    With `cfg.decode_on == "device"` a training stream's batches carry the JPEGs undecoded: decode them with
    `device_decoder(cfg, model, device)` where they reach the device (the trainer does).
    """
    views = views or {}
    image_views = {k: v for k, v in views.items() if v.kind == "sample"}
    batch_views = {k: v for k, v in views.items() if v.kind == "batch"}
    pre = model.preprocess_cfg()
    transform = _transform(cfg, model, train)
    if train and cfg.decode_on == "device":
        if image_views:
            raise UserError(f"data.decode_on=device cannot build the image views {sorted(image_views)}")
        decoder: Any = EncodedSampleDecoder(
            transform, cfg.caption_key, cfg.label_key, cfg.max_pixels, pre["image_size"], need_caption=need_caption
        )
    else:
        decoder = SampleDecoder(
            transform,
            cfg.caption_key,
            cfg.label_key,
            cfg.max_pixels,
            pre["image_size"],
            need_caption=need_caption,
            image_views=image_views,
            pixels=True,  # uint8 per sample, normalised per batch by the Collator
        )
    urls = [expand_shards(p) for p in shards]
    if train and cfg.balance.t > 0:  # MetaCLIP: drop samples of head concepts before they are decoded
        from mmcl.data.balance import balanced

        decoder = balanced(decoder, cfg, [u for group in urls for u in group], seed)
    return ShardStream(
        urls,
        decoder,
        Collator(getattr(model, "tokenizer", None) if need_caption else None, batch_views, transform.normalize),
        batch_size or cfg.batch_size,
        weights=cfg.train_weights or None,
        resampled=cfg.resampled and train,
        shuffle_buffer=cfg.shuffle_buffer if train else 0,
        seed=seed,
        rank=rank if train else 0,
        world_size=world_size if train else 1,
        drop_last=train,
        fetch=fetch_options(cfg),
    )


def fetch_options(cfg: DataConfig) -> FetchOptions:
    """How hard to try reading remote shards, from `data.http_*`."""
    return FetchOptions(cfg.http_timeout, cfg.http_retries, cfg.http_backoff, cfg.http_max_backoff, cfg.http_min_speed)


def device_decoder(cfg: DataConfig, model, device: torch.device | str, train: bool = True) -> DeviceDecoder:
    """The decoder that finishes, on `device`, the batches of a `decode_on=device` stream (same transform)."""
    return DeviceDecoder(_transform(cfg, model, train), device, cfg.max_pixels)


def _transform(cfg: DataConfig, model, train: bool) -> ImageTransform:
    # the model's own geometry (resize mode, interpolation) as well as its size and normalisation
    return transform_from_preprocess(model.preprocess_cfg(), train=train and cfg.augment, scale=tuple(cfg.crop_scale))
