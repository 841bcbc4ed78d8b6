"""`mmcl train` as a process: its loader workers die with it, and Ctrl-C ends it in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CONFIG = str(Path(__file__).parents[2] / "configs" / "clip" / "tiny.yaml")  # as shipped: one loader worker
ARGS = ["train.steps=100000", "train.log_every=1", "train.ckpt_every=100000", "train.trackers=[none]"]


@pytest.fixture(scope="module")
def long_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of 1000 samples like the built-in ones: the worker is mid-shard, busy, when its parent dies."""
    from mmcl.data.writer import write_synthetic_shards

    out = tmp_path_factory.mktemp("long") / "train"
    write_synthetic_shards(out, 2000, image_size=32, maxcount=1000, progress=False)
    return out


def _launch(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "mmcl.cli", "train", CONFIG, *args, "--no-eval"]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def _children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is `pid`, from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_training(proc: subprocess.Popen, run: Path, log: Path, min_steps: int = 1, timeout: float = 300) -> None:
    """Until metrics.jsonl holds `min_steps` steps: the loader's workers exist and have delivered batches."""
    deadline = time.time() + timeout
    metrics = run / "metrics.jsonl"
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= min_steps:
            return
        time.sleep(0.05)
    raise AssertionError(f"no training step in {timeout} s: {log.read_text()[-3000:]}")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_loader_workers_die_with_a_killed_trainer(long_shards: Path, tmp_path: Path, sig: signal.Signals) -> None:
    run, log = tmp_path / "run", tmp_path / "train.log"
    proc = _launch([*ARGS, f"data.train_shards=[{long_shards}]", f"train.output_dir={run}"], log)
    workers: list[int] = []
    try:
        _wait_training(proc, run, log)
        workers = _children(proc.pid)
        assert len(workers) == 1, workers  # the shipped config's loader worker
        proc.send_signal(sig)
        proc.wait(timeout=60)
        deadline = time.time() + 20
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.05)
        left = [w for w in workers if _alive(w)]
        assert not left, f"loader workers {left} outlived their parent (signal {sig.name})"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for w in workers:  # this test's own leftovers, should the assertion fail
            if _alive(w):
                os.kill(w, signal.SIGKILL)


def test_ctrl_c_says_where_it_stopped_and_how_to_resume_in_one_line(long_shards: Path, tmp_path: Path) -> None:
    run, log = tmp_path / "run", tmp_path / "train.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = [*ARGS, f"data.train_shards=[{long_shards}]", f"train.output_dir={run}", "train.ckpt_every=2"]
    cmd = [sys.executable, "-m", "mmcl.cli", "train", CONFIG, *args, "--no-eval"]
    # Its own process group, signalled as a whole: what Ctrl-C in a terminal does (the loader worker gets it too).
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_training(proc, run, log, min_steps=3)
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = log.read_text()
    assert rc == 130, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    lines = [line for line in out.splitlines() if "interrupted" in line]
    assert len(lines) == 1, out[-3000:]
    assert "interrupted at step " in lines[0] and "last checkpoint: step " in lines[0], lines[0]
    assert f"resume with: mmcl train {CONFIG} train.steps=100000" in lines[0], lines[0]
    # the command it names resumes the run
    resumed = subprocess.run([*cmd[:-1], "train.steps=4", "--no-eval"], capture_output=True, text=True, env=env,
                             timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
