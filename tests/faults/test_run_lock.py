"""One training per run folder: a second one started on it says who holds it, in one line, and writes nothing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ARGS = ["model.preset=clip-tiny", "data.batch_size=16", "data.num_workers=0", "train.warmup_steps=1",
        "train.log_every=1", "train.trackers=[none]", "train.progress=false"]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cmd(shards: Path, run: Path, steps: int) -> list[str]:
    args = [*ARGS, f"data.train_shards=[{shards}]", f"train.steps={steps}"]
    return [sys.executable, "-m", "mmcl.cli", "train", "-", *args, "--output-dir", str(run), "--no-eval"]


def test_a_second_training_on_a_busy_run_folder_is_refused(demo_shards: Path, tmp_path: Path) -> None:
    run, log = tmp_path / "run", tmp_path / "first.log"
    first = subprocess.Popen(_cmd(demo_shards / "train", run, 100000), stdout=log.open("w"), stderr=subprocess.STDOUT,
                             env=ENV)  # fmt: skip
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert first.poll() is None, log.read_text()[-3000:]
            time.sleep(0.05)
        second = subprocess.run(_cmd(demo_shards / "train", run, 3), capture_output=True, text=True, env=ENV,
                                timeout=300)  # fmt: skip
        assert second.returncode != 0
        err = [line for line in second.stderr.splitlines() if "error" in line]
        assert len(err) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert f"pid {first.pid} on {socket.gethostname()} since " in err[0], err[0]
        assert str(run) in err[0]
        assert first.poll() is None  # the first goes on, its metrics untouched by the second
        steps = [int(line.split('"step": ')[1].split(",")[0]) for line in metrics.read_text().splitlines()]
        assert steps == list(range(1, len(steps) + 1)), steps
        # A killed holder leaves its lock file, but not its lock: the same command runs.
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert (run / "train.lock").is_file()
        again = subprocess.run(_cmd(demo_shards / "train", run, 3), capture_output=True, text=True, env=ENV,
                               timeout=300)  # fmt: skip
        assert again.returncode == 0, again.stderr[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


def test_the_lock_is_released_when_a_run_ends(tmp_path: Path) -> None:
    from mmcl.utils import UserError, lock_folder

    held = lock_folder(tmp_path, "train.lock", "training")
    try:
        try:
            lock_folder(tmp_path, "train.lock", "training")
        except UserError as e:
            assert f"pid {os.getpid()}" in str(e)
        else:
            raise AssertionError("a second lock on a held folder was granted")
    finally:
        held.release()
    lock_folder(tmp_path, "train.lock", "training").release()
