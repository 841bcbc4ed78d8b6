"""CPC on image patches: from the rows of patches above, predict the patch codes k rows below.

Hénaff et al. 2019, "Data-Efficient Image Recognition with Contrastive Predictive Coding" (CPC v2), after
van den Oord, Li & Vinyals 2018 (CPC; `cpc` is its caption-token side). The image is cut into a G x G grid
of overlapping square crops (side c = 2S/(G+1), stride c/2: the papers' 50% overlap, 7 x 7 crops of 64 px at
S = 256), each crop encoded alone by the image tower (so a code sees its own crop only), projected to a
code z. A small context network, a stack of convolutions masked to look up (PixelCNN-style: the output at row
i sees rows <= i only), turns the codes into contexts c; for each k in 1..K a linear map W_k predicts the code
k rows below, scored against every position of the same image (the negatives):

    z = P f(crops)                 (B, G, G, D)   f the image tower, P linear
    c = z + context(z)             (B, G, G, D)   c_{i,j} sees z_{i',j'} for i' <= i only
    s_k((i, j), u) = <W_k c_{i,j}, z_u>          u over the G^2 positions of the image
    L = 1/|T| sum_{(b, k, i, j) in T} -log softmax_u s_k((i, j), u)[(i + k, j)],  T: i + k < G

(InfoNCE; CPC v2 also draws negatives from other images, here each image's own positions are its negatives,
so the loss is per sample and accumulation weighs micro-batches by their number of predictions, `count`.)
Every crop is one tower pass: B G^2 crops a batch. A ViT takes the crops at their own size (its position
embedding resampled, `mmcl.data.multicrop.enable_dynamic_size`), resized up to a multiple of its patch where c is
not one (or to `crop_size` when set); a CNN takes any size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.data.batch import Batch
from mmcl.data.multicrop import enable_dynamic_size
from mmcl.losses.base import LossTerm
from mmcl.registry import LOSSES
from mmcl.utils import UserError


@dataclass
class CPCImageOptions:
    grid: int = 4  # G: G x G overlapping crops (the paper: 7)
    steps: int = 2  # K: predict 1..K rows below (K < G)
    dim: int = 64  # D, the codes' width
    context_layers: int = 2  # masked convolutions of the context network (each looks 2 rows up)
    crop_size: int = 0  # the crops are resized to this many pixels before the tower (0: their own size)


def grid_crops(images: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, 3, S, S) -> (B, G, G, 3, c, c): the G x G crops of side c = 2S/(G+1) at stride c/2, row-major."""
    size = images.shape[-1]
    side = 2 * size // (grid + 1)
    stride = (size - side) // (grid - 1)
    crops = images.unfold(2, side, stride).unfold(3, side, stride)  # (B, 3, G, G, c, c)
    return crops[:, :, :grid, :grid].permute(0, 2, 3, 1, 4, 5)


def _round_to_patch(tower: nn.Module, side: int) -> int:
    """`side` rounded up to a multiple of a ViT tower's patch size (a crop resized to it); a CNN's as it is."""
    patch = getattr(getattr(getattr(tower, "trunk", None), "patch_embed", None), "patch_size", None)
    patch = patch[0] if isinstance(patch, tuple) else patch
    return -(-side // patch) * patch if isinstance(patch, int) and patch > 0 else side


class MaskedRowConv(nn.Module):
    """A 3 x 3 convolution that sees the rows above and its own row, never below: (B, D, G, G) -> same.

    The input is padded by 2 rows on top and none below, so the output row i reads input rows i-2..i."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (1, 1, 2, 0)))


@LOSSES.register("cpc_image")
class CPCImageTerm(LossTerm):
    """InfoNCE of the code k rows below among the image's patch positions. Returns {'loss', 'acc'}."""

    Options = CPCImageOptions
    test_setup = {"with": ["clip"], "options": {"grid": 3, "steps": 1, "dim": 16, "context_layers": 1}}

    def __init__(self, model: nn.Module, options: CPCImageOptions | None = None) -> None:
        super().__init__(model, options)
        o = self.options
        if o.grid < 2 or not 1 <= o.steps < o.grid:
            raise UserError(f"loss.terms cpc_image: needs grid >= 2 and 1 <= steps < grid, got {o.grid}, {o.steps}")
        size = model.preprocess_cfg()["image_size"]
        self.side = o.crop_size or _round_to_patch(model.image, 2 * size // (o.grid + 1))
        if self.side != size:  # a ViT takes the crops at their size (a CNN any size)
            enable_dynamic_size(model.image, self.side)
        self.code = nn.Linear(model.cfg.embed_dim, o.dim)
        layers: list[nn.Module] = []
        for i in range(o.context_layers):
            layers += [MaskedRowConv(o.dim)] + ([nn.GELU()] if i < o.context_layers - 1 else [])
        self.context = nn.Sequential(*layers)
        self.predict = nn.Linear(o.dim, o.dim * o.steps)  # W_1..W_K side by side

    def features(self, model: nn.Module, batch: Batch, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if batch.images is None:
            raise UserError(f"the cpc_image loss term needs images (batch {batch.keys[:2]}... has none)")
        o, b = self.options, batch.images.shape[0]
        crops = grid_crops(batch.images, o.grid).flatten(0, 2)  # (B G G, 3, c, c)
        if crops.shape[-1] != self.side:
            crops = F.interpolate(crops, size=(self.side, self.side), mode="bilinear", align_corners=False)
        z = self.code(model.encode_image(crops, normalize=False)).view(b, o.grid, o.grid, o.dim)  # (B, G, G, D)
        c = z + self.context(z.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, G, G, D), rows above only
        pred = self.predict(c).unflatten(-1, (o.steps, o.dim)).flatten(1, 2)  # (B, G G, K, D)
        return {"scores": torch.einsum("btkd,bud->bktu", pred, z.flatten(1, 2))}  # (B, K, G G, G G)

    def count(self, batch: Batch) -> float:
        g = self.options.grid
        return float(len(batch) * g * sum(g - k for k in range(1, self.options.steps + 1)))

    def forward(self, feats: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        scores, g = feats["scores"], self.options.grid
        losses, hits, total = [], [], 0
        for k in range(1, self.options.steps + 1):
            n = (g - k) * g  # positions (i, j) with i + k < G: the first (G - k) rows, row-major
            logits = scores[:, k - 1, :n].flatten(0, 1)  # (B n, G G)
            target = (torch.arange(n, device=scores.device) + k * g).repeat(scores.shape[0])  # (i + k, j)
            losses.append(F.cross_entropy(logits, target, reduction="sum"))
            hits.append((logits.argmax(-1) == target).sum())
            total += logits.shape[0]
        return {"loss": sum(losses) / total, "acc": (sum(hits) / total).float().detach()}
