"""Plain full-batch reference implementations (explicit loops) the loss classes are tested against."""

from __future__ import annotations

import math

import torch


def clip_loss_reference(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias=None) -> torch.Tensor:
    """Symmetric InfoNCE written out sample by sample."""
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        row = torch.stack([scale * img[i].dot(txt[j]) + (bias if bias is not None else 0.0) for j in range(n)])
        col = torch.stack([scale * txt[i].dot(img[j]) + (bias if bias is not None else 0.0) for j in range(n)])
        total = total - (row[i] - torch.logsumexp(row, 0)) - (col[i] - torch.logsumexp(col, 0))
    return total / (2 * n)


def siglip_loss_reference(
    img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """-1/N sum_ij log sigmoid(z_ij (t x_i.y_j + b)), pair by pair."""
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = scale * img[i].dot(txt[j]) + bias
            total = total - torch.log(torch.sigmoid(z * logit))
    return total / n


def accuracy_reference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of rows i of a whose most similar row of b is i."""
    hits = 0
    for i in range(a.shape[0]):
        sims = [float(a[i].detach().dot(b[j].detach())) for j in range(b.shape[0])]
        hits += int(max(range(len(sims)), key=sims.__getitem__) == i)
    return hits / a.shape[0]


def random_features(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    # texts correlated with their images so accuracies are neither 0 nor 1
    txt = torch.nn.functional.normalize(img + 1.2 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


LOG_SCALE = math.log(10.0)
