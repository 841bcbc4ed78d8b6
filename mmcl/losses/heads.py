"""Projection and prediction heads of the self-supervised terms (SimCLR / SLIP, SimSiam, BYOL)."""

from __future__ import annotations

from torch import nn


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int = 2) -> nn.Sequential:
    """`layers` linear layers, GELU between them: in_dim -> hidden -> ... -> out_dim.

    The papers put BatchNorm between layers (SimCLR, SimSiam, BYOL); LayerNorm is used here instead so
    each sample's projection does not depend on the rest of its micro-batch, which keeps gradient
    accumulation exact (BatchNorm statistics of a micro-batch differ from the full batch's).
    """
    if layers < 1:
        raise ValueError(f"an MLP head needs at least one layer, got {layers}")
    dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
    parts: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        parts.append(nn.Linear(a, b))
        if i < layers - 1:
            parts += [nn.LayerNorm(b), nn.GELU()]
    return nn.Sequential(*parts)


def image_features(model: nn.Module, images) -> object:
    """A dual encoder's unnormalised image embedding (B, D): what the image-image terms project."""
    return model.encode_image(images, normalize=False)
