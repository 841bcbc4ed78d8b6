"""Alignment and uniformity of embeddings (Wang & Isola 2020, "Understanding Contrastive Representation
Learning through Alignment and Uniformity on the Hypersphere"; the measure SimCSE reports).

With L2-normalised embeddings f and positive pairs (x, y) (an image and its caption):

    alignment  = E_(x,y)~pos ||f(x) - f(y)||^alpha                  (alpha = 2; lower = positives closer)
    uniformity = log E_(x,y)~iid exp(-t ||f(x) - f(y)||^2)           (t = 2; lower = spread more evenly)

Uniformity is measured within each modality (image, text) over distinct pairs. For N > `max_pairs_n`
samples, a seeded random subset of that many is used (the mean over all N^2 pairs is O(N^2)).
Shapes: images (N, D), texts (M, D), text_to_image (M,) index of each caption's image.
"""

from __future__ import annotations

import math

import torch


def alignment(a: torch.Tensor, b: torch.Tensor, alpha: float = 2.0) -> float:
    """E ||a_i - b_i||^alpha over rows of two (N, D) tensors of matching pairs (normalised here)."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return (a - b).norm(dim=1).pow(alpha).mean().item()


def uniformity(x: torch.Tensor, t: float = 2.0, max_n: int = 4096, seed: int = 0) -> float:
    """log E exp(-t ||x_i - x_j||^2) over distinct pairs i < j of the (N, D) rows (normalised here)."""
    x = torch.nn.functional.normalize(x.float(), dim=-1)
    if len(x) > max_n:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:max_n]]
    if len(x) < 2:
        return float("nan")
    sq = torch.pdist(x, p=2).pow(2)  # (N (N - 1) / 2,) distinct pairs
    # log-mean-exp, stable
    return (torch.logsumexp(-t * sq, dim=0) - math.log(len(sq))).item()


def alignment_uniformity(
    image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor
) -> dict[str, float]:
    """`align` (image-caption pairs), `uniform_image`, `uniform_text` for a captioned set."""
    return {
        "align": alignment(image_features[text_to_image.long()], text_features),
        "uniform_image": uniformity(image_features),
        "uniform_text": uniformity(text_features),
    }
