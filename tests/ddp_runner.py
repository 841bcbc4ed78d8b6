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


def check_ddp_step(task, own, saved: dict, rank: int, world: int) -> None:
    """One accumulated step (2 micro-batches) of this rank's `own` batch through DDP equals the full-batch
    reference `saved` ({'loss', 'grads'}): the mean loss over ranks and every parameter's gradient."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(task)
    out = task.step(own.split(2), DDPRunner(ddp), prepared=ddp).metrics
    loss = torch.tensor(out["loss"])
    dist.all_reduce(loss)
    torch.testing.assert_close(loss / world, saved["loss"], atol=1e-6, rtol=1e-5)
    for name, p in task.named_parameters():
        torch.testing.assert_close(p.grad, saved["grads"][name], atol=1e-5, rtol=1e-4, msg=f"rank {rank} {name}")
