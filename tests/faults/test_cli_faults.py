"""The CLI as a newcomer meets it: every `--help`, `--version`, outputs that are files, configs from any folder,
a warmup longer than the run."""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mmcl.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of the parser tree (`()`, `("eval",)`, `("eval", "zeroshot")`, ...), walked, not listed."""
    found = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, (*prefix, name))
    return found


COMMANDS = _commands(build_parser())


def test_the_walk_finds_every_command():
    names = {c[0] for c in COMMANDS if c}
    assert {"shards", "train", "finetune", "eval", "tokenizer", "index", "app", "export", "demo"} <= names
    assert ("eval", "compositional") in COMMANDS and ("shards", "folder") in COMMANDS and len(COMMANDS) > 20


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "mmcl")
def test_every_help_prints_and_exits_0(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([*command, "--help"])
    assert stop.value.code == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"usage: {' '.join(['mmcl', *command])}"), out[:200]
    assert err == "" and "%(" not in out and "%%" not in out and "Traceback" not in out
    assert len(out.splitlines()) >= 4 and max(len(line) for line in out.splitlines()) <= 200


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"mmcl {version('mmcl')}"


def test_train_help_shows_overrides_as_optional(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "[KEY=VALUE ...]" in out.split("\n\n")[0]  # usage line
    entry = next(line for line in out.splitlines() if line.strip().startswith("KEY=VALUE"))
    assert "optional" in entry, entry


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("source", [["synthetic", "--n", "4"], ["real", "digits"], ["folder", "SRC"], ["table", "T"]])
@pytest.mark.parametrize("where", ["file", "under_file"])
def test_shards_output_that_is_a_file(source, where, tmp_path, capsys):
    (tmp_path / "SRC").mkdir()
    (tmp_path / "SRC" / "a.png").write_bytes(b"")
    (tmp_path / "T").write_text("path,caption\n")
    some_file = tmp_path / "some_file"
    some_file.write_text("keep me")
    out = some_file if where == "file" else some_file / "shards"
    argv = ["shards", *[str(tmp_path / a) if a in ("SRC", "T") else a for a in source], str(out), "--no-progress"]
    err = _one_line_error(capsys, argv)
    assert str(some_file) in err and "not a folder" in err, err
    assert some_file.read_text() == "keep me"


@pytest.mark.parametrize("how", ["--output-dir", "override"])
def test_train_output_dir_that_is_a_file(how, tmp_path, capsys):
    some_file = tmp_path / "some_file"
    some_file.write_text("keep me")
    out = ["--output-dir", str(some_file)] if how == "--output-dir" else [f"train.output_dir={some_file}"]
    err = _one_line_error(capsys, ["train", "configs/clip/tiny.yaml", *out])
    assert str(some_file) in err and "not a folder" in err, err
    assert some_file.read_text() == "keep me"


def test_finetune_and_demo_outputs_that_are_files(tmp_path, capsys):
    some_file = tmp_path / "some_file"
    some_file.write_text("keep me")
    err = _one_line_error(capsys, ["finetune", str(tmp_path), str(tmp_path), "--out", str(some_file)])
    assert str(some_file) in err and "not a folder" in err, err
    err = _one_line_error(capsys, ["demo", "--data", str(some_file / "d")])
    assert str(some_file) in err and "not a folder" in err, err


@pytest.mark.parametrize("out", ["some_file/tok.json", "folder"])
def test_tokenizer_out_under_a_file_or_a_folder(out, tmp_path, capsys):
    (tmp_path / "caps.txt").write_text("a red square\na blue circle\n")
    (tmp_path / "some_file").write_text("keep me")
    (tmp_path / "folder").mkdir()
    err = _one_line_error(capsys, ["tokenizer", "train", str(tmp_path / "caps.txt"), "--out", str(tmp_path / out)])
    assert str(tmp_path / out.split("/")[0]) in err and ("not a folder" in err or "not a file" in err), err
    assert (tmp_path / "some_file").read_text() == "keep me" and not any((tmp_path / "folder").iterdir())


def _run_mmcl(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    code = f"import sys; from mmcl.cli import main; sys.exit(main({args!r}))"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_shipped_config_resolves_outside_the_repository(tmp_path, demo_shards):
    """README's first training command from another folder: the shipped configs/clip/tiny.yaml is used, and said so."""
    done = _run_mmcl(
        ["train", "configs/clip/tiny.yaml", f"data.train_shards=[{demo_shards / 'train'}]", "data.batch_size=8",
         "train.steps=1", "train.trackers=[none]", "train.progress=false", "--no-eval"],
        tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    shipped = (ROOT / "configs" / "clip" / "tiny.yaml").resolve()
    assert "configs/clip/tiny.yaml" in done.stderr and str(shipped) in done.stderr, done.stderr[-2000:]
    assert (tmp_path / "runs" / "clip-tiny" / "final").is_dir()  # output_dir stays relative to where it ran


def test_a_config_in_the_current_folder_wins_over_the_shipped_one(tmp_path, monkeypatch):
    from mmcl.config import load_experiment

    (tmp_path / "configs" / "clip").mkdir(parents=True)
    (tmp_path / "configs" / "clip" / "tiny.yaml").write_text("train:\n  steps: 7\n  warmup_steps: 1\n")
    monkeypatch.chdir(tmp_path)
    assert load_experiment("configs/clip/tiny.yaml").train.steps == 7


def test_missing_config_still_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = _one_line_error(capsys, ["train", "configs/clip/tinny.yaml"])
    assert "configs/clip/tinny.yaml" in err and "not found" in err


def test_installed_wheel_resolves_the_shipped_configs(tmp_path):
    """configs/ (top level of the repository) is package data of the wheel, as mmcl/configs/, and an installed
    wheel (no checkout around it) resolves `configs/clip/tiny.yaml` from any folder to its own copy."""
    import zipfile

    env = {**os.environ, "PIP_NO_INDEX": "1"}
    env.pop("PYTHONPATH", None)
    pip = [sys.executable, "-m", "pip", "-q"]
    src = tmp_path / "src"  # a copy: building in the checkout would reuse a stale build/ folder
    top_level_outputs = {"build", "runs", "data", "mmcl.egg-info"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        top = Path(folder) == ROOT
        return {n for n in names if n.startswith(".") or n == "__pycache__" or (top and n in top_level_outputs)}

    shutil.copytree(ROOT, src, ignore=ignore)
    done = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "w"), str(src)],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = next((tmp_path / "w").glob("mmcl-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml")}
    assert shipped and {f"mmcl/{p}" for p in shipped} <= names
    assert not any(n.startswith("configs/") for n in names)  # no top-level `configs` package in site-packages
    assert {"mmcl/models/configs/clip-tiny.yaml", "mmcl/eval/templates/openai.txt"} <= names

    site = tmp_path / "site"
    done = subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    code = "from mmcl.config import load_experiment as l, resolve_experiment_path as r; import sys; "
    code += "p = r('configs/clip/tiny.yaml'); print(p); print(l(p).train.output_dir)"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": str(site)})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(site / "mmcl" / "configs" / "clip" / "tiny.yaml"), "runs/clip-tiny"]


