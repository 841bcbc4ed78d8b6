"""The chunked (ring) SigLIP loss equals the all-gather one and the plain full-batch loss: value, gradients
and accuracies, on 1, 2 and 3 gloo processes (3: the ring's direction and the gradients' trip home differ
from a 2-process swap), and under gradient accumulation, alone and with DDP."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ddp_runner import DDPRunner
from loss_reference import LOG_SCALE, accuracy_reference, random_features, siglip_loss_reference

from mmcl.config import load_experiment
from mmcl.data.batch import Batch
from mmcl.losses import SigLipLoss
from mmcl.models import build_model
from mmcl.tasks import Task, build_task
from mmcl.utils import UserError

N = 12  # global batch: divisible by 2 and 3 processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _leaves(seed: int = 5) -> tuple[torch.Tensor, ...]:
    img, txt = random_features(N, 6, seed=seed)
    log_scale = torch.tensor(LOG_SCALE, dtype=torch.float64)
    bias = torch.tensor(-2.0, dtype=torch.float64)
    return img, txt, log_scale, bias


def _run(loss_fn: SigLipLoss, img, txt, log_scale, bias, grad_scale: float = 1.0):
    """Loss and accuracies of `loss_fn` on copies of the leaves, and the leaves' gradients."""
    leaves = [t.clone().requires_grad_(True) for t in (img, txt, log_scale, bias)]
    out = loss_fn(leaves[0], leaves[1], leaves[2].exp(), leaves[3])
    (out["loss"] * grad_scale).backward()
    return out, [t.grad for t in leaves]


