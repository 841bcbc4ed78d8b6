"""The `counterfactual` term against a plain loop (masked rows and columns, row weights), reducing to CLIP without
counterfactuals; with real counterfactual scenes: k micro-batches give the full-batch gradient, and 2 gloo
processes with accumulation give it too."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from ddp_runner import check_ddp_step

from mmcl.config import load_experiment
from mmcl.data.batch import Batch
from mmcl.data.counterfactual import EDITS, counterfactual
from mmcl.data.synthetic import generate
from mmcl.data.transforms import transform_from_model
from mmcl.losses.clip_loss import ClipLoss
from mmcl.models import build_model
from mmcl.tasks import Task, build_task

pytestmark = pytest.mark.usefixtures("one_thread")
WORLD = 2


def make_task(terms: str = "[counterfactual]") -> Task:
    torch.manual_seed(0)
    cfg = load_experiment(None, ["model.preset=clip-tiny", f"loss.terms={terms}"])
    return build_task(build_model(cfg.model), cfg)


def make_batch(task: Task, n: int = 8) -> Batch:
    """Synthetic scenes with their counterfactuals (the first applicable edit; some samples have none)."""
    transform = transform_from_model(task.model, train=False)
    size = task.model.preprocess_cfg()["image_size"]
    samples = [generate(i, image_size=size) for i in range(n)]
    cfs = [next((c for e in EDITS if (c := counterfactual(i, e, image_size=size)) is not None), None) for i in range(n)]
    cfs[1] = None  # at least one sample without a counterfactual
    ids, mask = task.model.tokenizer([s.caption for s in samples])
    cf_ids, cf_mask = task.model.tokenizer([c.caption if c else "" for c in cfs])
    blank = torch.zeros_like(transform(samples[0].image))
    views = {
        "counterfactual/cf/image": torch.stack([transform(c.image) if c else blank for c in cfs]),
        "counterfactual/cf/text": cf_ids,
        "counterfactual/cf/mask": cf_mask,
        "counterfactual/cf/valid": torch.tensor([c is not None for c in cfs]),
    }
    images = torch.stack([transform(s.image) for s in samples])
    keys = [f"{i:04d}" for i in range(n)]
    return Batch(images=images, text=ids, text_mask=mask, captions=[s.caption for s in samples], keys=keys, views=views)


def unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def loop_loss(x, y, xc, yc, valid, t, lam) -> float:
    """The docstring's L written out: rows and columns over [pairs; valid counterfactuals]."""
    rows = [(x[i], y[i], 1.0) for i in range(len(x))] + [(xc[i], yc[i], lam) for i in range(len(x)) if valid[i]]
    total, weight = 0.0, 0.0
    for k, (a, b, w) in enumerate(rows):
        i2t = torch.stack([t * a.dot(r[1]) for r in rows])
        t2i = torch.stack([t * b.dot(r[0]) for r in rows])
        ce = -(i2t[k] - torch.logsumexp(i2t, 0)) - (t2i[k] - torch.logsumexp(t2i, 0))
        total, weight = total + w * ce, weight + w
    return float(total / (2 * weight))


def test_matches_a_plain_loop() -> None:
    task = make_task("[{name: counterfactual, cf_weight: 0.5}]")
    term = task.terms["counterfactual"].double()
    x, y, xc, yc = (unit(6, 16, seed=s) for s in range(4))
    valid = torch.tensor([True, False, True, True, False, True])
    t = torch.tensor(5.0, dtype=torch.float64)
    feats = {"image_features": x, "text_features": y, "cf_image_features": xc, "cf_text_features": yc,
             "cf_valid": valid, "logit_scale": t}  # fmt: skip
    out = term(feats, None)
    assert out["loss"].item() == pytest.approx(loop_loss(x, y, xc, yc, valid, t, 0.5), rel=1e-9)
    own, cf_cap = (x * y).sum(-1), (x * yc).sum(-1)
    assert out["cf_acc_i2t"].item() == pytest.approx(float(((own > cf_cap) & valid).sum() / valid.sum()))
    assert out["cf_rate"].item() == pytest.approx(4 / 6)
    # without counterfactuals it is CLIP's loss
    out = term({**feats, "cf_valid": torch.zeros(6, dtype=torch.bool)}, None)
    assert out["loss"].item() == pytest.approx(ClipLoss()(x, y, t)["loss"].item(), rel=1e-9)


