"""The training loop: run folder contents, exact resume after SIGKILL, non-finite steps, multi-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sigkill import straight_and_resumed

from mmcl.config import load_experiment
from mmcl.engine.checkpoint import list_checkpoints
from mmcl.engine.metrics import read_metrics
from mmcl.engine.trainer import Trainer, train

TINY = [
    "model.preset=clip-tiny",
    "train.trackers=[none]",
    "train.progress=false",
    "train.warmup_steps=2",
    "train.lr=1e-3",
    "data.batch_size=16",
    "data.num_workers=0",
    "data.shuffle_buffer=32",
]


def experiment(shards: Path, out: Path, *extra: str):
    return load_experiment(None, [*TINY, f"data.train_shards=[{shards / 'train'}]", f"train.output_dir={out}", *extra])


def test_run_folder_has_everything(demo_shards, tmp_path):
    cfg = experiment(
        demo_shards,
        tmp_path / "run",
        "train.steps=6",
        "train.log_every=2",
        "train.ckpt_every=2",
        "train.keep_checkpoints=2",
        "train.grad_accum=2",
    )
    result = train(cfg)
    run = tmp_path / "run"
    assert result.step == 6
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["samples_per_s"] > 0 for r in rows)
    assert rows[-1]["samples"] == 6 * 16 * 2
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_0000004", "step_0000006"]
    assert not list((run / "checkpoints").glob(".*tmp"))
    for name in ("config.yaml", "curves.png", "final/model.safetensors", "final/config.yaml"):
        assert (run / name).is_file(), name


def test_resume_after_sigkill_reproduces_the_curve(demo_shards, tmp_path):
    """Kill -9 mid-run, run the same command again: every logged loss equals the uninterrupted run's."""
    common = [
        *TINY,
        f"data.train_shards=[{demo_shards / 'train'}]",
        "data.num_workers=2",
        "train.steps=24",
        "train.log_every=1",
        "train.ckpt_every=3",
        "--no-eval",
    ]
    a, b = straight_and_resumed(common, tmp_path, steps=24, kill_after=6)
    assert sorted(a) == sorted(b) == list(range(1, 25))
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5, abs=1e-6), step


def test_non_finite_steps_are_skipped_then_stop(demo_shards, tmp_path, monkeypatch):
    cfg = experiment(demo_shards, tmp_path / "nan", "train.steps=8", "train.log_every=1", "train.max_bad_steps=3")
    trainer = Trainer(cfg)
    task = trainer.task
    original = task.step
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] in (2, 3) or calls["n"] >= 5:
            for p in task.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        return out

    monkeypatch.setattr(task, "step", poisoned)
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    with pytest.raises(RuntimeError, match="3 steps in a row had a non-finite loss or gradient"):
        trainer.fit()
    rows = read_metrics(tmp_path / "nan" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 4]  # steps 2 and 3 were skipped, 5-7 stopped the run
    assert rows[-1]["bad_steps"] == 2
    after = task.model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_missing_shards_give_a_one_line_error(tmp_path, capsys):
    from mmcl.cli import main

    code = main(
        [
            "train",
            "-",
            "model.preset=clip-tiny",
            f"data.train_shards=[{tmp_path}/none/*.tar]",
            f"train.output_dir={tmp_path}/run",
            "train.trackers=[none]",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"mmcl train: error: shard pattern '{tmp_path}/none/*.tar' matches no .tar file"]


def test_two_processes_split_the_data(demo_shards, tmp_path):
    """torchrun with 2 gloo processes on CPU: both train, and their data positions cover disjoint halves."""
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "mmcl.cli",
        "train",
        "-",
        *TINY,
        f"data.train_shards=[{demo_shards / 'train'}]",
        "data.shuffle_buffer=0",
        "train.steps=4",
        "train.ckpt_every=4",
        f"train.output_dir={out}",
        "--no-eval",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ckpt = list_checkpoints(out / "checkpoints")[-1]
    assert json.loads((ckpt / "trainer.json").read_text())["num_processes"] == 2
    consumed = [json.loads((ckpt / f"rank{r}.json").read_text())["data"]["consumed"] for r in range(2)]
    assert sum(sum(c.values()) for c in consumed) == 2 * 4 * 16  # every sample used once: 2 ranks x 4 steps x 16
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[-1]["samples"] == 4 * 16 * 2


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_curves_are_a_readable_grid(tmp_path):
    """Five panels (loss, accuracy, eval, lr, throughput) in a grid, not a 2475x396 strip."""
    from PIL import Image

    from mmcl.engine.metrics import plot_curves

    rows = [{"step": s, "loss": 1 / s, "acc": s / 10, "lr": 1e-3, "samples_per_s": 100.0} for s in range(1, 6)]
    rows.append({"step": 5, "eval_top1": 0.5})
    with Image.open(plot_curves(rows, tmp_path / "curves.png", title="run")) as im:
        width, height = im.size
    assert width <= 1600 and width / height < 2.5, (width, height)
