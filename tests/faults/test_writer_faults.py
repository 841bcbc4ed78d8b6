"""`mmcl shards folder` on a messy folder: every bad input counted by reason, the job goes on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmcl.cli import main


def _jpeg(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG")


@pytest.fixture
def messy(tmp_path) -> Path:
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(3):
        _jpeg(root / f"ok{i}.jpg", i)
        (root / f"ok{i}.txt").write_text(f"photo {i}")
    _jpeg(root / "latin1.jpg", 7)
    (root / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    os.symlink(root / "gone.jpg", root / "dangling.jpg")
    (root / "dangling.txt").write_text("a caption for a missing file")
    (root / "folder.jpg").mkdir()
    (root / "folder.txt").write_text("a caption for a folder")
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_inputs_are_counted_by_reason_and_the_job_goes_on(messy, tmp_path, capsys, workers):
    out = tmp_path / "shards"
    rc = main(["shards", "folder", str(messy), str(out), "--no-progress", "--workers", str(workers)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "wrote 3 samples" in printed and "3 inputs failed" in printed
    assert "caption not UTF-8: 1" in printed and "dangling symlink: 1" in printed and "not a file: 1" in printed
    stats = json.loads((out / "00000_stats.json").read_text())
    assert stats["count"] == 6 and stats["successes"] == 3
    assert stats["status_dict"] == {"success": 3, "caption not UTF-8": 1, "dangling symlink": 1, "not a file": 1}


def test_python_api_summary_names_the_reasons(messy, tmp_path):
    from mmcl.data.sources import FolderSource
    from mmcl.data.writer import write_shards

    summary = write_shards(FolderSource(messy), tmp_path / "out", progress=False)
    assert summary.failed == 3
    assert summary.failed_by_reason == {"caption not UTF-8": 1, "dangling symlink": 1, "not a file": 1}
    assert {Path(src).name for src, _ in summary.failures} == {"latin1.jpg", "dangling.jpg", "folder.jpg"}


def test_a_valid_caption_still_round_trips(messy, tmp_path):
    import tarfile

    main(["shards", "folder", str(messy), str(tmp_path / "out"), "--no-progress"])
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        captions = sorted(tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt"))
    assert captions == ["photo 0", "photo 1", "photo 2"]
