"""A new objective is one file: the throwaway term of `plugin_term.py` (registered there, nowhere in mmcl)
is configured by name, gets its loader view, trains with accumulation, and its state is checkpointed:
resumed after SIGKILL it reproduces every logged loss; a checkpoint without its state is refused. The same
file kept in a user's own folder trains through `mmcl train` with `loss.plugins`, or is found through the
`mmcl.losses` entry-point group of an installed distribution; a wrong feature name is one line naming the term."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    assert f"{NAME}/image_aug2" in trainer.task.views() and term.options.dim == 8
    assert type(term.options) is type(term).Options  # the term gets its own options class, not the registry's copy
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


def _user_folder(tmp_path: Path) -> Path:
    """A user's repository outside mmcl: a package holding the term file, under another term name."""
    root = tmp_path / "user_repo"
    (root / "my_terms").mkdir(parents=True)
    (root / "my_terms" / "__init__.py").write_text("")
    source = (HERE / "plugin_term.py").read_text().replace(f'NAME = "{NAME}"', 'NAME = "user_head_term"')
    (root / "my_terms" / "head.py").write_text(source)
    return root


def _env(*paths: Path) -> dict[str, str]:
    repo = Path(__file__).resolve().parents[2]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), *map(str, paths)]), "OMP_NUM_THREADS": "1"}


def test_a_term_in_the_users_folder_trains_through_the_cli(demo_shards: Path, tmp_path: Path) -> None:
    root, out = _user_folder(tmp_path), tmp_path / "run"
    args = [a for a in TINY if not a.startswith("loss.terms")] + [
        "loss.plugins=[my_terms.head]",
        "loss.terms=[clip, {name: user_head_term, weight: 0.5, dim: 8}]",
        f"data.train_shards=[{demo_shards / 'train'}]",
        f"train.output_dir={out}",
        "train.steps=2",
        "train.ckpt_every=2",
        "train.grad_accum=2",
    ]
    cmd = [sys.executable, "-m", "mmcl.cli", "train", "-", *args, "--no-eval"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(root), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all("user_head_term_loss" in r for r in rows)
    saved = load_file(str(list_checkpoints(out / "checkpoints")[-1] / TASK_STATE))
    assert int(saved["terms.user_head_term.updates"]) == 2  # its on_step_end ran, its state was checkpointed

    # without loss.plugins the term is unknown: one line, no traceback
    bad = [a for a in args if not a.startswith("loss.plugins")]
    proc = subprocess.run([*cmd[:5], *bad], capture_output=True, text=True, timeout=600, env=_env(root), cwd=tmp_path)
    assert proc.returncode != 0 and "unknown loss term 'user_head_term'" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([*cmd[:5], *args[:-5], "loss.plugins=[my_terms.nope]"], capture_output=True, text=True,
                          timeout=600, env=_env(root), cwd=tmp_path)  # fmt: skip
    assert proc.returncode != 0 and "loss.plugins[0]: no module 'my_terms.nope'" in proc.stderr


def test_an_installed_distribution_adds_terms_through_its_entry_point(tmp_path: Path) -> None:
    root = _user_folder(tmp_path)
    dist = root / "my_terms-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-terms\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mmcl.losses]\nhead = my_terms.head\n")
    code = (
        "import json, sys\n"
        "from mmcl.config import load_experiment\n"
        "cfg = load_experiment(None, ['loss.terms=[clip, {name: user_head_term, dim: 4}]'])\n"
        "print(json.dumps([cfg.loss.terms[1].options.dim, 'torch' in sys.modules]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=_env(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [4, False]  # typed options, torch not imported


def test_a_wrong_feature_name_is_one_line_naming_the_term() -> None:
    from mmcl.tasks.task import TermScope

    scope = TermScope(
        NAME, "feature", {f"{NAME}/head_a": 1, "other/head_b": 2, "image_features": 3}, {"image_features": 3}
    )
    assert scope["head_a"] == 1 and scope["image_features"] == 3 and "head_b" not in scope
    with pytest.raises(KeyError) as err:
        scope["head_aa"]
    assert str(err.value) == f"loss term '{NAME}' has no feature 'head_aa'; it has ['head_a', 'image_features']"
    assert isinstance(err.value, UserError)
