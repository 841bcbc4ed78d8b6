"""Files mmcl writes follow the umask (0644 under 022), as `save_pretrained`, img2dataset and open_clip's do:
a teammate, a job under another account or a web server can read them."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_writes_apply_the_umask(tmp_path: Path, mask: int) -> None:
    from mmcl.utils import atomic_open, atomic_write_bytes, atomic_write_text

    old = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_write_bytes(tmp_path / "b.bin", b"x")
        with atomic_open(tmp_path / "c.bin") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    for name in ("a.txt", "b.bin", "c.bin"):
        assert _mode(tmp_path / name) == 0o666 & ~mask, (name, oct(_mode(tmp_path / name)))


def test_shards_and_run_files_are_readable_by_others(tmp_path: Path, umask_022: None) -> None:
    from mmcl.data.writer import write_synthetic_shards
    from mmcl.engine.metrics import MetricsLog, plot_curves

    write_synthetic_shards(tmp_path / "shards", 20, image_size=16, maxcount=10, progress=False)
    log = MetricsLog(tmp_path / "run" / "metrics.jsonl")
    log.append({"step": 1, "loss": 1.0})
    plot_curves(log.rows, tmp_path / "run" / "curves.png")
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 8
    assert {p.name: oct(_mode(p)) for p in files} == {p.name: "0o644" for p in files}
