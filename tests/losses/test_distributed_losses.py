"""Two gloo processes: the distributed losses and their DDP-averaged gradients equal the full-batch ones."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from loss_reference import LOG_SCALE, clip_loss_reference, random_features, siglip_loss_reference

from mmcl.losses import ClipLoss, SigLipLoss

WORLD = 2
N = 8  # global batch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / WORLD


def _worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        img, txt = random_features(N, 5, seed=3)  # the same global batch on every rank
        n = N // WORLD
        own = slice(rank * n, (rank + 1) * n)
        cases = {
            "clip local_loss": (ClipLoss(local_loss=True, gather_with_grad=True), clip_loss_reference),
            "clip global": (ClipLoss(local_loss=False, gather_with_grad=True), clip_loss_reference),
            "siglip": (SigLipLoss(gather_with_grad=True), siglip_loss_reference),
        }
        for name, (loss_fn, reference) in cases.items():
            # full-batch reference (plain loops, no communication)
            f_img, f_txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
            f_scale = torch.tensor(LOG_SCALE, dtype=torch.float64, requires_grad=True)
            f_bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
            ref = reference(f_img, f_txt, f_scale.exp(), f_bias)
            ref.backward()

            # this rank's share of the batch through the distributed loss
            l_img, l_txt = img[own].clone().requires_grad_(True), txt[own].clone().requires_grad_(True)
            l_scale = torch.tensor(LOG_SCALE, dtype=torch.float64, requires_grad=True)
            l_bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
            out = loss_fn(l_img, l_txt, l_scale.exp(), l_bias)
            out["loss"].backward()

            # DDP averages gradients over ranks: a feature's gradient reaches the parameters that made it
            # on its own rank only, so what DDP applies is (local gradient) / WORLD.
            msg = f"{name} (rank {rank})"
            torch.testing.assert_close(_mean_over_ranks(out["loss"]), ref.detach(), msg=msg)
            torch.testing.assert_close(l_img.grad / WORLD, f_img.grad[own], msg=msg)
            torch.testing.assert_close(l_txt.grad / WORLD, f_txt.grad[own], msg=msg)
            torch.testing.assert_close(_mean_over_ranks(l_scale.grad), f_scale.grad, msg=msg)
            torch.testing.assert_close(_mean_over_ranks(l_bias.grad), f_bias.grad, msg=msg)

        # without a differentiable gather the loss value is still the full-batch one
        out = ClipLoss(local_loss=True, gather_with_grad=False)(img[own], txt[own], torch.tensor(10.0).double())
        full = clip_loss_reference(img, txt, torch.tensor(10.0).double())
        torch.testing.assert_close(_mean_over_ranks(out["loss"]), full)
    finally:
        dist.destroy_process_group()


def test_two_process_losses_equal_full_batch() -> None:
    # fork, not spawn: the children inherit the imported modules (spawn re-imports torch: ~10x slower here);
    # each child runs single-threaded, which keeps OpenMP fork-safe
    mp.start_processes(_worker, args=(free_port(),), nprocs=WORLD, join=True, start_method="fork")


def _gather_worker(rank: int, port: int) -> None:
    from mmcl.losses.distributed import all_gather_cat

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        x = torch.randn(N, 3, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        w = torch.randn(3, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
        n = N // WORLD
        own = slice(rank * n, (rank + 1) * n)
        # losses whose gradient reaches the gathered rows non-contiguous: broadcast (stride 0, as FILIP's
        # token sums give) and a permuted slice; gloo's all_gather backward once summed them into the wrong rows
        losses = {
            "broadcast": lambda rows: (rows * w).sum(),
            "permuted slice": lambda rows: (rows.permute(2, 0, 1)[:, :, :2] ** 2).sum(),
        }
        for name, loss in losses.items():
            full = x.clone().requires_grad_(True)
            loss(full).backward()
            local = x[own].clone().requires_grad_(True)
            loss(all_gather_cat(local)).backward()
            # every rank computes the same loss over the gathered batch: each reaches this rank's rows
            torch.testing.assert_close(local.grad, WORLD * full.grad[own], msg=f"{name}, rank {rank}")
    finally:
        dist.destroy_process_group()


def test_gather_with_grad_routes_non_contiguous_gradients_to_their_rows() -> None:
    mp.start_processes(_gather_worker, args=(free_port(),), nprocs=WORLD, join=True, start_method="fork")
