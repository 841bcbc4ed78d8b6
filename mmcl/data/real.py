"""Small sets of real images that ship with installed packages (no download).

- `digits()`: scikit-learn's 1,797 handwritten digits (8x8 greyscale scans, upscaled
  to RGB), labelled 0-9, with varied captions ("a handwritten digit seven").
- `photos()`: about twenty `skimage.data` photographs (astronaut, coffee, a cat,
  a rocket, ...) with a caption written by hand for each.

Both yield `RealSample(key, image, caption, meta)`; `meta` holds `label` and
`classname`. Photos that need a download are left out unless asked for.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

log = logging.getLogger("mmcl")

DIGIT_CLASSNAMES: list[str] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_DIGIT_TEMPLATES = [
    "a handwritten digit {word}",
    "the number {word} written by hand",
    "a scanned handwritten {word}",
    "a low resolution image of the digit {word}",
    "a blurry handwritten {word}",
    "the digit {digit}, {word}, written in ink",
    "a photo of a handwritten {word}",
]

# (skimage.data function, classname, caption): captions written looking at each image.
PHOTOS: list[tuple[str, str, str]] = [
    (
        "astronaut",
        "astronaut",
        "a smiling astronaut in an orange space suit in front of an american flag and a space shuttle",
    ),
    ("chelsea", "cat", "a ginger tabby cat looking to the side"),
    ("coffee", "coffee", "a cup of espresso on a red saucer with a spoon on a wooden table"),
    ("rocket", "rocket", "a rocket on its launch pad at dusk between lightning towers"),
    ("camera", "cameraman", "a black and white photo of a man in a coat filming with a camera on a tripod"),
    ("horse", "horse", "a black silhouette of a horse on a white background"),
    ("brick", "brick wall", "a grey brick wall seen from above"),
    ("coins", "coins", "rows of old greek coins on a dark background"),
    ("colorwheel", "colour wheel", "a colour wheel with every hue around a circle"),
    ("grass", "grass", "a close-up grayscale texture of grass"),
    ("gravel", "gravel", "a close-up grayscale texture of gravel"),
    ("hubble_deep_field", "galaxies", "the hubble deep field: hundreds of distant galaxies on black space"),
    ("immunohistochemistry", "tissue", "a microscope image of stained tissue, brown cells on a blue background"),
    ("logo", "logo", "the scikit-image logo: a snake in a green and orange circle"),
    ("moon", "moon", "a grayscale photo of the cratered surface of the moon"),
    ("page", "page of text", "a scanned page of printed text about region-based segmentation"),
    ("retina", "retina", "a photo of the back of a human eye: the orange retina with red blood vessels"),
    ("text", "handwriting", "handwritten mathematics on lined paper, photographed at an angle"),
    ("clock", "clock", "a motion-blurred photo of a round clock on a grey wall"),
    ("cell", "cell", "a microscope image of a single round cell on a dark background"),
    ("microaneurysms", "blood vessels", "a grayscale close-up of retinal blood vessels"),
    ("stereo_motorcycle", "motorcycle", "a red motorcycle parked in a garage with shelves and boxes"),
    ("checkerboard", "checkerboard", "a black and white checkerboard pattern"),
    ("shepp_logan_phantom", "phantom", "the shepp-logan phantom: grey ellipses like a slice of a head scan"),
    ("eagle", "eagle", "a bald eagle perched on a branch"),
    ("lily", "lily", "a microscope image of lily cells in several colours"),
    ("skin", "skin", "a microscope image of a skin tissue sample"),
]
PHOTO_CLASSNAMES: list[str] = [classname for _, classname, _ in PHOTOS]
NEEDS_DOWNLOAD = {"eagle", "lily", "skin"}  # not in the scikit-image wheel: fetched by pooch


class RealSample(NamedTuple):
    """One real image: `key` names its origin, `meta` holds `label` / `classname` and more."""

    key: str
    image: Image.Image
    caption: str
    meta: dict[str, Any]


def _to_rgb(array: np.ndarray) -> Image.Image:
    """A skimage array (bool, float in [0, 1], uint8; grey, RGB or RGBA) as an RGB image."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype.kind == "f":
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    image = Image.fromarray(array)
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def digits(split: str = "all", image_size: int = 32, seed: int = 0) -> Iterator[RealSample]:
    """scikit-learn's handwritten digits as dark ink on white, upscaled to `image_size` pixels.

    Args:
        split: "all" (1,797 images), "train" (the 4 in 5 whose index % 5 != 0) or "test" (the rest).
        image_size: output side in pixels (bilinear upscaling of the 8x8 scans).
        seed: picks the caption phrasing of each image.
    """
    from sklearn.datasets import load_digits

    if split not in ("all", "train", "test"):
        raise ValueError(f"unknown digits split '{split}' (choose all, train or test)")
    data = load_digits()
    for i, (pixels, target) in enumerate(zip(data.images, data.target)):
        if (split == "train" and i % 5 == 0) or (split == "test" and i % 5 != 0):
            continue
        ink = (255 - pixels * (255 / 16)).round().astype(np.uint8)  # values 0..16 -> white paper, dark ink
        image = Image.fromarray(ink, "L").resize((image_size, image_size), Image.BILINEAR).convert("RGB")
        label = int(target)
        template = random.Random(f"mmcl-digits/{seed}/{i}").choice(_DIGIT_TEMPLATES)
        caption = template.format(word=DIGIT_CLASSNAMES[label], digit=label)
        meta = {"label": label, "classname": DIGIT_CLASSNAMES[label], "index": i}
        yield RealSample(f"sklearn-digits/{i:04d}", image, caption, meta)


def photos(names: list[str] | None = None, include_downloads: bool = False) -> Iterator[RealSample]:
    """The `skimage.data` photographs in `PHOTOS` order (or only `names`), at full size.

    Args:
        names: only these `skimage.data` names.
        include_downloads: also try the photos scikit-image does not ship (`NEEDS_DOWNLOAD`),
            which need `pooch` and the internet. Off by default: offline, pooch retries for a
            while, and under pytest scikit-image skips the calling test instead of raising.

    Images that cannot be loaded are skipped with a log line; labels stay the index into
    `PHOTO_CLASSNAMES` either way.
    """
    import skimage.data

    wanted = set(names) if names is not None else None
    for label, (name, classname, caption) in enumerate(PHOTOS):
        if (wanted is not None and name not in wanted) or (name in NEEDS_DOWNLOAD and not include_downloads):
            continue
        try:
            array = getattr(skimage.data, name)()
        except Exception as e:  # pooch missing, no network, or a removed function: skip that photo
            log.info(
                "skimage.data.%s unavailable, skipped: %s", name, str(e).splitlines()[0] if str(e) else type(e).__name__
            )
            continue
        if isinstance(array, tuple):  # stereo pairs: (left, right, disparity)
            array = array[0]
        meta = {"label": label, "classname": classname, "name": name}
        yield RealSample(f"skimage-data/{name}", _to_rgb(array), caption, meta)
