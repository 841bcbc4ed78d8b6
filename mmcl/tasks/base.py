"""Task = model + loss. The training loop sees only this interface."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mmcl.data.batch import Batch

Backward = Callable[[torch.Tensor, bool], None]  # (loss, is_last_micro_batch)


class Task(nn.Module):
    """Joins a model and its loss(es); `forward(batch)` returns {'loss': tensor, other scalars}.

    The loop prepares the Task with Accelerate (so DDP wraps it) and calls
    `task.forward_backward(prepared, micro_batches, backward)` once per
    optimizer step. `prepared(batch, last=True, **kwargs)` runs the wrapped
    module: every forward pass goes through it so DDP sees it, and a grad-enabled
    forward whose backward is not the step's last should pass `last=False`
    (DDP then skips the gradient all-reduce for it). The default sums the
    micro-batch losses / k; contrastive tasks override it to keep every negative
    (feature caching).
    """

    model: nn.Module

    def forward(self, batch: Batch, **kwargs) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward_backward(
        self, prepared: Callable[..., dict[str, torch.Tensor]], micro_batches: list[Batch], backward: Backward
    ) -> dict[str, float]:
        k = len(micro_batches)
        totals: dict[str, float] = {}
        for i, mb in enumerate(micro_batches):
            out = prepared(mb, last=i == k - 1)
            backward(out["loss"] / k, i == k - 1)
            for name, value in out.items():
                totals[name] = totals.get(name, 0.0) + float(value.detach()) / k
        return totals

    @torch.no_grad()
    def evaluate(self, batches) -> dict[str, float]:
        """Validation metrics over an iterable of batches (mean of per-batch outputs)."""
        totals: dict[str, float] = {}
        n = 0
        for batch in batches:
            out = self(batch)
            for name, value in out.items():
                totals[name] = totals.get(name, 0.0) + float(value)
            n += 1
        return {f"val_{k}": v / max(n, 1) for k, v in totals.items()}
