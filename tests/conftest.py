"""Shared fixtures for the whole test suite (each section is owned by the engineer named in it)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def one_thread():
    """Tiny models on a CPU shared with other jobs: one thread (two OpenMP threads spin at barriers,
    measured 5-10x slower). Opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- data fixtures (shard writer / synthetic data) -------------------------------------------


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small synthetic shards at 32 px, written once per session.

    Returns the root folder: `train/` (4 shards x 64 samples, keys 000000000..000030063),
    `val/` (2 shards x 64), each with `sizes.json`, stats and `classnames.txt`, and
    `root/classnames.txt` (the 40 "colour shape" classes of `mmcl.data.synthetic`).
    Treat it as read-only: other tests share it.
    """
    from mmcl.data.writer import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("demo_shards"), n_train=256, n_val=128, image_size=32, maxcount=64)
