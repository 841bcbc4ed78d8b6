"""Fixtures for the app and index tests (helpers in app_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from app_helpers import FakePipeline, coloured


@pytest.fixture
def fake() -> FakePipeline:
    return FakePipeline()


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """9 images (3 red, 3 green, 3 blue) with sidecar captions, plus a corrupt file that must be skipped."""
    folder = tmp_path / "images"
    folder.mkdir()
    for c, colour in enumerate(["red", "green", "blue"]):
        for j in range(3):
            coloured(colour, seed=10 * c + j).save(folder / f"{colour}_{j}.png")
            (folder / f"{colour}_{j}.txt").write_text(f"a {colour} square number {j}")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


@pytest.fixture
def built_index(tmp_path: Path, image_folder: Path, fake: FakePipeline) -> Path:
    from mmcl.index import build_index

    out = tmp_path / "index"
    build_index(fake, [str(image_folder)], out, batch_size=4, info={"model": "fake"}, progress=False)
    return out
