"""Image transforms from the image tower's preprocessing config (size, mean, std).

Geometry runs in PIL on uint8 (cheapest for small images); randomness comes from
a per-sample `random.Random` so augmentation is a pure function of the sample
(exact resume) and never touches torch's global RNG (re-seeding it costs ~2 ms a call).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import torch
import torchvision.transforms.functional as TF
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
    """PIL RGB image (+ per-sample RNG) -> normalised (3, S, S) float tensor.

    Training: a mild random-resized crop (open_clip uses scale (0.9, 1); small models on small data gain
    from a little more). Evaluation: resize the shorter side and centre-crop, as CLIP does.
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
        train: bool = False,
        scale: tuple[float, float] = (0.8, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        self.size, self.train, self.scale, self.ratio = image_size, train, scale, ratio
        self.mean = torch.tensor(mean).view(3, 1, 1) * 255
        self.std = torch.tensor(std).view(3, 1, 1) * 255

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        if self.train:
            top, left, h, w = random_resized_crop_box(*image.size, self.scale, self.ratio, rng or random.Random())
            image = TF.resized_crop(image, top, left, h, w, [self.size, self.size], BICUBIC)
        else:
            if min(image.size) != self.size:
                image = TF.resize(image, self.size, BICUBIC)
            if image.size != (self.size, self.size):
                image = TF.center_crop(image, [self.size, self.size])
        return (TF.pil_to_tensor(image).float() - self.mean) / self.std


def image_transform(
    image_size: int,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
    train: bool = False,
    scale: tuple[float, float] = (0.8, 1.0),
) -> ImageTransform:
    return ImageTransform(image_size, mean, std, train=train, scale=scale)


def transform_from_model(model, train: bool, augment: bool = True) -> Callable[[Image.Image], torch.Tensor]:
    """The transform for `model`, read from its `preprocess_cfg()` (image_size, mean, std)."""
    cfg = model.preprocess_cfg()
    return image_transform(cfg["image_size"], cfg["mean"], cfg["std"], train=train and augment)
