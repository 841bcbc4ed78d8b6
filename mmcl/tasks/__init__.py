"""Tasks (model + loss), looked up by `ModelConfig.arch` in the TASKS registry (the imports register them)."""

from __future__ import annotations

from torch import nn

from mmcl.config import ExperimentConfig
from mmcl.registry import TASKS
from mmcl.tasks import (
    contrastive,  # noqa: F401  (registers "clip")
    joint,  # noqa: F401  (registers "joint")
    prefix_lm,  # noqa: F401  (registers "prefix_lm")
)
from mmcl.tasks.base import Task


def build_task(model: nn.Module, cfg: ExperimentConfig) -> Task:
    """The task registered for `cfg.model.arch`, joining `model` with the losses of `cfg.loss`."""
    return TASKS.get(cfg.model.arch)(model, cfg.loss)


__all__ = ["Task", "build_task"]