def test_pyproject_lists_every_subpackage():
    """pyproject.toml lists the packages (so configs/ can ship inside mmcl): none on disk may be missing."""
    from setuptools import find_packages

    block = re.search(r"^packages = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), flags=re.S | re.M).group(1)
    listed = set(re.findall(r'"([\w.]+)"', block))
    assert set(find_packages(str(ROOT), include=["mmcl*"])) | {"mmcl.configs"} == listed


@pytest.mark.parametrize(
    "argv_overrides, steps, warmup",
    [(["train.steps=20"], 20, 4), (["train.steps=200"], 200, 20), (["train.steps=30", "train.warmup_steps=30"], 30, 6)],
)
def test_warmup_is_capped_at_a_fifth_of_the_run(argv_overrides, steps, warmup, caplog):
    """The shipped tiny config (warmup 20) with the README's kind of short run, and finetune's defaults (30/30)."""
    from mmcl.config import load_experiment

    with caplog.at_level(logging.WARNING, logger="mmcl"):
        cfg = load_experiment("configs/clip/tiny.yaml", argv_overrides)
    assert (cfg.train.steps, cfg.train.warmup_steps) == (steps, warmup)
    warned = [r.getMessage() for r in caplog.records if "warmup" in r.getMessage()]
    if warmup == 20:
        assert not warned
    else:
        assert len(warned) == 1 and f"{warmup} steps" in warned[0] and "\n" not in warned[0], warned


def test_finetune_defaults_warm_up_a_fifth(tmp_path, caplog):
    """`mmcl finetune --steps 30` with the default --warmup-steps 30: the config it trains with."""
    from mmcl.cli.finetune import register
    from mmcl.config import ExperimentConfig, from_dict

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["finetune", "start", "shards", "--out", str(tmp_path), "--steps", "30"])
    with caplog.at_level(logging.WARNING, logger="mmcl"):
        cfg = from_dict(ExperimentConfig, {"train": {"steps": args.steps, "warmup_steps": args.warmup_steps}})
    assert cfg.train.warmup_steps == 6 and any("warmup" in r.getMessage() for r in caplog.records)


def test_readme_first_line_is_the_demo():
    first = re.search(r"```bash\n(.*?)\n", (ROOT / "README.md").read_text()).group(1)
    assert first.split("#")[0].strip() == "bash pipelines/demo.sh"
