"""Decoding JPEGs on the training device (`data.decode_on=device`): workers read, the accelerator decodes.

At 224 px the loader workers spend most of their time in the JPEG decoder. With `decode_on=device` a worker
(`SampleDecoder(encoded=True)` -> `encode_image`) only reads the header (pixel limit, size, EXIF orientation),
draws the crop from the sample's own RNG exactly as the worker path would (`ImageTransform.crop_box`, on the
size the worker path would decode at) and passes the JPEG bytes on; the main process decodes the whole batch with `torchvision.io.decode_jpeg(list,
device=...)` (nvJPEG's batched decode on CUDA), crops, resizes (torchvision v2, antialiased bicubic) and
normalises on the device. The same code runs with `device='cpu'`, where the batch equals the worker path's
(`tests/data/test_device_decode.py`).

* Images that are not baseline RGB/grey JPEGs (PNG, WebP, CMYK JPEGs) are decoded in the worker as before
  and travel as uint8 pixels.
* A JPEG the device decoder rejects is decoded again with PIL; if PIL fails too it is dropped from the batch
  and counted by reason (`StreamState.device_skipped`), as the workers count theirs. With several processes
  every rank then keeps the same number of rows (the contrastive gather needs it): the extra rows are dropped
  and counted as 'trimmed_to_match_ranks' (`mmcl.data.pipeline.TrainBatches`).
* Per-sample image views (SimCLR, SimSiam) are refused: they augment the decoded image in the worker
  (colour jitter, blur in PIL), which is the work this option moves off the workers.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace

import torch

from mmcl.data.batch import Batch
from mmcl.data.decode import SkipCounter, SkipSample, decode_image, probe_image

log = logging.getLogger("mmcl.data")

ENCODED_VIEW = "encoded_images"  # the Batch.views entry holding the undecoded images
_ORIENTATION = 0x0112  # EXIF tag
_TRANSPOSING = (5, 6, 7, 8)  # orientations that swap width and height


@dataclass
class EncodedImage:
    """One sample's image as a worker passes it: JPEG bytes + crop box, or uint8 pixels decoded in the worker.

    data:        the JPEG file (None for a worker-decoded image)
    scale:       the worker path decodes at 1/scale (DCT scaling, `decode_image`): the device averages
                 scale x scale blocks of its full-size decode to get the same image
    box:         (top, left, h, w) in that upright 1/scale image (training); None: centre crop (evaluation)
    orientation: the EXIF orientation (1-8) the device applies after decoding
    pixels:      uint8 (3, S, S), for images the worker decoded itself (not a baseline RGB/grey JPEG)
    """

    data: bytes | None = None
    scale: int = 1
    box: tuple[int, int, int, int] | None = None
    orientation: int = 1
    pixels: torch.Tensor | None = None


@dataclass
class EncodedImages:
    """A batch of `EncodedImage`s in two tensors (one shared-memory transfer each, not one per sample).

    data:       (total,) uint8, every JPEG of the batch end to end; `lengths[i]` bytes for row i (0: pixels)
    pixels:     (M, 3, S, S) uint8 rows decoded in the workers, in row order (None when M = 0)
    """

    data: torch.Tensor
    lengths: list[int]
    scales: list[int]
    boxes: list[tuple[int, int, int, int] | None]
    orientations: list[int]
    pixels: torch.Tensor | None

    @classmethod
    def collate(cls, images: list[EncodedImage]) -> EncodedImages:
        joined = b"".join(im.data or b"" for im in images)
        data = torch.frombuffer(bytearray(joined), dtype=torch.uint8) if joined else torch.empty(0, dtype=torch.uint8)
        decoded = [im.pixels for im in images if im.pixels is not None]
        return cls(
            data,
            [len(im.data or b"") for im in images],
            [im.scale for im in images],
            [im.box for im in images],
            [im.orientation for im in images],
            torch.stack(decoded) if decoded else None,
        )

    def files(self) -> list[torch.Tensor | None]:
        """Row i's JPEG as a (n,) uint8 view of `data`, or None for a worker-decoded row."""
        out, start = [], 0
        for n in self.lengths:
            out.append(self.data[start : start + n] if n else None)
            start += n
        return out


def encode_image(data: bytes, rng: random.Random, transform, max_pixels: int, image_size: int) -> EncodedImage:
    """A worker's part of a device decode (`SampleDecoder(encoded=True)`): header only for a JPEG (pixel limit,
    size, orientation, the crop drawn from `rng` as the worker path would); a full decode for anything else.

    Args:
        transform: the stream's `ImageTransform` (crop settings; it decodes the non-JPEG images).
        image_size: the size the worker path decodes JPEGs at (DCT scaling); the crop is drawn on that size.
    """
    img = probe_image(data, max_pixels)  # skips what the worker path skips before decoding
    if img.format != "JPEG" or img.mode not in ("RGB", "L"):
        # PNG, WebP, CMYK JPEGs ...: decoded here exactly as the worker path does
        pil = decode_image(data, max_pixels, image_size)
        return EncodedImage(pixels=transform.pixels(pil, rng).contiguous())
    orientation = img.getexif().get(_ORIENTATION, 1)
    orientation = orientation if orientation in range(1, 9) else 1
    scale = 1
    if image_size and min(img.size) >= 2 * image_size:
        img.draft("RGB", (image_size, image_size))  # as `decode_image`: the size the worker decodes at
        scale = img.decoderconfig[0] if img.decoderconfig else 1
    w, h = img.size
    if orientation in _TRANSPOSING:
        w, h = h, w
    box = transform.crop_box(w, h, rng)  # the worker path's draws, on the worker path's size
    return EncodedImage(data=data, scale=scale, box=box, orientation=orientation)


