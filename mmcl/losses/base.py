"""`LossTerm`: the plug-in point for training objectives.

A term is one file: a class registered with `@LOSSES.register("name")` and its options dataclass
(`Options = ...`), in `mmcl/losses/` or in any module a config lists in `loss.plugins` (or an installed
distribution advertises under the entry-point group `mmcl.losses`); `mmcl.registry` finds it, and the
config names it (`loss.terms: [{name: NAME, weight: w, ...its Options}]`). The task
(`mmcl/tasks/task.py`) joins a model and its terms; its step (`Task.step`, the one accumulator)
and the checkpoint read what a term declares:

    inputs          batch entries the model's forward takes for this term
                    ('images', 'text', 'text_mask', or this term's views by name)
    views(model)    named inputs the loader workers must build per sample
                    (`mmcl.data.views`: a second augmented image, caption splits, ...)
    features(...)   features beyond the model's forward (a second view through a
                    tower, a projection head); anything with parameters goes here
    batch_features  feature rows whose loss sees the whole batch (in-batch negatives):
                    gradient accumulation caches exactly these, so every negative is kept.
                    Empty = a per-sample loss: micro-batches weighed by `count(batch)`.
    step_features   more features `on_step_end` needs (a per-sample term's step statistic, e.g. a
                    centre): with `batch_features`, the step's rows of every micro-batch, whatever the
                    term's accumulation mode
    forward(feats)  the UNWEIGHTED value {'loss': (), other scalars}; the task applies the weight
    state           parameters and persistent buffers of the term (heads, queues, momentum
                    encoders, counters) are part of the task: optimized, checkpointed, restored
    on_step_end     runs after each optimizer step (EMA updates, queue pushes); `ctx.features`
                    holds the term's step features, `ctx.gather` concatenates a tensor across
                    processes in rank order
    test_setup      how the registry-driven tests build the term at toy size (see `LossTerm`)

Names are the term's own: its views (`batch.views[...]`) and the features it returns live under its
name (the task stores them as `term/name`), so two terms never collide and no name needs a hand
prefix. A term reads its own features and views and the model's outputs ('image_features',
'logit_scale', ...) by plain name; a name it does not have is a one-line error naming the term.

Rule for accumulation: `forward` combines features only. A 0-dim feature (temperature,
bias) is shared by the whole batch; the accumulator lets its gradient through once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
    features: Mapping[str, torch.Tensor] = field(default_factory=dict)  # the term's step features, detached


class LossTerm(nn.Module):
    """Base class of loss terms; see the module docstring for what a term declares.

    Args:
        model: the model the term trains (read its capabilities, build heads to its sizes).
        options: an instance of the term's `Options` dataclass.
    """

    Options: ClassVar[type] = NoOptions
    inputs: ClassVar[tuple[str, ...]] = ()
    batch_features: ClassVar[tuple[str, ...]] = ()
    step_features: ClassVar[tuple[str, ...]] = ()
    # toy-size setup for the tests that run over the registry: 'preset' (model, default clip-tiny), 'options'
    # (this term's, at toy size), 'with' (terms trained beside it, e.g. ['clip']), 'overrides' (config lines)
    test_setup: ClassVar[dict[str, Any]] = {}

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
