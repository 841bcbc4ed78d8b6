"""The one place a training or eval stream is assembled: its stages, its decoder, its collator, its batches.

    reader (tar members -> raw samples)  ->  ShardStream (order, shuffle, resume; `shards.py`)
      ->  SampleDecoder (image, caption, label, views; or, with `encoded`, the JPEG left for the device)
      ->  Collator (tokenize, stack, normalise: a `Batch`)  ->  TrainBatches (epochs, device decode, ranks)

`build_stream` wires the first four from a `DataConfig` and the model's preprocessing; `TrainBatches` is what
the trainer asks for the next batch.
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import get_worker_info

from mmcl.config import DataConfig
from mmcl.data.batch import Batch
from mmcl.data.decode import decode_caption, decode_image, decode_json, decode_label, image_bytes
from mmcl.data.device_decode import ENCODED_VIEW, DeviceDecoder, EncodedImages, encode_image
from mmcl.data.remote import FetchOptions
from mmcl.data.shards import EpochEnd, ShardStream, StreamState, expand_shards, make_loader
from mmcl.data.transforms import ImageTransform, transform_from_preprocess
from mmcl.utils import UserError, loader_worker_init


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
    the loss terms asked for (`mmcl.data.views`; `Task.views()` collects them, named `term/view`).

    Training: shuffled, augmented, full batches only. Eval: one ordered pass, no augmentation.
    With `cfg.decode_on == "device"` a training stream's batches carry the JPEGs undecoded: `TrainBatches`
    decodes them where they reach the device (`device_decoder`).
    """
    views = views or {}
    image_views = {k: v for k, v in views.items() if v.kind == "sample"}
    batch_views = {k: v for k, v in views.items() if v.kind == "batch"}
    encoded = train and cfg.decode_on == "device"
    if encoded and image_views:
        _refuse_image_views(image_views)
    transform = _transform(cfg, model, train)
    decoder: Any = SampleDecoder(
        transform,
        cfg.caption_key,
        cfg.label_key,
        cfg.max_pixels,
        model.preprocess_cfg()["image_size"],
        need_caption=need_caption,
        image_views=image_views,
        pixels=True,  # uint8 per sample, normalised per batch by the Collator
        encoded=encoded,
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


def _refuse_image_views(image_views: dict[str, Any]) -> None:
    """Per-sample image views augment the decoded image in the workers, the work decode_on=device moves away."""
    term, _, _ = next(iter(image_views)).partition("/")
    own = [k.partition("/")[2] or k for k in image_views if k.partition("/")[0] == term]
    raise UserError(
        f"loss term '{term}' augments the decoded image in the loader workers ({', '.join(own)}), "
        "which data.decode_on=device does not decode: use data.decode_on=workers with it"
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


# ----------------------------------------------------------------------------- decode + collate (in the workers)


class SampleDecoder:
    """raw sample -> {'image': tensor, 'caption': str, 'label': int|None, 'key': str, 'views': {...}}.

    With `pixels=True` (a transform with `pixels`, e.g. `ImageTransform`) 'image' is its uint8 (3, S, S)
    output and the `Collator` normalises the whole batch at once (given `normalize=transform.normalize`):
    a third of the per-image cost of normalising sample by sample and stacking.
    `image_views` (name -> `mmcl.data.views.ImageView`) are more transforms of the same decoded
    image, drawn from the same per-sample RNG after the main one; a view with `reads_raw` (`CounterfactualView`)
    reads other members of the raw sample: named tensors (`name/part`) and parts left out (counted).
    With `encoded=True` (data.decode_on=device) the JPEG is not decoded: 'image' is None and 'encoded' holds
    its bytes and crop box (`device_decode.encode_image`, the same RNG draws), decoded on the device later.
    Picklable.
    """

    def __init__(
        self,
        transform,
        caption_key: str = "txt",
        label_key: str = "label",
        max_pixels: int = 40_000_000,
        image_size: int = 0,
        need_image: bool = True,
        need_caption: bool = True,
        image_views: dict[str, Any] | None = None,
        pixels: bool = False,
        encoded: bool = False,
    ) -> None:
        self.transform, self.caption_key, self.label_key = transform, caption_key, label_key
        self.image_fn = transform.pixels if pixels else transform
        self.max_pixels, self.image_size = max_pixels, image_size
        self.need_image, self.need_caption, self.encoded = need_image, need_caption, encoded
        self.image_views = image_views or {}

    def __call__(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        meta = decode_json(raw)
        caption = decode_caption(raw, meta, self.caption_key, rng) if self.need_caption else ""
        label = decode_label(raw, meta, self.label_key)
        out = {"image": None, "caption": caption, "label": label, "key": raw["__key__"], "views": {}}
        if self.encoded:
            out["encoded"] = encode_image(image_bytes(raw), rng, self.transform, self.max_pixels, self.image_size)
            return out
        if not self.need_image:
            return out
        notes: list[Any] = []
        pil = decode_image(image_bytes(raw), self.max_pixels, self.image_size)
        replay = rng.getstate()  # a raw view's image gets the main image's augmentation draws
        out["image"] = self.image_fn(pil, rng)
        for name, view in self.image_views.items():
            if getattr(view, "reads_raw", False):
                parts, left_out = view.from_raw(raw, replay, self.transform, self.max_pixels)
                out["views"].update({f"{name}/{part}": v for part, v in parts.items()})
                notes += left_out
            else:
                out["views"][name] = view(pil, rng)
        return {**out, "notes": notes} if notes else out


class Collator:
    """decoded samples -> Batch, tokenizing the captions in one call. Picklable.

    Per-sample views are stacked into `batch.views`; batch views (name -> callable(captions, keys,
    has_images) -> {name: tensor}, e.g. `CaptionSplitView`) add their outputs to `batch.views`.
    `normalize` (uint8 batch, out -> float batch; `ImageTransform.normalize`) turns uint8 sample images
    (`SampleDecoder(pixels=True)`) into the normalised float images of the batch. In a loader worker the
    image tensors are built in shared memory, as torch's `default_collate` does: sending them to the main
    process then costs no copy.
    """

    def __init__(self, tokenizer=None, batch_views: dict[str, Any] | None = None, normalize=None) -> None:
        self.tokenizer = tokenizer
        self.batch_views = batch_views or {}
        self.normalize = normalize

    def __call__(self, samples: list[dict[str, Any]]) -> Batch:
        captions = [s["caption"] for s in samples]
        text = mask = None
        if self.tokenizer is not None and any(captions):
            text, mask = self.tokenizer(captions)
        labels = [s["label"] for s in samples]
        images = [s["image"] for s in samples]
        keys = [s["key"] for s in samples]
        views = {name: _stack([s["views"][name] for s in samples]) for name in samples[0].get("views", {})}
        if samples[0].get("encoded") is not None:  # data.decode_on=device: decoded by `TrainBatches` on the device
            views[ENCODED_VIEW] = EncodedImages.collate([s["encoded"] for s in samples])
        has_images = images[0] is not None or ENCODED_VIEW in views
        for view in self.batch_views.values():
            views.update(view(captions, keys, has_images))
        return Batch(
            images=self._images(images) if images[0] is not None else None,
            text=text,
            text_mask=mask,
            captions=captions,
            labels=torch.tensor(labels) if all(v is not None for v in labels) else None,
            keys=keys,
            views=views,
        )

    def _images(self, images: list[torch.Tensor]) -> torch.Tensor:
        if images[0].dtype != torch.uint8 or self.normalize is None:
            return _stack(images)
        out = _new_tensor((len(images), *images[0].shape), torch.float32)
        for row, image in zip(out, images):
            row.copy_(image)  # uint8 -> float, one pass; then the batch is normalised in place at once
        return self.normalize(out, out)


def _new_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor, in shared memory inside a loader worker (then the DataLoader sends it without a copy)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = 1
    for n in shape:
        numel *= n
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel, device="cpu")
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(tensors, out=_new_tensor((len(tensors), *tensors[0].shape), tensors[0].dtype))


# ----------------------------------------------------------------------------- batches for the trainer


class TrainBatches:
    """Endless training batches of one process across epochs: what the trainer asks for the next batch.

    It runs the loader epoch after epoch (every rank moves to the next epoch together), records the data
    position of each batch it hands out (`state`, saved with each checkpoint), raises a one-line error when an
    epoch yields no usable sample, and with `decode` (a `DeviceDecoder`, data.decode_on=device) decodes each
    batch's JPEGs on the device, dropping and counting the rows that fail, then trims every rank's batch to the
    same number of rows.

    Args:
        stream: the training `ShardStream` (`build_stream(train=True)`).
        num_workers: loader worker processes.
        accelerator: an `accelerate.Accelerator` (device, number of processes, reduce), or anything with those.
        decode: the `DeviceDecoder` of a decode_on=device stream, else None.
    """

    def __init__(self, stream: ShardStream, num_workers: int, accelerator: Any, decode: DeviceDecoder | None = None):
        self.stream, self.num_workers, self.accelerator, self.decode = stream, num_workers, accelerator, decode
        self.state = StreamState()
        self._it: Iterator[Batch | EpochEnd] | None = None

    def resume(self, state: StreamState) -> None:
        """Start (again) from `state`: a fresh one, or the one a checkpoint saved."""
        self.state, self._it = state, None

    def next(self) -> Batch:
        """The next batch (of `decode`d, rank-matched rows when decoding on the device)."""
        while True:
            batch = self._next_collated()
            if self.decode is None:
                return batch
            batch, skipped = self.decode(batch)
            batch, trimmed = match_ranks(batch, self.accelerator)
            self.state.add_skips({**skipped, **trimmed})
            if len(batch.keys):
                return batch

    def skip_totals(self) -> dict[str, int]:
        """Skipped samples by reason since the run began, summed over the processes."""
        totals = self.state.skip_totals()
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            merged: dict[str, int] = {}
            for part in gather_object([totals]):
                for k, v in part.items():
                    merged[k] = merged.get(k, 0) + v
            totals = merged
        return totals

    def _start_epoch(self) -> None:
        pin = self.accelerator.device.type == "cuda"
        loader = make_loader(self.stream, self.num_workers, self.state, pin_memory=pin)
        loader.generator = torch.Generator().manual_seed(self.state.epoch)  # keep the global RNG untouched
        loader.worker_init_fn = functools.partial(loader_worker_init, parent_pid=os.getpid())
        self._it = iter(loader)

    def _pull(self) -> Batch | None:
        """The next batch of this epoch, or None; workers' end-of-epoch counts are recorded on the way."""
        while isinstance(item := next(self._it, None), EpochEnd):
            self.state.record(item, self.stream.num_workers)
        return item

    def _next_collated(self) -> Batch:
        seen: dict[str, int] = {}
        acc = self.accelerator
        for _ in range(3):  # a new epoch, then a second try, before declaring the data empty
            if self._it is None:
                self.stream.report_epoch_end = True
                self._start_epoch()
            batch = self._pull()
            have = torch.tensor(0 if batch is None else 1, device=acc.device)
            if acc.num_processes > 1:  # every rank moves to the next epoch together
                have = acc.reduce(have, reduction="sum") // acc.num_processes
            if int(have) == 1:
                self.state.record(batch, self.stream.num_workers)
                return batch
            self._it = None
            seen = self.state.epoch_skip_totals()
            self.state.next_epoch(self.state.epoch + 1)  # skip counts stay cumulative across epochs
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(seen.items())) or "the shards hold no samples"
        raise UserError(
            f"no usable samples in {self.stream.all_shards[:3]}...: every sample was skipped in an epoch ({reasons})"
        )


def match_ranks(batch: Batch, accelerator: Any) -> tuple[Batch, dict[str, int]]:
    """With several processes, cut every rank's batch to the smallest one (the feature gather needs equal rows)."""
    if accelerator is None or accelerator.num_processes == 1:
        return batch, {}
    import torch.distributed as dist

    n = torch.tensor(len(batch.keys), device=accelerator.device)
    dist.all_reduce(n, op=dist.ReduceOp.MIN)
    extra = len(batch.keys) - int(n)
    if not extra:
        return batch, {}
    return batch.select(list(range(int(n)))), {"trimmed_to_match_ranks": extra}


def train_batches(cfg: DataConfig, model, accelerator: Any, *, seed: int, views: dict[str, Any]) -> TrainBatches:
    """The training batches of this process (`accelerator.process_index` of `num_processes`): the stream of
    `cfg.train_shards` with the loss terms' `views`, decoded in the workers or on `accelerator.device`."""
    stream = build_stream(
        cfg,
        model,
        cfg.train_shards,
        train=True,
        seed=seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        views=views,
    )
    decode = device_decoder(cfg, model, accelerator.device) if cfg.decode_on == "device" else None
    return TrainBatches(stream, cfg.num_workers, accelerator, decode)
