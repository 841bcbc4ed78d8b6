"""CPC on image patches (Hénaff et al. 2019): the crops, the masked context and the loss against plain loops, the
context blind to the rows below, and a tiny model that learns to predict its patches (the loss falls)."""

from __future__ import annotations

import math

import pytest
import torch

from mmcl.config import load_experiment
from mmcl.data.batch import Batch
from mmcl.data.synthetic import generate
from mmcl.data.transforms import transform_from_model
from mmcl.losses.cpc_image import grid_crops
from mmcl.models import build_model
from mmcl.tasks import build_task
from mmcl.utils import UserError


def _task(terms: str, *extra: str):
    torch.manual_seed(0)
    cfg = load_experiment(None, ["model.preset=clip-tiny", f"loss.terms={terms}", *extra])
    return build_task(build_model(cfg.model), cfg)


def test_grid_crops_are_the_overlapping_squares() -> None:
    images = torch.randn(2, 3, 64, 64)
    crops = grid_crops(images, 3)
    assert crops.shape == (2, 3, 3, 3, 32, 32)  # side 2 * 64 / 4, stride 16
    for i in range(3):
        for j in range(3):
            assert torch.equal(crops[:, i, j], images[:, :, 16 * i : 16 * i + 32, 16 * j : 16 * j + 32])


def test_cpc_image_matches_a_loop() -> None:
    task = _task("[{name: cpc_image, grid: 3, steps: 2, dim: 4, context_layers: 1}]")
    term = task.terms["cpc_image"].double()
    task.model.double().eval()
    g = torch.Generator().manual_seed(0)
    size = task.model.preprocess_cfg()["image_size"]
    side, stride = size // 2, size // 4  # 3 x 3 crops: side 2S/4, stride side/2
    images = torch.randn(2, 3, size, size, generator=g, dtype=torch.float64)
    batch = Batch(images=images, keys=["a", "b"])
    out = term(term.features(task.model, batch, {}), batch)
    conv = term.context[0].conv
    w, bias = conv.weight, conv.bias  # (D, D, 3, 3)
    total, count = 0.0, 0
    for b in range(2):
        z = {}
        for i in range(3):
            for j in range(3):  # each crop through the tower alone
                crop = images[b : b + 1, :, stride * i : stride * i + side, stride * j : stride * j + side]
                z[i, j] = term.code(task.model.encode_image(crop, normalize=False))[0]
        for i in range(3):
            for j in range(3):
                c = z[i, j] + bias  # the masked 3 x 3 convolution: rows i-2..i, columns j-1..j+1
                for di in range(3):
                    for dj in range(3):
                        r, s = i - 2 + di, j - 1 + dj
                        if r >= 0 and 0 <= s < 3:
                            c = c + w[:, :, di, dj] @ z[r, s]
                for k in (1, 2):
                    if i + k >= 3:
                        continue
                    pred = term.predict.weight[(k - 1) * 4 : k * 4] @ c + term.predict.bias[(k - 1) * 4 : k * 4]
                    s = [float(pred.dot(z[u // 3, u % 3]).detach()) for u in range(9)]
                    total -= s[(i + k) * 3 + j] - math.log(sum(math.exp(x) for x in s))
                    count += 1
    assert count == term.count(batch) == 2 * (6 + 3)
    assert out["loss"].item() == pytest.approx(total / count, rel=1e-6)


def test_the_context_never_sees_the_rows_below() -> None:
    task = _task("[{name: cpc_image, grid: 4, steps: 1, dim: 8, context_layers: 3}]")
    term = task.terms["cpc_image"]
    z = torch.randn(1, 8, 4, 4, requires_grad=True)
    c = term.context(z)
    for i in range(4):
        (grad,) = torch.autograd.grad(c[0, :, i].sum(), z, retain_graph=True)
        assert grad[0, :, i + 1 :].abs().sum() == 0 and grad[0, :, : i + 1].abs().sum() > 0, i


def test_cpc_image_refuses_a_grid_it_cannot_predict_in() -> None:
    with pytest.raises(UserError, match="steps < grid"):
        _task("[{name: cpc_image, grid: 2, steps: 2}]")


def test_cpc_image_learns_to_predict_the_patches_below() -> None:
    """A tiny model trained on the image CPC loss alone: it falls far below its start (log G^2) in seconds."""
    task = _task("[{name: cpc_image, grid: 3, steps: 1, dim: 32}]", "model.image.timm_kwargs.depth=1")
    torch.set_num_threads(2)
    transform = transform_from_model(task.model, train=False)
    size = task.model.preprocess_cfg()["image_size"]
    images = torch.stack([transform(generate(i, image_size=size).image) for i in range(16)])
    batch = Batch(images=images, keys=[str(i) for i in range(16)])
    params = [p for p in task.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3)
    term, losses = task.terms["cpc_image"], []
    for _ in range(30):
        loss = term(term.features(task.model, batch, {}), batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(9), abs=0.5)  # chance among the 9 positions
    assert min(losses[-5:]) < 0.3 * losses[0], losses


def test_the_shipped_cpc_image_config_builds_on_a_cnn() -> None:
    from pathlib import Path

    cfg = load_experiment(Path(__file__).resolve().parents[2] / "configs/objectives/cpc-image.yaml", [])
    task = build_task(build_model(cfg.model), cfg)
    term = task.terms["cpc_image"]
    assert term.side == 2 * 64 // 5 and term.options.grid == 4  # a CNN: the crops at their own size
    batch = Batch(images=torch.randn(2, 3, 64, 64), keys=["a", "b"])
    out = term(term.features(task.model, batch, {}), batch)
    assert out["loss"].item() == pytest.approx(math.log(16), abs=1.5)
