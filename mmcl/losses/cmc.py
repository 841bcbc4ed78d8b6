"""CMC: contrastive multiview coding, InfoNCE between every pair of three or more views of a sample.

Tian, Krishnan & Isola 2019, "Contrastive Multiview Coding". Here the views of a sample are its image
(the model's image embedding), its caption (the text embedding) and more strong augmentations of its
image through the image tower, all L2-normalised in the shared embedding space (n, D). With V views:

    full graph:  L = 1/|E| sum_{(a, b) in E} InfoNCE_sym(v_a, v_b; t),   E = every pair a < b
    core view:   L = 1/(V - 1) sum_{b != c} InfoNCE_sym(v_c, v_b; t),     c = the core view (the paper's
                 "core view" graph; with c = text every image view is tied to the caption)

InfoNCE_sym(a, b) = 1/2 [ -1/n sum_i log softmax_j(<a_i, b_j> / t)[i] + (a <-> b) ], the negatives every
other sample of the global batch (`nt_xent.info_nce`, gathered across processes). t is the term's own
temperature (`temperature`, the paper: 0.07) or, with `temperature: 0`, the model's learned logit scale.
With two views (image, text) and the model's scale this is CLIP's loss.

Colour split (`colour_split`, the paper's ImageNet setting): one more strong view of the image, split in CIE
Lab into its lightness L and its colour ab (`lab_split`), adds the views 'L' and 'ab', both through the image
tower. The tower takes 3-channel RGB, so each half is made an RGB image again rather than a 1- or 2-channel
input (which would need a second stem): L is the image with a = b = 0 (a grey image of the same lightness,
i.e. L replicated to 3 channels), ab the image's a, b at a constant mid lightness L = 50 (all its colour, no
lightness; L = 0 would be black and clip every colour away). Shapes: (n, 3, S, S) normalised -> two such.

A batch term (in-batch negatives): gradient accumulation caches every view's rows.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.data.augment import AugmentConfig, StrongAugment
from mmcl.data.batch import Batch
from mmcl.data.views import ImageView
from mmcl.losses.base import LossTerm
from mmcl.losses.nt_xent import info_nce
from mmcl.registry import LOSSES
from mmcl.utils import UserError


@dataclass
class CMCOptions:
    image_views: int = 1  # strong augmentations of the image besides the model's own view (V = 2 + this)
    graph: str = "full"  # full | core
    core: str = "text"  # the core view: image | text | view1, view2, ... | L | ab
    colour_split: bool = False  # add L and ab, the Lab halves of one more strong view of the image
    temperature: float = 0.07  # 0 = the model's logit scale
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@LOSSES.register("cmc")
class CMCTerm(LossTerm):
    """InfoNCE over the pairs of views of the view graph. Returns {'loss', 'acc' (mean over pairs)}."""

    Options = CMCOptions
    inputs = ("images", "text", "text_mask")
    test_setup = {"options": {"image_views": 1, "colour_split": True}}

    def __init__(self, model: nn.Module, options: CMCOptions | None = None) -> None:
        super().__init__(model, options)
        o = self.options
        names = self.view_names()
        if o.graph not in ("full", "core"):
            raise UserError(f"loss.terms cmc: graph must be 'full' or 'core', got {o.graph!r}")
        if o.graph == "core" and o.core not in names:
            raise UserError(f"loss.terms cmc: core must be one of {names}, got {o.core!r}")
        self.pairs = (
            list(itertools.combinations(names, 2)) if o.graph == "full" else [(o.core, b) for b in names if b != o.core]
        )
        self.batch_features = ("image_features", "text_features", *names[2:])  # type: ignore[misc]

    def view_names(self) -> list[str]:
        views = [f"view{i + 1}" for i in range(self.options.image_views)]
        return ["image", "text", *views, *(["L", "ab"] if self.options.colour_split else [])]

    def views(self, model: nn.Module) -> dict[str, Any]:
        pre = model.preprocess_cfg()
        augment = StrongAugment(pre["image_size"], self.options.augment, pre["mean"], pre["std"])
        loaded = [f"view{i + 1}" for i in range(self.options.image_views)]
        return {name: ImageView(augment) for name in [*loaded, *(["colour"] if self.options.colour_split else [])]}

    def features(self, model: nn.Module, batch: Batch, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = self.view_names()[2:]
        if not names:
            return {}
        parts = [batch.views[n] for n in names if n not in ("L", "ab")]
        if self.options.colour_split:
            pre = model.preprocess_cfg()
            parts += lab_split(batch.views["colour"], pre["mean"], pre["std"])
        images = torch.cat(parts)  # one tower pass for every extra view
        return dict(zip(names, F.normalize(model.encode_image(images, normalize=False), dim=-1).chunk(len(names))))

    def forward(self, feats: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        rows = {"image": feats["image_features"], "text": feats["text_features"]}
        rows.update({n: feats[n] for n in self.view_names()[2:]})
        if self.options.temperature > 0:
            t: Any = self.options.temperature
        else:
            t = 1.0 / feats["logit_scale"]
        outs = [info_nce(rows[a], rows[b], t) for a, b in self.pairs]
        return {
            "loss": sum(o["loss"] for o in outs) / len(outs),
            "acc": sum(o["acc"] for o in outs) / len(outs),
        }


# sRGB (D65) <-> CIE XYZ <-> CIE Lab, as in the CIE / IEC 61966-2-1 definitions
_RGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
_WHITE = (0.95047, 1.0, 1.08883)
_DELTA = 6 / 29


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] (..., 3, H, W) -> Lab (..., 3, H, W): L in [0, 100], a and b about [-128, 127]."""
    lin = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055).clamp(min=0) ** 2.4)
    m = torch.tensor(_RGB_TO_XYZ, dtype=rgb.dtype, device=rgb.device)
    white = torch.tensor(_WHITE, dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
    xyz = torch.einsum("ij,...jhw->...ihw", m, lin) / white
    f = torch.where(xyz > _DELTA**3, xyz.clamp(min=1e-12) ** (1 / 3), xyz / (3 * _DELTA**2) + 4 / 29)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-3)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Lab (..., 3, H, W) -> sRGB (..., 3, H, W), clipped to [0, 1] (colours outside the gamut)."""
    L, a, b = lab.unbind(-3)
    fy = (L + 16) / 116
    f = torch.stack([fy + a / 500, fy, fy - b / 200], dim=-3)
    white = torch.tensor(_WHITE, dtype=lab.dtype, device=lab.device).view(3, 1, 1)
    xyz = torch.where(f > _DELTA, f**3, 3 * _DELTA**2 * (f - 4 / 29)) * white
    m = torch.linalg.inv(torch.tensor(_RGB_TO_XYZ, dtype=torch.float64)).to(lab)
    lin = torch.einsum("ij,...jhw->...ihw", m, xyz).clamp(0, 1)
    return torch.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin.clamp(min=1e-12) ** (1 / 2.4) - 0.055).clamp(0, 1)


def lab_split(images: torch.Tensor, mean: Any, std: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """CMC's colour split of normalised images (n, 3, S, S) into their L and ab halves, each an RGB image
    normalised like the input (n, 3, S, S): L with a = b = 0 (grey), ab at lightness 50 (see the module)."""
    shape = (3, 1, 1)
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(shape)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(shape)
    lab = rgb_to_lab((images * s + m).clamp(0, 1))
    zero = torch.zeros_like(lab[:, :1])
    lightness = lab_to_rgb(torch.cat([lab[:, :1], zero, zero], 1))
    colour = lab_to_rgb(torch.cat([torch.full_like(zero, 50.0), lab[:, 1:]], 1))
    return (lightness - m) / s, (colour - m) / s
