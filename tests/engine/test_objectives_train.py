"""Every objective trains through the real trainer: all terms mixed, with accumulation, resumed to the
same losses (their heads, momentum towers and queues restored), and under 2 gloo processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmcl.config import load_experiment
from mmcl.engine.checkpoint import TASK_STATE, list_checkpoints
from mmcl.engine.metrics import read_metrics
from mmcl.engine.trainer import Trainer
from mmcl.tasks.setups import all_setups, mixed

# every registered term on the CLIP preset, each with its own toy setup (`LossTerm.test_setup`), all together
MIX = mixed([s for s in all_setups().values() if s.preset == "clip-tiny"])
ARGS = [
    *MIX.config(),
    "train.trackers=[none]",
    "train.progress=false",
    "train.warmup_steps=2",
    "train.lr=1e-3",
    "train.log_every=1",
    "train.grad_accum=2",
    "data.batch_size=8",
    "data.shuffle_buffer=16",
]


def test_the_mix_covers_the_registry() -> None:
    names = {t.name for t in load_experiment(None, MIX.config()).loss.terms}
    other_presets = {n for n, s in all_setups().items() if s.preset != "clip-tiny"}
    assert names == set(all_setups()) - other_presets and len(names) >= 9, names


def _cfg(shards: Path, out: Path, steps: int):
    return load_experiment(None, [*ARGS, f"data.train_shards=[{shards / 'train'}]", "data.num_workers=0",
                                  f"train.output_dir={out}", f"train.steps={steps}", "train.ckpt_every=3"])  # fmt: skip


def test_all_terms_resume_to_the_same_losses(demo_shards: Path, tmp_path: Path) -> None:
    Trainer(_cfg(demo_shards, tmp_path / "a", 6)).fit()
    Trainer(_cfg(demo_shards, tmp_path / "b", 6)).fit(stop_after=3)
    Trainer(_cfg(demo_shards, tmp_path / "b", 6)).fit()  # a new process would do the same: state from disk
    a = {r["step"]: r for r in read_metrics(tmp_path / "a" / "metrics.jsonl")}
    b = {r["step"]: r for r in read_metrics(tmp_path / "b" / "metrics.jsonl")}
    assert sorted(a) == sorted(b) == list(range(1, 7))
    keys = [k for k in a[6] if k.endswith("_loss")]
    assert sorted(keys) == sorted(f"{n}_loss" for n in MIX.names), keys
    for step in a:
        for key in ["loss", *keys]:
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-5), (step, key)
    queues = [k for k in a[6] if k.endswith("queue")]  # 'queue', or '<term>_queue' where terms share the name
    assert queues and all(a[6][k] > 0 for k in queues), queues  # queues filled across steps


def test_all_terms_train_on_two_processes(demo_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "mmcl.cli", "train", "-", *ARGS, f"data.train_shards=[{demo_shards / 'train'}]", "data.num_workers=0",
           "train.steps=3", "train.ckpt_every=3", f"train.output_dir={out}", "--no-eval"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ckpt = list_checkpoints(out / "checkpoints")[-1]
    assert json.loads((ckpt / "trainer.json").read_text())["num_processes"] == 2
    from safetensors.torch import load_file

    state = load_file(str(ckpt / TASK_STATE))
    # 3 steps x 2 micro-batches x 8 samples x 2 ranks = 96 keys pushed into every queue of every term
    queues = [k.removesuffix(".filled") for k in state if k.endswith("queue.filled")]
    assert queues and all(int(state[f"{q}.filled"]) == min(96, state[f"{q}.feats"].shape[0]) for q in queues), queues
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in rows)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
