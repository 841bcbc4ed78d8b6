"""Logs that fit a cluster: plain progress lines when stderr is not a terminal; W&B through Accelerate."""

from __future__ import annotations

import os
import re
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
    # a first line at step 1 (a log file is not silent for log_every steps), then every log_every steps
    assert [line.split(" step ")[1].split()[0] for line in lines] == ["1/4", "2/4", "4/4"], proc.stderr[-2000:]
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


def test_tensorboard_tags_are_grouped_and_hparams_stay_in_the_run(demo_shards: Path, tmp_path: Path) -> None:
    """open_clip's `train/...` and `eval/...` tags; the config as hparams of the run itself (Accelerate's
    `add_hparams` opened a second, timestamped run in the run's TensorBoard folder)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mmcl.config import load_experiment
    from mmcl.engine.trainer import train

    run = tmp_path / "tb"
    args = [*(a for a in TINY if not a.startswith("data.num_workers")), f"data.train_shards=[{demo_shards / 'train'}]",
            f"train.output_dir={run}", "train.trackers=[tensorboard]", "train.log_every=2", "train.eval_every=2",
            "train.progress=false"]  # fmt: skip
    train(load_experiment(None, args), eval_hook=lambda model, step: {"top1": 0.5})
    board = run / "tensorboard"
    assert [p for p in board.rglob("*") if p.is_dir()] == [], sorted(board.rglob("*"))  # one run, no sub-runs
    events = EventAccumulator(str(board))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/loss" in tags and "train/lr" in tags and "eval/top1" in tags, tags
    assert all(t.split("/")[0] in ("train", "eval") for t in tags), tags
    assert "_hparams_/experiment" in events.Tags()["tensors"] or "_hparams_/experiment" in str(
        events.PluginTagToContent("hparams")
    )


def test_eval_lines_are_not_glued_onto_the_training_bar(demo_shards: Path, tmp_path: Path) -> None:
    """On a terminal (a pty here) the bar is drawn with carriage returns; a log line must start a line of its own."""
    import fcntl
    import pty
    import struct
    import termios

    args = [*TINY, f"data.train_shards=[{demo_shards / 'train'}]", f"train.output_dir={tmp_path / 'run'}",
            "train.trackers=[none]", "train.log_every=2", "train.eval_every=2", "train.progress=true"]  # fmt: skip
    script = (
        "import sys\nfrom mmcl.config import load_experiment\nfrom mmcl.engine.trainer import train\n"
        "from mmcl.utils import setup_logging\nsetup_logging()\n"
        f"train(load_experiment(None, {args!r}), eval_hook=lambda model, step: {{'top1': 0.5}})\n"
    )
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=follower, stdout=follower, stderr=follower,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    os.close(follower)
    out = b""
    while True:  # read until the child closes the terminal (it has exited)
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: no process holds the pty any more
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert proc.wait(timeout=300) == 0, out.decode(errors="replace")[-3000:]
    text = out.decode(errors="replace")
    assert "train:" in text and "\r" in text, text[-2000:]  # a bar was drawn
    eval_lines = [piece for piece in re.split(r"[\r\n]", text) if " eval: " in piece]
    assert len(eval_lines) == 2, text[-3000:]
    for piece in eval_lines:  # the line holds the log record alone, no bar text before it
        assert re.match(r"(\x1b\[A)*\d\d:\d\d:\d\d mmcl INFO step \d eval: ", piece.lstrip("\x1b[K ")), repr(piece)