class DeviceDecoder:
    """Batch with `EncodedImages` -> Batch with normalised float images (B, 3, S, S) on `device`.

    Args:
        transform: the `ImageTransform` whose geometry and normalisation the workers would have applied.
        device: where to decode ('cuda': nvJPEG batched decode; 'cpu': libjpeg-turbo, for tests and CPU runs).
        max_pixels: the pixel limit, for the PIL retry of a JPEG the device decoder rejects.
    """

    def __init__(self, transform, device: torch.device | str, max_pixels: int = 40_000_000) -> None:
        self.transform, self.device, self.max_pixels = transform, torch.device(device), max_pixels
        self.mean = transform.mean.to(self.device)
        self.inv_std = transform.inv_std.to(self.device)
        self.counter = SkipCounter()  # rate-limited log lines; the counts themselves go to the caller

    def __call__(self, batch: Batch) -> tuple[Batch, dict[str, int]]:
        """The decoded batch (rows that cannot be decoded dropped) and the skip counts by reason."""
        views = dict(batch.views)
        enc: EncodedImages = views.pop(ENCODED_VIEW)
        files = enc.files()
        s = self.transform.size
        out = torch.empty((len(files), 3, s, s), dtype=torch.uint8, device=self.device)  # (B, 3, S, S)
        rows = [i for i, f in enumerate(files) if f is not None]
        decoded = self._decode([files[i] for i in rows])
        skipped: dict[str, int] = {}
        keep = [True] * len(files)
        for i, image in zip(rows, decoded):
            if image is None:  # PIL's decode: reduced and upright already
                image = self._retry_with_pil(files[i], enc.scales[i], batch.keys[i], skipped)
            else:
                image = _orient(_reduce(image, enc.scales[i]), enc.orientations[i])
            if image is None:
                keep[i] = False
                continue
            out[i] = self._geometry(image, enc.boxes[i])
        if enc.pixels is not None:
            out[[i for i, f in enumerate(files) if f is None]] = enc.pixels.to(self.device, non_blocking=True)
        images = out.float().sub_(self.mean).mul_(self.inv_std)  # as `ImageTransform.normalize`, on the device
        batch = replace(batch, images=images, views=views)
        return (batch if all(keep) else batch.select([i for i, k in enumerate(keep) if k])), skipped

    def _decode(self, files: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """One batched decode; if it fails, one call per file to find the bad ones (None)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if not files:
            return []
        try:
            return list(decode_jpeg(files, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            pass
        out: list[torch.Tensor | None] = []
        for f in files:
            try:
                out.append(decode_jpeg(f, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:
                out.append(None)
        return out

    def _retry_with_pil(self, file: torch.Tensor, scale: int, key: str, skipped: dict[str, int]) -> torch.Tensor | None:
        """PIL's decode (as the worker path's) of a JPEG the device decoder rejected; None: skipped and counted."""
        try:
            pil = decode_image(file.numpy().tobytes(), self.max_pixels, self.transform.size if scale > 1 else 0)
        except SkipSample as e:
            self.counter.add(e.reason, where=key, detail=e.detail)
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
            return None
        import numpy as np

        return torch.from_numpy(np.array(pil)).permute(2, 0, 1).to(self.device)

    def _geometry(self, image: torch.Tensor, box: tuple[int, int, int, int] | None) -> torch.Tensor:
        import torchvision.transforms.v2.functional as TF

        # the model's own interpolation (`ImageTransform.interpolation`, from its source's preprocessing)
        mode = TF.InterpolationMode(
            getattr(self.transform, "interpolation", "bicubic").replace("nearest", "nearest-exact")
        )

        def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
            if tuple(x.shape[1:]) == size:
                return x
            return TF.resize(x, list(size), interpolation=mode, antialias=True)

        if box is not None:  # a header that lied about the size: keep the box inside the image
            top, left = min(box[0], image.shape[1] - 1), min(box[1], image.shape[2] - 1)
            box = (top, left, min(box[2], image.shape[1] - top), min(box[3], image.shape[2] - left))
        return self.transform.geometry(image, box, resize=resize)


def _reduce(image: torch.Tensor, scale: int) -> torch.Tensor:
    """The 1/scale image libjpeg's DCT scaling would have decoded (PIL `draft`), as scale x scale block means of the
    full-size (3, H, W) uint8 decode (partial blocks at the right and bottom edges, as DCT scaling has them)."""
    if scale == 1:
        return image
    pooled = torch.nn.functional.avg_pool2d(image[None].float(), scale, ceil_mode=True)[0]
    return pooled.round_().to(torch.uint8)


def _orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply EXIF `orientation` to a (3, H, W) image as PIL's `ImageOps.exif_transpose` does (nvJPEG ignores it)."""
    hw = (-2, -1)
    ops = {
        2: lambda x: x.flip(-1),
        3: lambda x: x.flip(hw),
        4: lambda x: x.flip(-2),
        5: lambda x: x.transpose(*hw),
        6: lambda x: torch.rot90(x, -1, hw),
        7: lambda x: x.transpose(*hw).flip(hw),
        8: lambda x: torch.rot90(x, 1, hw),
    }
    return ops[orientation](image) if orientation in ops else image