def _worker(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        img, txt, log_scale, bias = _leaves()  # the same global batch on every rank
        n = N // world
        own = slice(rank * n, (rank + 1) * n)
        # the plain full-batch loss (explicit loops, no communication)
        ref = [t.clone().requires_grad_(True) for t in (img, txt, log_scale, bias)]
        ref_loss = siglip_loss_reference(ref[0], ref[1], ref[2].exp(), ref[3])
        ref_loss.backward()

        def mean(x: torch.Tensor) -> torch.Tensor:
            x = x.detach().clone()
            dist.all_reduce(x)
            return x / world

        # the second rank's loss is weighed by 3: a rank's own loss gradient is what travels, not a copy of ours
        weights = [1.0 + 2.0 * (r % 2) for r in range(world)]
        for with_grad in (True, False):
            outs = {}
            for impl in ("gather", "ring"):
                outs[impl] = _run(
                    SigLipLoss(with_grad, dist_impl=impl), img[own], txt[own], log_scale, bias, weights[rank]
                )
            (ring, ring_grads), (gathered, gathered_grads) = outs["ring"], outs["gather"]
            msg = f"rank {rank}/{world} gather_with_grad={with_grad}"
            for key in ("loss", "acc_i2t", "acc_t2i"):
                torch.testing.assert_close(ring[key], gathered[key], msg=f"{msg} {key}")
            for g_ring, g_gather in zip(ring_grads, gathered_grads):
                torch.testing.assert_close(g_ring, g_gather, rtol=1e-9, atol=1e-12, msg=msg)
        # equal weights: DDP's mean of the ranks' gradients is the full-batch gradient (the reference test)
        out, grads = _run(SigLipLoss(True, dist_impl="ring"), img[own], txt[own], log_scale, bias)
        msg = f"rank {rank}/{world} vs full batch"
        torch.testing.assert_close(mean(out["loss"]), ref_loss.detach(), msg=msg)
        torch.testing.assert_close(grads[0] / world, ref[0].grad[own], rtol=1e-6, atol=1e-9, msg=msg)
        torch.testing.assert_close(grads[1] / world, ref[1].grad[own], rtol=1e-6, atol=1e-9, msg=msg)
        torch.testing.assert_close(mean(grads[2]), ref[2].grad, msg=msg)
        torch.testing.assert_close(mean(grads[3]), ref[3].grad, msg=msg)
        assert float(mean(out["acc_i2t"])) == pytest.approx(accuracy_reference(img, txt))
        assert float(mean(out["acc_t2i"])) == pytest.approx(accuracy_reference(txt, img))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_ring_equals_gather_and_the_full_batch(world: int) -> None:
    # fork: the children inherit the imports; each runs single-threaded (OpenMP stays fork-safe)
    mp.start_processes(_worker, args=(world, free_port()), nprocs=world, join=True, start_method="fork")


def test_one_process_ring_is_the_plain_loss() -> None:
    img, txt, log_scale, bias = _leaves(seed=7)
    out, grads = _run(SigLipLoss(dist_impl="ring"), img, txt, log_scale, bias)
    ref = [t.clone().requires_grad_(True) for t in (img, txt, log_scale, bias)]
    ref_loss = siglip_loss_reference(ref[0], ref[1], ref[2].exp(), ref[3])
    torch.testing.assert_close(out["loss"], ref_loss)
    for g, r in zip(grads, torch.autograd.grad(ref_loss, ref)):
        torch.testing.assert_close(g, r)
    assert float(out["acc_i2t"]) == pytest.approx(accuracy_reference(img, txt))
    assert float(out["acc_t2i"]) == pytest.approx(accuracy_reference(txt, img))


def test_without_bias_and_unknown_impl() -> None:
    img, txt, log_scale, _ = _leaves(seed=2)
    scale = log_scale.exp()
    ring = SigLipLoss(dist_impl="ring")(img, txt, scale)["loss"]
    torch.testing.assert_close(ring, SigLipLoss()(img, txt, scale)["loss"])
    with pytest.raises(UserError, match="dist_impl must be one of"):
        SigLipLoss(dist_impl="shift")


# ---------------------------------------------------------------- the term, under gradient accumulation


def make_task(impl: str) -> Task:
    torch.manual_seed(0)
    cfg = load_experiment(None, ["model.preset=siglip-tiny", f"loss.terms=[{{name: siglip, dist_impl: {impl}}}]"])
    assert cfg.loss.terms[0].options.dist_impl == impl
    return build_task(build_model(cfg.model), cfg)


def make_batch(task: Task, n: int = 16) -> Batch:
    g = torch.Generator().manual_seed(1)
    size = task.model.preprocess_cfg()["image_size"]
    captions = [f"a photo of thing number {i}" for i in range(n)]
    ids, mask = task.model.tokenizer(captions)
    images = torch.randn(n, 3, size, size, generator=g)
    return Batch(images=images, text=ids, text_mask=mask, captions=captions, keys=[f"{i:06d}" for i in range(n)])


def step(task: Task, batch: Batch, k: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    task.zero_grad()
    out = task.step(batch.split(k)).metrics
    return out, {name: p.grad.clone() for name, p in task.named_parameters() if p.grad is not None}


@pytest.mark.usefixtures("one_thread")
def test_term_option_under_accumulation_equals_the_gather_full_batch() -> None:
    gather_task, ring_task = make_task("gather"), make_task("ring")
    task_batch = make_batch(gather_task)
    full_out, full = step(gather_task, task_batch, 1)
    acc_out, acc = step(ring_task, task_batch, 4)
    assert full.keys() == acc.keys() and len(full) > 0
    for name in full:
        torch.testing.assert_close(acc[name], full[name], atol=2e-5, rtol=1e-4, msg=name)
    for name in ("loss", "siglip_loss", "acc_i2t", "acc_t2i"):
        assert acc_out[name] == pytest.approx(full_out[name], rel=1e-5, abs=1e-6), name


def _ddp_worker(rank: int, port: int, root: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        saved = torch.load(Path(root) / "reference.pt", weights_only=True)
        task = make_task("ring")
        task.load_state_dict(saved["state"])
        ddp = DistributedDataParallel(task)
        n = saved["images"].shape[0] // 2
        own = slice(rank * n, (rank + 1) * n)
        batch = Batch(images=saved["images"][own], text=saved["text"][own], text_mask=saved["mask"][own])
        out = task.step(batch.split(2), DDPRunner(ddp), prepared=ddp).metrics
        loss = torch.tensor(out["loss"])
        dist.all_reduce(loss)
        torch.testing.assert_close(loss / 2, saved["loss"], atol=1e-6, rtol=1e-5)
        for name, p in task.named_parameters():
            torch.testing.assert_close(p.grad, saved["grads"][name], atol=1e-5, rtol=1e-4, msg=f"rank {rank} {name}")
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("one_thread")
def test_ddp_ring_with_accumulation_equals_the_gather_full_batch(tmp_path: Path) -> None:
    task = make_task("gather")
    batch = make_batch(task)
    out, grads = step(task, batch, 1)
    torch.save(
        {"state": task.state_dict(), "images": batch.images, "text": batch.text, "mask": batch.text_mask,
         "loss": torch.tensor(out["loss"]), "grads": grads},
        tmp_path / "reference.pt",
    )  # fmt: skip
    mp.start_processes(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")


def test_under_bf16_autocast_with_mixed_feature_dtypes() -> None:
    """The towers' features may come out of autocast in different dtypes; backward replays forward's autocast."""
    img, txt, log_scale, bias = (t.float() for t in _leaves(seed=3))
    results = {}
    for impl in ("gather", "ring"):
        leaves = [
            img.clone().requires_grad_(True),
            txt.bfloat16().requires_grad_(True),
            log_scale.clone(),
            bias.clone(),
        ]
        for t in leaves[2:]:
            t.requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = SigLipLoss(dist_impl=impl)(leaves[0], leaves[1], leaves[2].exp(), leaves[3])
        out["loss"].backward()
        results[impl] = (out["loss"].float(), [t.grad.float() for t in leaves])
        assert leaves[1].grad.dtype == torch.bfloat16
    torch.testing.assert_close(results["ring"][0], results["gather"][0], rtol=2e-2, atol=2e-2)
    for g_ring, g_gather in zip(results["ring"][1], results["gather"][1]):
        torch.testing.assert_close(g_ring, g_gather, rtol=5e-2, atol=5e-2)
