"""A FIFO queue of past features (MoCo's key queue, NNCLR's support set): buffers, so it is
checkpointed with the task and resumes exactly."""

from __future__ import annotations

import torch
from torch import nn


class FeatureQueue(nn.Module):
    """`size` rows of `dim` features, the newest overwriting the oldest.

    Under several processes push the keys gathered from every rank (`StepContext.gather`, rank order):
    each rank then holds the same queue, and no key twice.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"a feature queue needs size >= 1, got {size}")
        self.register_buffer("feats", torch.zeros(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def push(self, x: torch.Tensor) -> None:
        """Enqueue the rows of `x` (m, dim); with m > size only the last `size` are kept."""
        size = self.feats.shape[0]
        x = x.detach().to(self.feats.dtype)[-size:]
        idx = (self.ptr + torch.arange(x.shape[0], device=x.device)) % size
        self.feats[idx] = x
        self.ptr.copy_((self.ptr + x.shape[0]) % size)
        self.filled.copy_(torch.clamp(self.filled + x.shape[0], max=size))

    def valid(self) -> torch.Tensor:
        """The rows written so far (filled, dim), oldest first is not guaranteed."""
        return self.feats[: int(self.filled)]
