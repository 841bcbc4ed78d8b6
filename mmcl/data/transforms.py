"""Image transforms from the image tower's preprocessing config (size, mean, std).

Geometry runs in torch on uint8 (its antialiased bicubic resize matches PIL's to +-3 levels and costs a third
of it: `bench/profile_loader.py`); normalising is a separate step, so the loader can normalise a whole batch
at once (`mmcl.data.shards.Collator`). Randomness comes from a per-sample `random.Random` so augmentation is a
pure function of the sample (exact resume) and never touches torch's global RNG (re-seeding it costs ~2 ms a call).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = InterpolationMode.BICUBIC


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """(top, left, h, w) as torchvision's RandomResizedCrop draws it, from a Python RNG."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    side = min(width, height)  # fall back to a centre crop
    return (height - side) // 2, (width - side) // 2, side, side


class ImageTransform:
    """PIL image (+ per-sample RNG) -> normalised (3, S, S) float tensor; `pixels` + `normalize` are its two halves.

    Training: a mild random-resized crop (area 0.9-1 as open_clip; `data.crop_scale`: 0.8-1 did worse on
    the digits and on captions about position, bench/results/isolation.md). Evaluation: resize the shorter
    side and centre-crop, as CLIP does (torchvision's `Resize` + `CenterCrop` arithmetic).
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
        train: bool = False,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        self.size, self.train, self.scale, self.ratio = image_size, train, scale, ratio
        self.mean = torch.tensor(mean).view(3, 1, 1) * 255
        self.inv_std = 1 / (torch.tensor(std).view(3, 1, 1) * 255)

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        return self.normalize(self.pixels(image, rng))

    def pixels(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """The cropped and resized image as a uint8 (3, S, S) tensor (a view: may not be contiguous)."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        # (H, W, 3) memory seen as (3, H, W): channels-last, the layout of torch's vectorised uint8 resize
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        return self.geometry(x, self.crop_box(*image.size, rng))

    def crop_box(self, width: int, height: int, rng: random.Random | None = None) -> tuple[int, int, int, int] | None:
        """Training: the random-resized crop (top, left, h, w) drawn from `rng`; evaluation: None (centre crop)."""
        if not self.train:
            return None
        return random_resized_crop_box(width, height, self.scale, self.ratio, rng or random.Random())

    def geometry(
        self, x: torch.Tensor, box: tuple[int, int, int, int] | None, resize: Callable[..., torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Crop `box` of a uint8 (3, H, W) image and resize it to (S, S); no box: resize the shorter side to S and
        centre-crop. `resize(x, (h, w))` defaults to torch's uint8 resize (CPU; the device decoder passes
        torchvision's, which also runs on CUDA)."""
        resize = resize or _resize
        s = self.size
        if box is not None:
            top, left, h, w = box
            return resize(x[:, top : top + h, left : left + w], (s, s))
        height, width = x.shape[1:]
        if min(height, width) != s:  # shorter side to s, the longer one truncated as torchvision's Resize does
            height, width = (int(s * height / width), s) if width <= height else (s, int(s * width / height))
            x = resize(x, (height, width))
        top, left = int(round((height - s) / 2.0)), int(round((width - s) / 2.0))
        return x[:, top : top + s, left : left + s]

    def normalize(self, pixels: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 (..., 3, S, S) -> float32 (x - mean) / std, into `out` when given (same shape; may be `pixels`
        itself, already converted to float)."""
        out = torch.empty(pixels.shape, dtype=torch.float32) if out is None else out
        if out is not pixels:  # the Collator copies the samples into the batch itself
            out.copy_(pixels)
        return out.sub_(self.mean).mul_(self.inv_std)  # in place: one buffer, three passes


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bicubic resize of a uint8 (3, H, W) tensor (PIL's filter; rounds and saturates to uint8)."""
    if tuple(x.shape[1:]) == size:
        return x
    return F.interpolate(x[None], size=size, mode="bicubic", antialias=True)[0]


def image_transform(
    image_size: int,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
    train: bool = False,
    scale: tuple[float, float] = (0.9, 1.0),
) -> ImageTransform:
    return ImageTransform(image_size, mean, std, train=train, scale=scale)


def transform_from_model(model, train: bool, augment: bool = True) -> Callable[[Image.Image], torch.Tensor]:
    """The transform for `model`, read from its `preprocess_cfg()` (image_size, mean, std)."""
    cfg = model.preprocess_cfg()
    return image_transform(cfg["image_size"], cfg["mean"], cfg["std"], train=train and augment)
