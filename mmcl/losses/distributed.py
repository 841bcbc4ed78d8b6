"""Gathering features across processes for contrastive losses (torch.distributed, any backend).

A contrastive loss needs every process's features as negatives. With
`with_grad=True` the gather is `torch.distributed.nn.functional.all_gather`,
whose backward sums the incoming gradients back onto each process's own slice
(a reduce-scatter), so the gradient of a per-process loss reaches the features
of every process: averaged over processes by DDP, it equals the gradient of the
full-batch loss. Every process must contribute the same number of rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_info() -> tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_cat(x: torch.Tensor, with_grad: bool = True) -> torch.Tensor:
    """Concatenate `x` (n, ...) from every process in rank order -> (world_size * n, ...).

    Args:
        x: this process's rows; the same shape on every process.
        with_grad: differentiable gather (gradients flow back to the process that owns each row).
            Without it the other processes' rows are constants and this process's own slice stays `x`
            itself, so its gradient is kept.
    """
    rank, world = world_info()
    if world == 1:
        return x
    if with_grad:
        import torch.distributed.nn.functional as dist_fn

        return torch.cat([_ContiguousGrad.apply(p) for p in dist_fn.all_gather(x.contiguous())], dim=0)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts, dim=0)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: the gloo backward of torch.distributed.nn's
    all_gather sums a non-contiguous incoming gradient (a transpose after the gather) into the wrong rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def gather_features(
    image_features: torch.Tensor, text_features: torch.Tensor, with_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both feature sets (n, D) of this process gathered across processes -> (world_size * n, D) each."""
    return all_gather_cat(image_features, with_grad), all_gather_cat(text_features, with_grad)


def ring_pass(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Send `tensors` to the next rank of the ring and receive the previous rank's (no autograd).

    Rank r sends to (r + 1) % P and receives from (r - 1) % P, all tensors in one batch of
    point-to-point operations (any backend with send/recv: gloo, nccl). Every rank must call it
    with tensors of the same shapes and dtypes. Returns the received tensors (new memory).
    """
    rank, world = world_info()
    if world == 1:
        return [t.clone() for t in tensors]
    right, left = (rank + 1) % world, (rank - 1) % world
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), right) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, left) for r in received]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return received
