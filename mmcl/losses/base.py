"""`LossTerm`: the plug-in point for training objectives.

A term is one file in `mmcl/losses/` registered in `LOSSES`; the config names it
(`loss.terms: [{name: NAME, weight: w, ...its Options}]`) and nothing else in mmcl
changes. The task (`mmcl/tasks/task.py`) joins a model and its terms; the one
accumulator (`mmcl/engine/accumulate.py`) and the checkpoint read what a term
declares:

    inputs          batch entries the model's forward takes for this term
                    ('images', 'text', 'text_mask', or views by name)
    views(model)    named inputs the loader workers must build per sample
                    (`mmcl.data.views`: a second augmented image, caption splits, ...)
    features(...)   features beyond the model's forward (a second view through a
                    tower, a projection head); anything with parameters goes here
    batch_features  feature rows whose loss sees the whole batch (in-batch negatives):
                    gradient accumulation caches exactly these, so every negative is kept.
                    Empty = a per-sample loss: micro-batches weighed by `count(batch)`.
    forward(feats)  the UNWEIGHTED value {'loss': (), other scalars}; the task applies the weight
    state           parameters and persistent buffers of the term (heads, queues, momentum
                    encoders, counters) are part of the task: optimized, checkpointed, restored
    on_step_end     runs after each optimizer step (EMA updates, queue pushes); `ctx.features`
                    holds the step's batch features (every micro-batch), `ctx.gather`
                    concatenates a tensor across processes in rank order

Rule for accumulation: `forward` combines features only. A 0-dim feature (temperature,
bias) is shared by the whole batch; the accumulator lets its gradient through once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from mmcl.data.batch import Batch


@dataclass
class NoOptions:
    """A term without options."""


@dataclass
class StepContext:
    """What `on_step_end` may use: the step just taken and the process group."""

    step: int
    rank: int = 0
    world_size: int = 1
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda t: t  # (n, ...) per rank -> (P*n, ...) on every rank
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # the step's batch features, detached


class LossTerm(nn.Module):
    """Base class of loss terms; see the module docstring for what a term declares.

    Args:
        model: the model the term trains (read its capabilities, build heads to its sizes).
        options: an instance of the term's `Options` dataclass.
    """

    Options: ClassVar[type] = NoOptions
    inputs: ClassVar[tuple[str, ...]] = ()
    batch_features: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module, options: Any = None) -> None:
        super().__init__()
        self.options = options if options is not None else self.Options()

    def views(self, model: nn.Module) -> dict[str, Any]:
        """Named inputs the loader must build for this term (`mmcl.data.views`)."""
        return {}

    def features(self, model: nn.Module, batch: Batch, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Features beyond the model's forward output `feats` (runs inside the task's forward)."""
        return {}

    def forward(self, feats: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def count(self, batch: Batch) -> float:
        """How many items this term's (mean) loss averages over in `batch`: gradient accumulation weighs
        the micro-batches of a per-sample term by it, so k micro-batches give the full-batch mean."""
        return float(len(batch))

    def on_step_end(self, ctx: StepContext) -> None:
        """After each optimizer step (momentum updates, queues). Default: nothing."""
