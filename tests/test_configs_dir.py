"""Every experiment YAML shipped in configs/ loads and names a model that builds from its preset."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmcl.config import load_experiment
from mmcl.registry import MODELS

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "configs").glob("*/*.yaml"))


@pytest.mark.parametrize("path", [p for p in EXPERIMENTS if p.parent.name != "accelerate"], ids=lambda p: p.name)
def test_experiment_configs_load(path):
    import mmcl.models  # noqa: F401  (registers)

    cfg = load_experiment(path)
    assert cfg.model.arch in MODELS
    assert cfg.train.output_dir.startswith("runs/")


@pytest.mark.parametrize("path", [p for p in EXPERIMENTS if p.parent.name != "accelerate"], ids=lambda p: p.name)
def test_experiment_configs_take_a_training_step(path):
    """The config's model and loss terms, a batch built with the views the terms ask for, one accumulated
    optimizer step (the config's grad_accum) through the real accumulator: finite loss, every term logged."""
    import random

    import torch

    from mmcl.data.batch import Batch
    from mmcl.data.synthetic import generate
    from mmcl.data.transforms import transform_from_model
    from mmcl.models import build_model
    from mmcl.tasks import build_task

    torch.manual_seed(0)
    cfg = load_experiment(path)
    task = build_task(build_model(cfg.model), cfg)
    n = 2 * cfg.train.grad_accum
    samples = [generate(i, image_size=64, split="train") for i in range(n)]
    transform = transform_from_model(task.model, train=True)
    captions, keys = [s.caption for s in samples], [f"{i:06d}" for i in range(n)]
    text, mask = task.model.tokenizer(captions)
    images = torch.stack([transform(s.image) for s in samples])
    batch = Batch(images=images, text=text, text_mask=mask, captions=captions, keys=keys)
    rngs = [random.Random(i) for i in range(n)]  # one per sample, drawn by each view in turn, as the loader does
    for name, view in task.views().items():
        if getattr(view, "reads_raw", False):  # other members of the raw sample (counterfactuals): none here
            parts = [view.from_raw({"__key__": k}, random.Random(i).getstate(), transform, 10**8)[0]
                     for i, k in enumerate(keys)]  # fmt: skip
            batch.views.update({f"{name}/{p}": torch.stack([x[p] for x in parts]) for p in parts[0]})
        elif view.kind == "sample":  # per-sample views (second image views) from each sample's own RNG
            batch.views[name] = torch.stack([view(s.image, rng) for s, rng in zip(samples, rngs)])
        else:
            batch.views.update(view(captions, keys, True))
    out = task.step(batch.split(cfg.train.grad_accum)).metrics
    assert torch.isfinite(torch.tensor(out["loss"])), out
    assert {f"{t.name}_loss" for t in cfg.loss.terms} <= set(out)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.parameters())


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_profiles_are_valid_yaml(path):
    data = yaml.safe_load(path.read_text())
    assert data["num_processes"] >= 2 and data["distributed_type"] in ("MULTI_CPU", "MULTI_GPU", "FSDP")