def test_the_counterfactual_caption_and_image_are_negatives_both_ways() -> None:
    """Raising an image's score with its counterfactual's caption raises the loss; so does a caption's score
    with the counterfactual image (the term looks at both directions)."""
    term = make_task().terms["counterfactual"].double()
    x, y, xc, yc = (unit(4, 16, seed=s) for s in range(4))
    valid = torch.ones(4, dtype=torch.bool)
    t = torch.tensor(5.0, dtype=torch.float64)
    base = {"image_features": x, "text_features": y, "cf_image_features": xc, "cf_text_features": yc,
            "cf_valid": valid, "logit_scale": t}  # fmt: skip
    loss = term(base, None)["loss"].item()
    closer_caption = F.normalize(yc + 0.5 * x, dim=-1)  # the cf caption moves towards the image (and stays cf)
    assert term({**base, "cf_text_features": closer_caption}, None)["loss"].item() > loss
    closer_image = F.normalize(xc + 0.5 * y, dim=-1)
    assert term({**base, "cf_image_features": closer_image}, None)["loss"].item() > loss


def step(task: Task, batch: Batch, k: int):
    task.zero_grad()
    out = task.step(batch.split(k)).metrics
    return out, {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}


def test_accumulated_gradient_equals_the_full_batch() -> None:
    task = make_task()
    batch = make_batch(task)
    assert batch.views["counterfactual/cf/valid"].sum() >= 5
    full_out, full = step(task, batch, 1)
    acc_out, acc = step(task, batch, 4)
    assert full.keys() == acc.keys() and len(full) > 0
    for name in full:
        torch.testing.assert_close(acc[name], full[name], atol=2e-5, rtol=1e-4, msg=name)
    assert acc_out["loss"] == pytest.approx(full_out["loss"], rel=1e-5)


def _ddp_worker(rank: int, port: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        saved = torch.load(Path(root) / "reference.pt", weights_only=True)
        task = make_task()
        task.load_state_dict(saved["state"])
        check_ddp_step(task, make_batch(task).split(WORLD)[rank], saved, rank, WORLD)  # this rank's half
    finally:
        dist.destroy_process_group()


def test_two_processes_with_accumulation_equal_the_full_batch(tmp_path: Path) -> None:
    task = make_task()
    batch = make_batch(task)
    valid = batch.views["counterfactual/cf/valid"]
    assert valid[:4].sum() != valid[4:].sum()  # the ranks hold different numbers of counterfactuals
    out, grads = step(task, batch, 1)
    torch.save(
        {"state": task.state_dict(), "loss": torch.tensor(out["loss"]), "grads": grads}, tmp_path / "reference.pt"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=True, start_method="fork")


def test_trains_from_shards_with_counterfactuals_through_the_trainer(tmp_path: Path) -> None:
    """The shipped path: `mmcl shards synthetic --counterfactuals` shards, loader workers on, the real trainer."""
    from mmcl.cli import main
    from mmcl.engine.metrics import read_metrics
    from mmcl.engine.trainer import Trainer

    shards = tmp_path / "cf"
    assert main(["shards", "synthetic", str(shards), "--n", "64", "--image-size", "32", "--counterfactuals",
                 "--maxcount", "32", "--no-progress"]) == 0  # fmt: skip
    cfg = load_experiment(None, ["model.preset=clip-tiny", "loss.terms=[counterfactual]", "train.trackers=[none]",
                                 "train.progress=false", "train.steps=2", "train.log_every=1", "data.batch_size=8",
                                 "train.grad_accum=2", f"data.train_shards=[{shards}]", "data.num_workers=1",
                                 f"train.output_dir={tmp_path / 'run'}", "train.ckpt_every=2"])  # fmt: skip
    Trainer(cfg).fit()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    rate = next(k for k in rows[-1] if k.endswith("cf_rate"))
    assert all(r[rate] > 0.5 for r in rows) and all(r["loss"] == r["loss"] for r in rows), rows


def test_samples_without_a_counterfactual_leave_batchnorm_statistics_alone() -> None:
    """On data without counterfactuals (every `valid` False) the term's stand-in images must not reach the image
    tower: in training mode a BatchNorm tower (the demo's CNN) would average them into its running statistics,
    and a run on the real digits then read 8% zero-shot (chance 10%) instead of 97%."""

    def bn_stats(terms: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        cfg = load_experiment(None, ["model.preset=clip-demo-cnn", "model.image.image_size=32", f"loss.terms={terms}"])
        task = build_task(build_model(cfg.model), cfg).train()
        batch = make_batch(task)
        batch.views["counterfactual/cf/valid"] = torch.zeros(len(batch.keys), dtype=torch.bool)
        task.step([batch])
        return [b.clone() for n, b in task.model.named_buffers() if "running_" in n]

    plain, with_term = bn_stats("[clip]"), bn_stats("[counterfactual]")
    assert plain, "the tower has BatchNorm"
    for a, b in zip(plain, with_term, strict=True):
        torch.testing.assert_close(b, a)
