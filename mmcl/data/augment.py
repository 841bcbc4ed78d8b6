"""Strong image augmentation for self-supervised views (SimCLR, Chen et al. 2020; SLIP, Mu et al. 2021).

SimCLR's recipe, as SLIP uses it for its image-image views: random resized crop (scale 0.08-1),
colour jitter (brightness, contrast, saturation 0.4, hue 0.1) with probability 0.8, grayscale 0.2,
Gaussian blur (sigma 0.1-2) 0.5, horizontal flip 0.5. Every operation is optional: colour jitter
and flips destroy exactly what captions about colour or position describe, so a caption-trained
model may want them off (`AugmentConfig(jitter_p=0, flip_p=0)`).

PIL on uint8 with a per-sample `random.Random`, like `transforms.ImageTransform`: a view is a pure
function of (seed, epoch, key) and exact resume keeps working.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from PIL import Image

# torch, torchvision and PIL are imported where used: the loss terms' options name `AugmentConfig`, and
# reading a config (`mmcl.registry`) must not import torch


@dataclass
class AugmentConfig:
    """SimCLR's strong augmentation; the defaults are SLIP's."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # relative to a 224 px image; scaled to the image size
    flip_p: float = 0.5


class StrongAugment:
    """PIL image + per-sample RNG -> normalised (3, S, S) tensor with SimCLR's augmentations. Picklable."""

    def __init__(
        self,
        image_size: int,
        cfg: AugmentConfig | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        import torch

        from mmcl.data.transforms import OPENAI_MEAN, OPENAI_STD

        mean, std = mean if mean is not None else OPENAI_MEAN, std if std is not None else OPENAI_STD
        self.size, self.cfg = image_size, cfg or AugmentConfig()
        self.mean = torch.tensor(mean).view(3, 1, 1) * 255
        self.std = torch.tensor(std).view(3, 1, 1) * 255
        # what makes two views identical (`ImageView.spec`): terms asking for equal ones share them
        self.spec = ("strong", image_size, repr(self.cfg), tuple(map(float, mean)), tuple(map(float, std)))

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        import torchvision.transforms.functional as TF
        from PIL import ImageFilter

        from mmcl.data.transforms import BICUBIC, random_resized_crop_box

        c = self.cfg
        top, left, h, w = random_resized_crop_box(*image.size, tuple(c.crop_scale), (3 / 4, 4 / 3), rng)
        image = TF.resized_crop(image, top, left, h, w, [self.size, self.size], BICUBIC)
        if rng.random() < c.jitter_p:
            image = self._jitter(image, rng)
        if rng.random() < c.grayscale_p:
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        if rng.random() < c.blur_p:
            sigma = rng.uniform(*c.blur_sigma) * self.size / 224
            image = image.filter(ImageFilter.GaussianBlur(sigma))
        if rng.random() < c.flip_p:
            image = TF.hflip(image)
        return (TF.pil_to_tensor(image).float() - self.mean) / self.std

    def _jitter(self, image: Image.Image, rng: random.Random) -> Image.Image:
        """torchvision's ColorJitter, in random order, drawn from `rng`."""
        import torchvision.transforms.functional as TF

        b, c, s, h = self.cfg.jitter
        ops = [
            (TF.adjust_brightness, b, 1.0),
            (TF.adjust_contrast, c, 1.0),
            (TF.adjust_saturation, s, 1.0),
            (TF.adjust_hue, h, 0.0),
        ]
        rng.shuffle(ops)
        for fn, strength, centre in ops:
            if strength > 0:
                image = fn(image, rng.uniform(centre - strength, centre + strength))
        return image
