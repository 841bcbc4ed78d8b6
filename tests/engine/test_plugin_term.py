"""A new objective is one file: the throwaway term of `plugin_term.py` (registered there, nowhere in mmcl)
is configured by name, gets its loader view, trains with accumulation, and its state is checkpointed:
resumed after SIGKILL it reproduces every logged loss; a checkpoint without its state is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from plugin_term import NAME
from safetensors.torch import load_file
from sigkill import launch_cli, straight_and_resumed

from mmcl.config import load_experiment
from mmcl.engine.checkpoint import TASK_STATE, list_checkpoints
from mmcl.engine.metrics import read_metrics
from mmcl.engine.trainer import Trainer, train
from mmcl.utils import UserError

HERE = Path(__file__).parent
TERMS = f"loss.terms=[clip, {{name: {NAME}, weight: 0.5, dim: 8}}]"
TINY = [
    "model.preset=clip-tiny",
    "train.trackers=[none]",
    "train.progress=false",
    "train.warmup_steps=2",
    "train.lr=1e-3",
    "data.batch_size=16",
    "data.shuffle_buffer=32",
    "train.log_every=1",
    TERMS,
]


def test_term_trains_with_accumulation_and_its_state_is_checkpointed(demo_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [*TINY, f"data.train_shards=[{demo_shards / 'train'}]", f"train.output_dir={out}", "data.num_workers=0"]
    cfg = load_experiment(None, [*args, "train.steps=6", "train.ckpt_every=3", "train.grad_accum=2"])
    trainer = Trainer(cfg)
    term = trainer.task.terms[NAME]
    assert "image_aug2" in trainer.task.views() and term.options.dim == 8
    head_before = term.head.weight.detach().clone()
    result = trainer.fit()
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(f"{NAME}_loss" in r and "clip_loss" in r and "view_acc" in r for r in rows)
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["clip_loss"] + 0.5 * rows[-1][f"{NAME}_loss"], rel=1e-5)
    assert int(term.updates) == result.step == 6 and not torch.equal(term.head.weight, head_before)
    saved = load_file(str(list_checkpoints(out / "checkpoints")[-1] / TASK_STATE))
    assert set(saved) == {
        f"terms.{NAME}.head.weight",
        f"terms.{NAME}.head.bias",
        f"terms.{NAME}.center",
        f"terms.{NAME}.updates",
    }
    assert int(saved[f"terms.{NAME}.updates"]) == 6
    torch.testing.assert_close(saved[f"terms.{NAME}.center"], term.center)

    # resume (2 more steps): the state comes back from the checkpoint, not freshly initialised
    more = load_experiment(None, [*args, "train.steps=8", "train.ckpt_every=3", "train.grad_accum=2"])
    resumed = Trainer(more)
    resumed.fit(stop_after=0)
    assert int(resumed.task.terms[NAME].updates) == 6
    torch.testing.assert_close(resumed.task.terms[NAME].center, term.center)

    # a checkpoint without the term's state (written by a run without the term) is an error, not a silent
    # re-initialisation of the head and buffers
    other = tmp_path / "clip-only"
    clip_only = [a for a in args if a not in (TERMS,) and not a.startswith("train.output_dir")]
    train(load_experiment(None, [*clip_only, f"train.output_dir={other}", "train.steps=2", "loss.terms=[clip]"]))
    with_term = load_experiment(None, [*args[:-2], f"train.output_dir={other}", "data.num_workers=0", "train.steps=4"])
    with pytest.raises(UserError, match="task_state.safetensors"):
        Trainer(with_term).fit(stop_after=0)


def test_unknown_term_and_option_name_the_closest(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=f"did you mean '{NAME}'"):
        load_experiment(None, ["loss.terms=[test_head_trm]"])
    with pytest.raises(UserError, match=r"loss.terms\[0\].dimm' \(did you mean 'loss.terms\[0\].dim'"):
        load_experiment(None, [f"loss.terms=[{{name: {NAME}, dimm: 3}}]"])


def test_resume_after_sigkill_reproduces_every_loss(demo_shards: Path, tmp_path: Path) -> None:
    common = [
        *TINY,
        f"data.train_shards=[{demo_shards / 'train'}]",
        "data.num_workers=1",
        "train.steps=12",
        "train.ckpt_every=3",
        "train.grad_accum=2",
        "--no-eval",
    ]
    prelude = f"import sys; sys.path.insert(0, {str(HERE)!r}); import plugin_term"  # as a user's plug-in would be

    def launch(args: list[str], log: Path):
        return launch_cli(args, log, prelude)

    a, b = straight_and_resumed(common, tmp_path, steps=12, kill_after=3, launch=launch)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        for key in ("loss", "clip_loss", f"{NAME}_loss"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-6), (step, key)
