"""Models, looked up by `ModelConfig.arch` in the MODELS registry (the imports below register them)."""

from __future__ import annotations

from torch import nn

from mmcl.config import ModelConfig
from mmcl.models import (
    clip,  # noqa: F401  (registers "clip")
    joint,  # noqa: F401  (registers "joint")
    prefix_lm,  # noqa: F401  (registers "prefix_lm")
)
from mmcl.registry import MODELS


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model registered for `cfg.arch`, built from `cfg`."""
    return MODELS.get(cfg.arch)(cfg)


__all__ = ["build_model"]
