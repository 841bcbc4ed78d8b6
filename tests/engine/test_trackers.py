"""Logs that fit a cluster: plain progress lines when stderr is not a terminal; W&B through Accelerate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TINY = ["model.preset=clip-tiny", "data.batch_size=16", "data.num_workers=0", "train.warmup_steps=1", "train.steps=4"]


def test_plain_log_lines_when_stderr_is_not_a_terminal(demo_shards: Path, tmp_path: Path) -> None:
    args = [*TINY, f"data.train_shards=[{demo_shards / 'train'}]", f"train.output_dir={tmp_path / 'run'}",
            "train.trackers=[none]", "train.log_every=2", "train.progress=true"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "mmcl.cli", "train", "-", *args, "--no-eval"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if " step " in line and "/4 loss " in line]
    assert [line.split(" step ")[1].split()[0] for line in lines] == ["2/4", "4/4"], proc.stderr[-2000:]
    for word in ("lr", "samples/s", "eta", "skipped"):
        assert f" {word} " in lines[0], lines[0]
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr  # no progress bar in a log file


def test_wandb_offline_through_accelerate_with_loader_workers(demo_shards: Path, tmp_path: Path) -> None:
    """W&B beside the default loader (2 workers forked after wandb.init): the CLI as typed, in its own process.

    The offline `.wandb` file is read only after that process has exited: W&B's atexit teardown waits for its
    service process, so the file is complete by then (reading it after `train()` returns in this process raced
    the service's writer).
    """
    run = tmp_path / "wb"
    args = [*(a for a in TINY if not a.startswith("data.num_workers")), f"data.train_shards=[{demo_shards / 'train'}]",
            f"train.output_dir={run}", "train.trackers=[tensorboard, wandb]", "train.log_every=2",
            "train.progress=false"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, "-m", "mmcl.cli", "train", "-", *args, "--no-eval"], capture_output=True,
                          text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ForkedError" not in proc.stderr
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((run / "wandb").iterdir())
    records = next(runs[0].glob("*.wandb")).read_bytes()  # the offline run's protobuf records (synced later)
    for text in (b"clip_loss", b"samples_per_s", b"mmcl", b"train.lr"):  # metrics, the project, the config
        assert text in records, text
