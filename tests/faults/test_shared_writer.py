"""Two shard writers on one folder (two runs first using `builtin:` data in the shared cache): both end well,
and the shards are complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

N, MAXCOUNT = 6000, 200

WRITE = (
    "import sys; from mmcl.utils import setup_logging; setup_logging()\n"
    "from mmcl.data.writer import write_synthetic_shards\n"
    f"s = write_synthetic_shards(sys.argv[1], {N}, image_size=32, maxcount={MAXCOUNT}, progress=False)\n"
    "print('done', s.samples, len(s.written_shards), len(s.kept_shards))\n"
)


def _start(out: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", WRITE, str(out)], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=env)  # fmt: skip


def test_two_writers_on_one_folder_both_end_well(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    first = _start(out, tmp_path / "first.log")
    try:
        deadline = time.time() + 120  # until the first is mid-shard: its temp file is there
        while time.time() < deadline and not (out.is_dir() and any(p.suffix == ".tmp" for p in out.iterdir())):
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            time.sleep(0.01)
        second = _start(out, tmp_path / "second.log")
        assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()[-3000:]
        assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        for proc in (first, locals().get("second")):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    logs = [(tmp_path / f"{n}.log").read_text() for n in ("first", "second")]
    done = [line.split() for text in logs for line in text.splitlines() if line.startswith("done ")]
    assert [d[1] for d in done] == [str(N), str(N)], logs
    sizes = json.loads((out / "sizes.json").read_text())
    assert len(sizes) == N // MAXCOUNT and sum(sizes.values()) == N
    keys = []
    for name in sizes:
        with tarfile.open(out / name) as tar:
            keys += sorted({m.name.split(".")[0] for m in tar.getmembers()})
    assert len(keys) == len(set(keys)) == N
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
