"""Safe decoding of one raw WebDataset sample: image, caption, label. Never unpickles.

Each failure raises `SkipSample(reason)`; the stream counts reasons instead of
stopping (a web-scale shard always holds some broken images).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import random
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from mmcl.utils import UserError

log = logging.getLogger("mmcl.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
MAX_PIXELS = 40_000_000  # the one default pixel limit (training, eval, index, app): checked from the header


class SkipSample(Exception):
    """This sample is unusable; `reason` is a short counter name (e.g. 'corrupt_image')."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SkipCounter:
    """Counts skipped samples by reason and logs rate-limited lines (the first three, then powers of two from 16).

    Args:
        logger: where the lines go (the eval readers log to "mmcl.eval"); default "mmcl.data".
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.counts: dict[str, int] = {}
        self.log = logger or log

    def add(self, reason: str, where: str = "", detail: str = "", unit: str = "sample") -> None:
        """Count one skip; `unit` is "shard" for a whole shard (`where` its URL): those are rare, each is logged."""
        n = self.counts.get(reason, 0) + 1
        self.counts[reason] = n
        if unit == "shard" or n <= 3 or (n & (n - 1)) == 0 and n >= 16:  # first few, then powers of two
            self.log.warning(
                "skipped %s %s (%s%s); %d skipped for this reason so far",
                unit,
                where,
                reason,
                f": {detail}" if detail else "",
                n,
            )


def describe_counts(counts: dict[str, int]) -> str:
    """'2 unreadable_tar, 1 not_an_image': skip counts by reason for one-line messages and reports."""
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))


def image_bytes(sample: dict[str, Any]) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise SkipSample("no_image")  # also a sample made only of members mmcl never reads (.pkl, .pyd, .pth)


def probe_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image lazily (header only), refusing it when the header declares more than `max_pixels`.

    Raises:
        SkipSample: 'not_an_image', 'too_many_pixels' or 'corrupt_image'.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels is checked below
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # PIL's own guard fired first (over twice its MAX_IMAGE_PIXELS)
        raise SkipSample("too_many_pixels", str(e).split(" pixels")[0]) from None
    except Exception as e:  # PIL raises several types for non-images (HTML saved as .jpg, empty files)
        raise SkipSample("not_an_image", type(e).__name__) from None
    width, height = img.size
    if width * height > max_pixels:
        raise SkipSample("too_many_pixels", f"{width}x{height} pixels, more than the {max_pixels:,} pixel limit")
    if width < 1 or height < 1:
        raise SkipSample("corrupt_image", "zero size")
    return img


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS, target_size: int = 0) -> Image.Image:
    """Decode to RGB, upright (EXIF orientation applied), refusing images whose header declares more than `max_pixels`.

    `target_size` lets JPEG decode at a reduced scale (DCT scaling via `draft`),
    which is far cheaper than decoding full size and resizing afterwards.
    """
    img = probe_image(data, max_pixels)
    width, height = img.size
    if target_size and img.format == "JPEG" and min(width, height) >= 2 * target_size:
        img.draft("RGB", (target_size, target_size))
    try:
        ImageOps.exif_transpose(img, in_place=True)  # loads (truncated data fails here); in place: no copy
        return img if img.mode == "RGB" else img.convert("RGB")  # convert() copies even an RGB image
    except Image.DecompressionBombError as e:  # a size that grows while decoding (e.g. an animated frame)
        raise SkipSample("too_many_pixels", str(e).split(" pixels")[0]) from None
    except Exception as e:
        raise SkipSample("corrupt_image", f"{type(e).__name__}: {e}") from None


def decode_json(sample: dict[str, Any]) -> dict[str, Any]:
    raw = sample.get("json")
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise SkipSample("bad_json", str(e)) from None
    return meta if isinstance(meta, dict) else {}


def decode_counterfactual(
    sample: dict[str, Any], max_pixels: int = MAX_PIXELS, target_size: int = 0
) -> tuple[Image.Image, str] | None:
    """The sample's counterfactual (`KEY.cf.<image ext>` + `KEY.cf.txt`, see README "Counterfactual images"):
    (RGB image, first non-blank caption line), or None when the sample has none.

    Raises:
        SkipSample: 'bad_counterfactual' when a part is there but unusable (an image without a caption or
            the other way round, a corrupt or oversized image, an undecodable or blank caption). The caller
            keeps the sample without its counterfactual and counts the reason.
    """
    data = next((sample[f"cf.{ext}"] for ext in IMAGE_EXTS if f"cf.{ext}" in sample), None)
    text = sample.get("cf.txt")
    if data is None and text is None:
        return None
    if data is None or text is None:
        raise SkipSample("bad_counterfactual", "a counterfactual caption without its image" if data is None else
                         "a counterfactual image without its caption")  # fmt: skip
    try:
        caption = next((line.strip() for line in text.decode("utf-8").splitlines() if line.strip()), "")
    except UnicodeDecodeError:
        raise SkipSample("bad_counterfactual", "cf.txt is not UTF-8") from None
    if not caption:
        raise SkipSample("bad_counterfactual", "empty cf.txt")
    try:
        return decode_image(data, max_pixels, target_size), caption
    except SkipSample as e:
        raise SkipSample("bad_counterfactual", f"cf image: {e.reason}") from None


CLASS_PROMPTS = "class_prompts:"  # caption_key prefix: the sample's class name in templates (FLYP, mmcl.finetune)


@functools.lru_cache(maxsize=4)
def class_prompts(path: str) -> tuple[str, tuple[tuple[str, ...], ...]]:
    """(label_key, the prompts of each class) of a class-prompts file (`mmcl.finetune.write_class_prompts`),
    read once per process."""
    try:
        table = json.loads(Path(path).read_text())
        return str(table["label_key"]), tuple(tuple(str(p) for p in row) for row in table["prompts"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a readable class-prompts file ({type(e).__name__})") from None


def caption_options(sample: dict[str, Any], meta: dict[str, Any], key: str, errors: str = "strict") -> list[str]:
    """Every caption of a sample, stripped: the non-blank lines of `.txt` (key 'txt') or a json string/list field;
    with key `class_prompts:FILE`, the prompts of the sample's class (made when read: nothing is copied).

    Args:
        errors: how undecodable `.txt` bytes are handled: "strict" skips the sample, "replace" keeps the
            caption with U+FFFD in place of the bad bytes (the eval readers, which must not drop samples).

    Raises:
        SkipSample: 'missing_caption', 'bad_caption_encoding' or 'empty_caption'.
    """
    if key.startswith(CLASS_PROMPTS):
        label_key, prompts = class_prompts(key[len(CLASS_PROMPTS) :])
        label = decode_label(sample, meta, label_key)
        if label is None or not 0 <= label < len(prompts):
            raise SkipSample("missing_label", f"no class index in [0, {len(prompts)}) for its class-name caption")
        return list(prompts[label])
    if key == "txt":
        if "txt" not in sample:
            raise SkipSample("missing_caption")
        try:
            options = sample["txt"].decode("utf-8", errors).splitlines()
        except UnicodeDecodeError:
            raise SkipSample("bad_caption_encoding") from None
    else:
        value = meta.get(key)
        if value is None:
            raise SkipSample("missing_caption")
        options = [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)]
    options = [v.strip() for v in options if v.strip()]
    if not options:
        raise SkipSample("empty_caption")
    return options


def decode_caption(sample: dict[str, Any], meta: dict[str, Any], key: str, rng: random.Random) -> str:
    """The caption from `.txt` (key 'txt') or a json field; a list or multi-line text: pick one at random."""
    options = caption_options(sample, meta, key)
    return options[0] if len(options) == 1 else rng.choice(options)


def decode_label(sample: dict[str, Any], meta: dict[str, Any], key: str) -> int | None:
    """A class index from `.cls` or the json field `key`; None when the sample has none."""
    if "cls" in sample:
        text = sample["cls"].decode("utf-8", "replace").strip()
        try:
            return int(text)
        except ValueError:
            raise SkipSample("bad_label", f".cls holds {text!r}, not an integer class index") from None
    value = meta.get(key)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


_REFUSALS = {
    "not_an_image": "not a readable image file",
    "too_many_pixels": "refused, the image is too large to decode safely",
    "corrupt_image": "corrupt image data",
}


def load_image(source: str | Path | bytes, name: str = "", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """`decode_image` for one file or upload (the index builder, the app): a one-line `UserError` naming it.

    Args:
        source: a file path or the encoded bytes.
        name: how to call the image in error messages (defaults to the path).
        max_pixels: width x height limit read from the header (decompression-bomb guard).
    """
    return _named(decode_image, source, name, max_pixels)


def check_image(source: str | Path | bytes, name: str = "", max_pixels: int = MAX_PIXELS) -> None:
    """`probe_image` (header only, nothing decoded) for one file or upload; a one-line `UserError` naming it."""
    _named(probe_image, source, name, max_pixels).close()


def _named(fn: Any, source: str | Path | bytes, name: str, max_pixels: int) -> Image.Image:
    name = name or (str(source) if not isinstance(source, bytes) else "image")
    try:
        return fn(source if isinstance(source, bytes) else Path(source).read_bytes(), max_pixels)
    except OSError as e:
        raise UserError(f"{name}: cannot read the file ({e.strerror or e})") from None
    except SkipSample as e:
        raise UserError(f"{name}: {_REFUSALS.get(e.reason, e.reason)} ({e.detail})") from None
