"""Image transforms from the image tower's preprocessing config (size, mean, std)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision.transforms import v2 as T

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def image_transform(
    image_size: int,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
    train: bool = False,
    scale: tuple[float, float] = (0.8, 1.0),
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image -> normalised (3, S, S) float tensor.

    Training uses a mild random-resized crop (open_clip uses scale (0.9, 1)):
    small models on small data benefit from a little more augmentation.
    Evaluation resizes the shorter side and centre-crops, as CLIP does.
    """
    if train:
        geometry = [T.RandomResizedCrop(image_size, scale=scale, interpolation=T.InterpolationMode.BICUBIC)]
    else:
        geometry = [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size)]
    return T.Compose(
        [T.PILToTensor(), *geometry, T.ToDtype(torch.float32, scale=True), T.Normalize(mean=list(mean), std=list(std))]
    )


def transform_from_model(model, train: bool, augment: bool = True) -> Callable[[Image.Image], torch.Tensor]:
    """The transform for `model`, read from its `preprocess_cfg()` (image_size, mean, std)."""
    cfg = model.preprocess_cfg()
    return image_transform(cfg["image_size"], cfg["mean"], cfg["std"], train=train and augment)
