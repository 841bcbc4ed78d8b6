"""`builtin:` datasets: written on first use, so `mmcl train configs/clip/tiny.yaml` works out of the box."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmcl.data import builtin
from mmcl.data.shards import count_samples, expand_shards
from mmcl.utils import UserError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def small_builtin(tmp_path, monkeypatch):
    monkeypatch.setenv("MMCL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(builtin, "SHAPES", {"train": 300, "val": 80})
    return tmp_path / "cache" / "builtin"


def test_unknown_builtin_is_a_clear_error(small_builtin):
    with pytest.raises(UserError, match="unknown built-in dataset 'builtin:shapez'.*builtin:shapes/train"):
        expand_shards("builtin:shapez")


def test_builtin_written_once_then_reused(small_builtin):
    folder = builtin.ensure_builtin("builtin:shapes/val", progress=False)
    assert folder == small_builtin / "shapes" / "val"
    shards = expand_shards("builtin:shapes/val")
    assert count_samples(shards) == 80 and (folder / "classnames.txt").is_file()
    stamp = [Path(s).stat().st_mtime_ns for s in shards]
    builtin.ensure_builtin("builtin:shapes/val", progress=False)
    assert [Path(s).stat().st_mtime_ns for s in shards] == stamp


def test_tiny_config_trains_out_of_the_box(small_builtin, tmp_path):
    from mmcl.cli import main

    code = main(
        [
            "train",
            str(ROOT / "configs" / "clip" / "tiny.yaml"),
            "train.steps=2",
            "train.eval_every=0",
            "eval.max_samples=64",
            f"train.output_dir={tmp_path / 'run'}",
            "train.trackers=[none]",
            "train.progress=false",
            "data.batch_size=16",
        ]
    )
    assert code == 0
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert (small_builtin / "shapes" / "train" / "sizes.json").is_file()
