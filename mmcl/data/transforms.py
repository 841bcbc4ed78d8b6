"""Image transforms from the model's preprocessing config (`preprocess_cfg()`: size, resize mode, mean, std, ...).

A model's preprocessing follows its source: CLIP's image processor resizes the shorter side and centre-crops
(`resize_mode: shortest`), SigLIP's resizes the whole image to a square without cropping (`squash`, as
transformers' `SiglipImageProcessor` and open_clip's `resize_mode='squash'`); `resolve_preprocess` merges the
tower's defaults with what its source recorded (`model.image.preprocess`).

Geometry runs in torch on uint8 (its antialiased bicubic resize matches PIL's to +-3 levels and costs a third
of it: `bench/profile_loader.py`); normalising is a separate step, so the loader can normalise a whole batch
at once (`mmcl.data.pipeline.Collator`). Randomness comes from a per-sample `random.Random` so augmentation is a
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
RESIZE_MODES = ("shortest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
PREPROCESS_KEYS = ("image_size", "mean", "std", "resize_mode", "resize_size", "interpolation")


def resolve_preprocess(image_size: int, mean: Sequence[float], std: Sequence[float], *overrides: dict) -> dict:
    """The full preprocessing dict: defaults (shortest side + centre crop, bicubic) under `overrides` (later wins).

    Keys: image_size (S), mean, std, resize_mode ('shortest' | 'squash'), resize_size (the size resized to before
    the centre crop to S; 0 = S), interpolation ('bicubic' | 'bilinear' | 'nearest').
    """
    from mmcl.utils import UserError

    out: dict = {"image_size": int(image_size), "mean": tuple(mean), "std": tuple(std), "resize_mode": "shortest",
                 "resize_size": 0, "interpolation": "bicubic"}  # fmt: skip
    for extra in overrides:
        for key, value in (extra or {}).items():
            if key not in PREPROCESS_KEYS:
                raise UserError(f"model.image.preprocess.{key}: unknown key (known: {', '.join(PREPROCESS_KEYS)})")
            out[key] = value
    if out["resize_mode"] not in RESIZE_MODES:
        raise UserError(f"resize_mode '{out['resize_mode']}' is not supported ({', '.join(RESIZE_MODES)})")
    if out["interpolation"] not in INTERPOLATIONS:
        raise UserError(f"interpolation '{out['interpolation']}' is not supported ({', '.join(INTERPOLATIONS)})")
    out["mean"], out["std"] = tuple(float(v) for v in out["mean"]), tuple(float(v) for v in out["std"])
    out["resize_size"] = int(out["resize_size"] or 0)
    return out


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
    the digits and on captions about position, bench/results/isolation.md); with `resize_mode='squash'` the
    crop's aspect ratio is drawn around the image's own, so a full-area crop is the whole (squashed) image the
    model was trained on. Evaluation: `shortest` resizes the shorter side and centre-crops, as CLIP does
    (torchvision's `Resize` + `CenterCrop` arithmetic); `squash` resizes the whole image to (S, S), as SigLIP.
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
        train: bool = False,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        resize_mode: str = "shortest",
        resize_size: int = 0,
        interpolation: str = "bicubic",
    ) -> None:
        self.size, self.train, self.scale, self.ratio = image_size, train, scale, ratio
        self.resize_mode, self.interpolation = resize_mode, interpolation
        self.resize_size = resize_size or image_size  # resized to this, then centre-cropped to image_size
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
        ratio = self.ratio
        if self.resize_mode == "squash":  # around the image's own aspect: scale 1 = the whole image
            ratio = (ratio[0] * width / height, ratio[1] * width / height)
        return random_resized_crop_box(width, height, self.scale, ratio, rng or random.Random())

    def geometry(
        self, x: torch.Tensor, box: tuple[int, int, int, int] | None, resize: Callable[..., torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Crop `box` of a uint8 (3, H, W) image and resize it to (S, S); no box: resize the shorter side to S and
        centre-crop (`squash`: resize the whole image). `resize(x, (h, w))` defaults to torch's uint8 resize in
        the transform's interpolation (CPU; the device decoder passes torchvision's, which also runs on CUDA)."""
        if resize is None:
            mode = self.interpolation

            def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
                return _resize(x, size, mode)

        s, r = self.size, self.resize_size
        if box is not None:
            top, left, h, w = box
            return resize(x[:, top : top + h, left : left + w], (s, s))
        height, width = x.shape[1:]
        if self.resize_mode == "squash":
            height, width = r, r
            x = resize(x, (r, r))
        elif min(height, width) != r:  # shorter side to r, the longer one truncated as torchvision's Resize does
            height, width = (int(r * height / width), r) if width <= height else (r, int(r * width / height))
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


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Antialiased resize of a uint8 (3, H, W) tensor (PIL's filters; rounds and saturates to uint8)."""
    if tuple(x.shape[1:]) == size:
        return x
    if mode == "nearest":
        return F.interpolate(x[None], size=size, mode="nearest-exact")[0]
    return F.interpolate(x[None], size=size, mode=mode, antialias=True)[0]


def image_transform(
    image_size: int,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
    train: bool = False,
    scale: tuple[float, float] = (0.9, 1.0),
    resize_mode: str = "shortest",
    resize_size: int = 0,
    interpolation: str = "bicubic",
) -> ImageTransform:
    return ImageTransform(image_size, mean, std, train=train, scale=scale, resize_mode=resize_mode,
                          resize_size=resize_size, interpolation=interpolation)  # fmt: skip


def transform_from_preprocess(
    pre: dict, train: bool = False, scale: tuple[float, float] = (0.9, 1.0)
) -> ImageTransform:
    """The transform of a `preprocess_cfg()` dict (see `resolve_preprocess`; missing keys take the defaults)."""
    return image_transform(pre["image_size"], pre["mean"], pre["std"], train=train, scale=scale,
                           resize_mode=pre.get("resize_mode", "shortest"), resize_size=pre.get("resize_size", 0),
                           interpolation=pre.get("interpolation", "bicubic"))  # fmt: skip


def transform_from_model(model, train: bool, augment: bool = True) -> Callable[[Image.Image], torch.Tensor]:
    """The transform for `model`, read from its `preprocess_cfg()` (size, resize mode, mean, std, interpolation)."""
    return transform_from_preprocess(model.preprocess_cfg(), train=train and augment)
