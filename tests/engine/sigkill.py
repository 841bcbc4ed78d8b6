"""Kill -9 a training run after a checkpoint, run the same command again, and compare its metrics with
an uninterrupted run's (the exact-resume tests of the trainer and of plug-in loss terms)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmcl.engine.checkpoint import list_checkpoints
from mmcl.engine.metrics import read_metrics

Launch = Callable[[list[str], Path], subprocess.Popen]


def launch_cli(args: list[str], log: Path, prelude: str = "") -> subprocess.Popen:
    """`mmcl train - ARGS` in a fresh process; `prelude` is Python run first (e.g. importing a plug-in term)."""
    script = f"{prelude}\nimport sys\nfrom mmcl.cli import main\nsys.exit(main(['train', '-', *{args!r}]))"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", script], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def straight_and_resumed(
    args: list[str], tmp: Path, steps: int, kill_after: int, launch: Launch = launch_cli
) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """Metrics by step of an uninterrupted run and of one SIGKILLed after its checkpoint at `kill_after`
    (or later) and run again with the same command."""
    straight = launch([*args, f"train.output_dir={tmp / 'a'}"], tmp / "a.log")
    assert straight.wait(timeout=300) == 0, (tmp / "a.log").read_text()[-2000:]
    killed_dir = tmp / "b"
    victim = launch([*args, f"train.output_dir={killed_dir}"], tmp / "b1.log")
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        done = list_checkpoints(killed_dir / "checkpoints")
        if done and int(done[-1].name.split("_")[1]) >= kill_after:
            break
        time.sleep(0.02)
    assert victim.poll() is None, "the run ended before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert int(list_checkpoints(killed_dir / "checkpoints")[-1].name.split("_")[1]) < steps
    resumed = launch([*args, f"train.output_dir={killed_dir}"], tmp / "b2.log")
    assert resumed.wait(timeout=300) == 0, (tmp / "b2.log").read_text()[-2000:]
    assert "resumed from" in (tmp / "b2.log").read_text()
    a = {r["step"]: r for r in read_metrics(tmp / "a" / "metrics.jsonl")}
    b = {r["step"]: r for r in read_metrics(killed_dir / "metrics.jsonl")}
    return a, b
