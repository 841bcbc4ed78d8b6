"""ContrastiveTask: metrics, accumulation that keeps every negative, and its DDP version on 2 gloo processes."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmcl.config import ExperimentConfig, LossConfig, model_config
from mmcl.data.batch import Batch
from mmcl.models import build_model
from mmcl.tasks import build_task
from mmcl.tasks.contrastive import ContrastiveTask
from mmcl.utils import UserError

COLOURS = ["red", "green", "blue", "white"]
SHAPES = ["circle", "square", "star", "cross"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared CPU: one thread is faster and stable
    yield
    torch.set_num_threads(threads)


def _task(preset: str = "clip-tiny", loss: str = "clip", **model_overrides) -> ContrastiveTask:
    torch.manual_seed(0)
    cfg = ExperimentConfig(model=model_config({"preset": preset, **model_overrides}), loss=LossConfig(contrastive=loss))
    return build_task(build_model(cfg.model), cfg)


def _batch(task: ContrastiveTask, n: int = 16, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    captions = [f"a {COLOURS[i % 4]} {SHAPES[(i // 4) % 4]} number {i}" for i in range(n)]
    ids, mask = task.model.tokenizer(captions)
    size = task.model.preprocess_cfg()["image_size"]
    return Batch(images=torch.randn(n, 3, size, size, generator=g), text=ids, text_mask=mask, captions=captions)


def _prepared(task: ContrastiveTask, calls: list | None = None):
    def run(batch: Batch, last: bool = True, **kwargs):
        out = task(batch, **kwargs)
        if calls is not None:
            calls.append((torch.is_grad_enabled(), last, {k: v.detach().clone() for k, v in out.items()}))
        return out

    return run


def _step(task: ContrastiveTask, batch: Batch, k: int, calls: list | None = None):
    task.zero_grad()
    out = task.forward_backward(_prepared(task, calls), batch.split(k), lambda loss, last: loss.backward())
    return out, {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}


def test_forward_returns_named_scalars() -> None:
    task = _task()
    out = task(_batch(task))
    assert set(out) == {"loss", "acc_i2t", "acc_t2i", "logit_scale"}
    assert out["loss"].requires_grad and out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert not out["logit_scale"].requires_grad and float(out["logit_scale"]) == pytest.approx(1 / 0.07, rel=1e-5)
    feats = task(_batch(task), features_only=True)
    assert feats["image_features"].shape == (16, 64)


@pytest.mark.parametrize(("preset", "loss"), [("clip-tiny", "clip"), ("siglip-tiny", "siglip")])
def test_accumulation_equals_the_full_batch(preset: str, loss: str) -> None:
    task = _task(preset, loss)
    batch = _batch(task)
    full_out, full = _step(task, batch, 1)
    calls: list = []
    acc_out, acc = _step(task, batch, 4, calls)
    assert full.keys() == acc.keys() and "model.logit_scale" in acc
    for name in full:
        torch.testing.assert_close(acc[name], full[name], atol=1e-5, rtol=1e-4, msg=name)
    # the reported loss is the full-batch loss (not divided by k), and so are the accuracies
    for key in full_out:
        assert acc_out[key] == pytest.approx(full_out[key], rel=1e-5, abs=1e-6), key
    # pass 1: 4 forwards without grad; pass 2: 4 with grad, only the last one marked last (DDP sync)
    assert [(grad, last) for grad, last, _ in calls] == [(False, False)] * 4 + [(True, False)] * 3 + [(True, True)]


def test_dropout_is_replayed_in_the_recompute_pass() -> None:
    task = _task(image={"timm_kwargs": {"proj_drop_rate": 0.3, "attn_drop_rate": 0.3}})
    task.train()
    calls: list = []
    _step(task, _batch(task), 2, calls)
    cached, recomputed = [c[2] for c in calls[:2]], [c[2] for c in calls[2:]]
    for a, b in zip(cached, recomputed):
        torch.testing.assert_close(a["image_features"], b["image_features"])
    # and dropout really is active: a fresh forward gives other features
    again = task(_batch(task).split(2)[0], features_only=True)["image_features"]
    assert not torch.allclose(again, cached[0]["image_features"])


def test_bad_loss_settings_are_user_errors() -> None:
    with pytest.raises(UserError, match="init_logit_bias"):
        _task("clip-tiny", "siglip")
    with pytest.raises(UserError, match="'clip' or 'siglip'"):
        _task("clip-tiny", "none")
    task = _task()
    with pytest.raises(UserError, match="images"):
        task(Batch(captions=["a"]))


# ---------------------------------------------------------------- DDP: 2 processes x 2 micro-batches

WORLD = 2


def _ddp_worker(rank: int, port: int, root: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        saved = torch.load(Path(root) / "reference.pt", weights_only=True)
        task = _task()
        task.load_state_dict(saved["state"])
        ddp = DistributedDataParallel(task)
        n = saved["images"].shape[0] // WORLD
        own = slice(rank * n, (rank + 1) * n)
        batch = Batch(images=saved["images"][own], text=saved["text"][own], text_mask=saved["mask"][own])

        def prepared(mb: Batch, last: bool = True, **kwargs):
            if last:
                return ddp(mb, **kwargs)
            with ddp.no_sync():
                return ddp(mb, **kwargs)

        out = task.forward_backward(prepared, batch.split(2), lambda loss, last: loss.backward())
        loss = torch.tensor(out["loss"])
        dist.all_reduce(loss)
        torch.testing.assert_close(loss / WORLD, saved["loss"], atol=1e-6, rtol=1e-5)
        for name, p in task.named_parameters():
            torch.testing.assert_close(p.grad, saved["grads"][name], atol=1e-5, rtol=1e-4, msg=f"rank {rank} {name}")
    finally:
        dist.destroy_process_group()


def test_ddp_with_accumulation_equals_the_full_batch(tmp_path: Path) -> None:
    task = _task()
    batch = _batch(task)
    out, grads = _step(task, batch, 1)
    torch.save(
        {"state": task.state_dict(), "images": batch.images, "text": batch.text, "mask": batch.text_mask,
         "loss": torch.tensor(out["loss"]), "grads": grads},
        tmp_path / "reference.pt",
    )  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: children inherit the imports (spawn re-imports torch, timm, transformers: ~40 s here)
    mp.start_processes(_ddp_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=True, start_method="fork")
