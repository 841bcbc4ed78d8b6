"""A full disk or a read-only output folder: one line that says so (how much was needed), temporaries removed.

The error is raised where the bytes are really written (the shard file, the checkpoint file), as the kernel
would: tests run as root, which ignores permissions, and cannot mount a small filesystem everywhere.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import pytest

from mmcl.cli import main


class _FailingFile:
    """A file on a disk that takes `disk["left"]` more bytes, then fails every write with `err` (as a full or
    read-only disk does)."""

    def __init__(self, f, disk: dict[str, int], err: int) -> None:
        self._f, self._disk, self._err = f, disk, err

    def write(self, data) -> int:
        if len(data) > self._disk["left"]:
            raise OSError(self._err, os.strerror(self._err))
        self._disk["left"] -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)


def _fail_shard_files_after(monkeypatch, budget: int, err: int) -> None:
    import mmcl.data.writer as writer

    real, disk = writer.atomic_open, {"left": budget}

    @contextlib.contextmanager
    def failing(path, mode="wb"):
        with real(path, mode) as f:
            yield _FailingFile(f, disk, err) if Path(path).suffix == ".tar" else f

    monkeypatch.setattr(writer, "atomic_open", failing)


@pytest.mark.parametrize(
    ("err", "says"),
    [(errno.ENOSPC, "no space left on "), (errno.EROFS, "is not writable"), (errno.EACCES, "is not writable")],
)
def test_shards_on_a_full_or_read_only_disk(tmp_path, monkeypatch, capsys, err, says) -> None:
    out = tmp_path / "shards"
    _fail_shard_files_after(monkeypatch, 600_000, err)  # two shards of 50 fit (235 kB each), then the disk is "full"
    rc = main(["shards", "synthetic", str(out), "--n", "400", "--image-size", "32", "--maxcount", "50",
               "--no-progress"])  # fmt: skip
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if "error" in line]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in captured.err, captured.err[-3000:]
    assert says in lines[0] and str(out) in lines[0], lines[0]
    if err == errno.ENOSPC:
        assert " MB free, needed ~" in lines[0], lines[0]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # no temporaries left
    assert not (out / "sizes.json").exists()
    kept = sorted(p.name for p in out.glob("*.tar"))
    assert kept and all((out / f"{name[:5]}_stats.json").is_file() for name in kept)  # finished shards stay


def test_training_on_a_full_disk_says_so_in_one_line(demo_shards, tmp_path, monkeypatch, capsys) -> None:
    import mmcl.engine.checkpoint as ckpt

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "save_file", full)  # the checkpoint's weights: the first big write of a run
    run = tmp_path / "run"
    rc = main(["train", "-", "model.preset=clip-tiny", "data.batch_size=16", "data.num_workers=0", "train.steps=2",
               "train.warmup_steps=1", "train.trackers=[none]", "train.progress=false",
               f"data.train_shards=[{demo_shards / 'train'}]", "--output-dir", str(run), "--no-eval"])  # fmt: skip
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if "error" in line]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in captured.err, captured.err[-3000:]
    assert "no space left on " in lines[0] and str(run) in lines[0] and "needed ~" in lines[0], lines[0]


def test_shards_into_a_read_only_place(tmp_path, monkeypatch, capsys) -> None:
    """The output folder cannot even be created (a read-only mount): one line naming it."""
    from pathlib import Path as RealPath

    real_mkdir = RealPath.mkdir

    def read_only(self, *args, **kwargs):
        if self.name == "shards":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(RealPath, "mkdir", read_only)
    out = tmp_path / "shards"
    rc = main(["shards", "synthetic", str(out), "--n", "10", "--image-size", "16", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert f"output folder {out} is not writable: Read-only file system" in err, err
