"""Every experiment YAML shipped in configs/ loads and names a model that builds from its preset."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmcl.config import load_experiment
from mmcl.registry import MODELS, TASKS

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "configs").glob("*/*.yaml"))


@pytest.mark.parametrize("path", [p for p in EXPERIMENTS if p.parent.name != "accelerate"], ids=lambda p: p.name)
def test_experiment_configs_load(path):
    import mmcl.models  # noqa: F401  (registers)
    import mmcl.tasks  # noqa: F401

    cfg = load_experiment(path)
    assert cfg.model.arch in MODELS and cfg.model.arch in TASKS
    assert cfg.train.output_dir.startswith("runs/")


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_profiles_are_valid_yaml(path):
    data = yaml.safe_load(path.read_text())
    assert data["num_processes"] >= 2 and data["distributed_type"] in ("MULTI_CPU", "MULTI_GPU")
