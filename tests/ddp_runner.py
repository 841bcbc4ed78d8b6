"""`DDPRunner`: the parts of an Accelerator that `Task.step` uses, over a bare
DistributedDataParallel module, for the 2-process gloo tests of accumulation (tests/engine, tests/losses)."""

from __future__ import annotations

import contextlib

import torch


class DDPRunner:
    def __init__(self, ddp) -> None:
        self.ddp, self.device = ddp, torch.device("cpu")

    def no_sync(self, module):
        return module.no_sync()

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
