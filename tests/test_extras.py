"""Extras: without gradio and faiss (the core install) mmcl trains and evaluates; commands needing the
[app] extra fail with one line naming it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Hide the [app] extra's packages from the child process, as if they were not installed.
BLOCK = "import sys; sys.modules['gradio'] = None; sys.modules['faiss'] = None; from mmcl.cli import main; "


def _mmcl_without_app(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    code = BLOCK + f"sys.exit(main({args!r}))"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_core_install_trains_and_evaluates(demo_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train = _mmcl_without_app(
        ["train", "-", "model.preset=clip-tiny", f"data.train_shards=[{demo_shards / 'train'}]", "data.batch_size=16",
         "data.num_workers=0", "train.steps=2", "train.warmup_steps=1", "train.trackers=[none]",
         "train.progress=false", f"train.output_dir={run}", "--no-eval"],
        REPO,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr
    ev_args = ["eval", "zeroshot", str(run), "--shards", str(demo_shards / "val"), "--out", str(tmp_path / "ev")]
    ev = _mmcl_without_app([*ev_args, "--quiet"], REPO)
    assert ev.returncode == 0, ev.stderr


def test_app_commands_name_the_missing_extra(tmp_path: Path) -> None:
    for args in (["app", str(tmp_path)], ["index", "build", str(tmp_path), "--out", str(tmp_path / "i"), "--run", "x"]):
        res = _mmcl_without_app(args, REPO)
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert "'app' extra" in lines[0] and f"pip install -e '.[app]' (in {REPO})" in lines[0], lines[0]


def test_demo_names_the_missing_extra(tmp_path: Path) -> None:
    res = _mmcl_without_app(["demo", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "data")], REPO)
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "'app' extra" in lines[0] and f"pip install -e '.[app]' (in {REPO})" in lines[0], lines[0]
    assert not (tmp_path / "data").exists()  # stopped before writing anything


def test_hint_outside_a_checkout_names_the_packages(monkeypatch) -> None:
    """A wheel installed without its checkout: the extra's packages from the installed metadata (not on PyPI)."""
    from mmcl import extras

    monkeypatch.setattr(extras, "_checkout", lambda: None)
    hint = extras.install_hint("app")
    assert hint.startswith("pip install ") and "'faiss-cpu'" in hint and "'gradio>=6'" in hint, hint


def test_pyproject_extras() -> None:
    text = (REPO / "pyproject.toml").read_text()
    core = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "gradio" not in core and "faiss" not in core
    assert 'app = ["gradio>=6", "gradio_client", "faiss-cpu"]' in text and '"mmcl[app,wandb]"' in text
