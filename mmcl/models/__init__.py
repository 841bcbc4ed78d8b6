"""Models, looked up by `ModelConfig.arch` in the MODELS registry, and their towers, looked up by `kind` in
IMAGE_TOWERS / TEXT_TOWERS: the imports below register them (the registries are filled here, in one place)."""

from __future__ import annotations

from torch import nn

from mmcl.config import ModelConfig
from mmcl.models import (
    clip,  # noqa: F401  (registers "clip"; `towers` registers the "timm" image tower)
    hf_towers,  # noqa: F401  (registers the "hf_clip" towers)
    hybrid_tower,  # noqa: F401  (registers the "hybrid" image tower)
    joint,  # noqa: F401  (registers "joint")
    prefix_lm,  # noqa: F401  (registers "prefix_lm")
    text_towers,  # noqa: F401  (registers the "clip" and "hf" text towers)
)
from mmcl.registry import MODELS


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model registered for `cfg.arch`, built from `cfg`, with the weights of `cfg.init_from` when set
    (`mmcl.models.pretrained`: an mmcl run, open_clip or transformers weights)."""
    model = MODELS.get(cfg.arch)(cfg)
    if cfg.init_from:
        from mmcl.models.pretrained import load_pretrained

        load_pretrained(model, cfg.init_from)
    return model


__all__ = ["build_model"]
