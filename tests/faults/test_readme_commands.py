"""Every command shown in README.md and in pipelines/ runs as written, on tiny data or up to the point of real work.

Commands are taken from the files themselves (bash blocks of the README, the usage lines in the pipeline
scripts' headers), so a drifting example fails here. Each runs in its own folder holding tiny inputs
(`photos/`, `pairs.parquet`, `data/demo/val`, a `runs/demo` trained here). What "as written" allows:

- `mmcl ...` commands run in this process through `mmcl.cli.main` on the shell's words (`shlex`); `mmcl train`
  commands that would train get `TINY` overrides appended (tiny shards, 2 steps), `--n 20000` becomes `--n 64`;
  the web-scale ones stop, as they must here, at the one-line "shard pattern ... not found".
- `mmcl app runs/demo` serves on a free port (7860 may be taken) without blocking, and answers a request.
- Scripts run with bash; where they would launch a cluster job (`srun`, `accelerate launch`) a stand-in on
  PATH records the argv bash built, and the mmcl part of it then runs as above. The README's `accelerate
  launch` and `torchrun` lines: accelerate reads the config file, torch's parser the flags, and the mmcl part
  runs here (multi-process training itself is tested in tests/engine). `demo.sh` and `test.sh` run
  with `--help` / `--collect-only` appended (their "$@"), so they check the install and stop; `setup.sh`
  runs as written (installed already, it only checks).
- Commands quoted in the prose (`mmcl app RUN --allow-runs RUN2 RUN3`, `python -m bench.bench_train --phases
  throughput`) must exist as written: the mmcl command path and its options parse, a script's `--help` lists
  the options quoted. Every command's own `--help` is run in test_cli_faults.py.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mmcl.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
SHARDS = "/data/laion/{00000..41407}.tar"
SMALLER = {"--n 20000": "--n 64"}
STEPS = ["train.steps=2", "data.batch_size=16", "data.num_workers=0", "train.log_every=1", "eval.max_samples=64"]
ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _readme_commands() -> list[str]:
    """Each command of the README's bash blocks; a block of numbered steps (`# 1.`) that build on each other
    is one command, run as a script (`GUIDE` + its text)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    commands = []
    for block in blocks:
        if "# 1." in block:
            commands.append(GUIDE + block)
            continue
        lines = [line.split("  #")[0].strip() for line in block.replace("\\\n", " ").splitlines()]
        commands += [line for line in lines if line and not line.startswith("#")]
    return commands


GUIDE = "guide:"


def _script_usages() -> list[str]:
    """The usage lines in the scripts' header comments (`#   bash pipelines/x.sh ARGS  (note)`)."""
    found = []
    for script in sorted((ROOT / "pipelines").glob("*.s*")):
        for line in script.read_text().splitlines():
            m = re.match(r"#\s+((?:bash|sbatch)\b.*?pipelines/\S+.*?)(?:\s+[\[(].*)?$", line)
            if m:
                found.append(m.group(1).strip())
    return found


COMMANDS = list(dict.fromkeys(_readme_commands() + _script_usages()))


def _mmcl_argv(words: list[str]) -> list[str] | None:
    """The argv after `mmcl` / `-m mmcl.cli` / `.venv/bin/mmcl`, or None."""
    for i, word in enumerate(words):
        if word in ("mmcl", ".venv/bin/mmcl") or (word == "mmcl.cli" and words[i - 1] == "-m"):
            return [w for w in words[i + 1 :] if w != "..."]
    return None


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, demo_shards) -> Path:
    """Tiny inputs the commands name, `runs/demo` trained with the demo's config and `runs/clip-tiny` with the
    README's first train command."""
    from PIL import Image

    root = tmp_path_factory.mktemp("readme")
    (root / "data").mkdir()
    (root / "data" / "demo").symlink_to(demo_shards)
    (root / "configs").symlink_to(ROOT / "configs")
    photos = root / "photos"
    photos.mkdir()
    rows = []
    for i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (24, 24), colour).save(photos / f"{colour}.jpg")
        (photos / f"{colour}.txt").write_text(f"a {colour} square")
        rows.append({"path": str(photos / f"{colour}.jpg"), "caption": f"a {colour} square {i}"})
    import pandas as pd

    pd.DataFrame(rows).to_parquet(root / "pairs.parquet")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        # runs/demo as `mmcl demo` makes it (the demo's recipe: a CNN the open_clip exporter refuses), and the
        # ViT that README's `mmcl train configs/clip/tiny.yaml` writes to runs/clip-tiny
        assert main(["train", "configs/clip/demo.yaml", *_tiny(root), "train.output_dir=runs/demo"]) == 0
        assert main(["train", "configs/clip/tiny.yaml", *_tiny(root), "train.output_dir=runs/clip-tiny"]) == 0
    finally:
        os.chdir(cwd)
    return root


def _tiny(root: Path) -> list[str]:
    demo = root / "data" / "demo"
    return [f"data.train_shards=[{demo}/train]", f"eval.shards=[{demo}/val]", *STEPS]


@pytest.fixture
def workdir(inputs, tmp_path, monkeypatch) -> Path:
    """A fresh folder per command, with the shared inputs linked in."""
    for name in ("configs", "data", "photos", "pairs.parquet"):
        (tmp_path / name).symlink_to(inputs / name)
    (tmp_path / "runs").mkdir()
    for run in ("demo", "clip-tiny"):
        (tmp_path / "runs" / run).symlink_to(inputs / "runs" / run)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _stand_ins(folder: Path) -> Path:
    """`srun`, `scontrol`, `accelerate`, `sbatch` that write their argv (one word a line) to folder/NAME.argv."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("srun", "accelerate", "sbatch"):
        (bin_dir / name).write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{folder}/{name}.argv"\n')
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho node-1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def _launched(folder: Path, name: str) -> list[str]:
    return (folder / f"{name}.argv").read_text().splitlines()


def _expect_missing_shards(argv: list[str], capsys) -> None:
    """A web-scale `mmcl train` here: the brace pattern is read as written and stops in one line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"shard pattern '{SHARDS}'" in err and "not found" in err, err


def _bash(
    args: list[str], cwd: Path, path_first: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    env = {**os.environ, **ENV, "SLURM_JOB_NODELIST": "node-1", "SLURM_NNODES": "4", "SLURM_JOB_ID": "1"}
    if path_first is not None:
        env["PATH"] = f"{path_first}:{env['PATH']}"
    return subprocess.run(["bash", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_commands_were_found():
    assert any(SHARDS in c and c.startswith("mmcl train") for c in COMMANDS)
    assert any(c.startswith("sbatch") for c in COMMANDS) and any("clip_pretrain.sh" in c for c in COMMANDS)
    assert sum(c.startswith("mmcl") for c in COMMANDS) >= 12
    assert {"bash pipelines/setup.sh --app", "bash pipelines/setup.sh --dev"} <= set(COMMANDS)


def _serve_without_blocking(monkeypatch) -> dict:
    """Make `Blocks.launch` return at once on a free port; the served Blocks lands in the returned dict."""
    import gradio as gr
    from app_helpers import free_port

    served = {}
    real_launch = gr.Blocks.launch

    def launch(self, *args, **kwargs):
        kwargs.update(server_port=free_port(), prevent_thread_lock=True, quiet=True)
        served["demo"] = self
        return real_launch(self, *args, **kwargs)

    monkeypatch.setattr(gr.Blocks, "launch", launch)
    return served


sys.path.insert(0, str(ROOT / "tests" / "app"))


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.splitlines()[1][:60] if c.startswith(GUIDE) else c)
def test_command_runs_as_written(command, workdir, inputs, monkeypatch, capsys, tmp_path):  # noqa: C901
    if command.startswith(GUIDE):  # a guide's numbered steps: one bash script, in order, with the installed mmcl
        (workdir / "tests").symlink_to(ROOT / "tests")
        (workdir / "guide.sh").write_text("set -euo pipefail\n" + command.removeprefix(GUIDE))
        done = _bash(["guide.sh"], workdir, path_first=Path(sys.executable).parent, timeout=600)
        assert done.returncode == 0, done.stdout[-1500:] + done.stderr[-3000:]
        return
    for big, small in SMALLER.items():
        command = command.replace(big, small)
    words = shlex.split(command)
    if words[:2] == ["bash", "pipelines/demo.sh"]:  # setup check, then `mmcl demo --help` through "$@"
        done = _bash(["pipelines/demo.sh", "--help"], ROOT)
        assert done.returncode == 0 and "usage: mmcl demo" in done.stdout, done.stderr[-2000:]
        return
    if words[:2] == ["bash", "pipelines/test.sh"]:  # setup --dev check, then pytest on "$@"
        done = _bash(["pipelines/test.sh", "--collect-only", "-q", "tests/test_config.py"], ROOT)
        assert done.returncode == 0 and "tests/test_config.py: " in done.stdout, (
            done.stdout[-2000:] + done.stderr[-2000:]
        )
        return
    if words[:2] == ["bash", "pipelines/setup.sh"]:  # an install: here (installed already) it only checks
        done = _bash(["pipelines/setup.sh", *words[2:]], ROOT)
        assert done.returncode == 0 and "installing" not in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
        return
    if words[0] in ("sbatch", "bash"):  # a launcher script: run it, its cluster launcher replaced by a recorder
        script = next(w for w in words if w.startswith("pipelines/"))
        args = words[words.index(script) + 1 :]
        done = _bash([str(ROOT / script), *args], workdir, _stand_ins(workdir))
        assert done.returncode == 0, done.stderr
        launcher = "srun" if words[0] == "sbatch" else "accelerate"
        launched = _launched(workdir, launcher)
        if launcher == "accelerate":
            from accelerate.commands.config.config_args import load_config_from_file

            config = launched[launched.index("--config_file") + 1]
            assert load_config_from_file(str(ROOT / config)).num_processes >= 1  # accelerate reads the file
        _expect_missing_shards(_mmcl_argv(launched), capsys)
        return
    if words[0] == "accelerate":  # accelerate's own config check, then the mmcl part (`...`: more overrides)
        from accelerate.commands.config.config_args import load_config_from_file

        assert load_config_from_file(words[words.index("--config_file") + 1]).num_processes >= 1
        assert main(_mmcl_argv(words)) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "train_shards" in err, err
        return
    argv = _mmcl_argv(words)
    if words[0] == "torchrun":  # torch's own parser reads the launch flags; the mmcl part runs here on tiny data
        from torch.distributed.run import get_args_parser

        launch = get_args_parser().parse_args(words[1:])
        assert launch.nproc_per_node == "2" and launch.module  # 2-process training itself: tests/engine
        out = workdir / "runs" / "ddp"
        assert main([*argv, *_tiny(inputs), f"train.output_dir={out}"]) == 0
        assert (out / "final").is_dir()
        return
    assert argv is not None, f"not an mmcl command: {command}"
    if argv[0] == "train":
        if any(SHARDS in w for w in argv):
            _expect_missing_shards(argv, capsys)
            return
        out = workdir / "runs" / "readme"
        assert main([*argv, *_tiny(inputs), f"train.output_dir={out}"]) == 0
        assert (out / "final").is_dir() and (out / "metrics.jsonl").is_file()
        return
    if argv[0] == "app":
        from app_helpers import coloured
        from gradio_client import Client, handle_file

        served = _serve_without_blocking(monkeypatch)
        assert main(argv) == 0
        try:
            coloured("red").save(tmp_path / "red.png")
            client = Client(served["demo"].local_url, verbose=False)
            labels = "red circle, blue square"
            label = client.predict(handle_file(str(tmp_path / "red.png")), labels, "none", "", 2, api_name="/classify")
            assert len(label["confidences"]) == 2
        finally:
            served["demo"].close()
        return
    if "--sugarcrepe" in argv:  # SugarCrepe's layout (data/<subset>.json + the COCO images it names), made here
        _sugarcrepe_files(workdir / argv[argv.index("--sugarcrepe") + 1], workdir / argv[argv.index("--images") + 1])
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    if argv[0] == "shards":
        out = workdir / argv[2 if argv[1] == "synthetic" else 3]
        assert list(out.rglob("*.tar")), out
    elif argv[:2] == ["eval", "compositional"]:
        assert re.search(r"replace|swap", printed), printed
    elif argv[0] == "eval":
        assert re.search(r"top1|recall@1", printed), printed
    elif argv[0] == "export":
        assert any((workdir / argv[3]).iterdir())
    elif argv[:2] == ["index", "build"]:
        assert (workdir / argv[argv.index("--out") + 1] / "manifest.json").is_file()


def _inline_commands() -> list[str]:
    """Commands quoted in README's prose (`` `mmcl app RUN --allow-runs RUN2 RUN3` ``, `` `python -m bench.x` ``),
    but not error messages (`mmcl app: error: ...`) or the generic `mmcl <command>`."""
    spans = re.findall(r"`((?:mmcl|python|bash) [^`]*)`", (ROOT / "README.md").read_text())
    return [s for s in dict.fromkeys(spans) if not re.match(r"mmcl (\S+:|<)", s)]


INLINE = _inline_commands()


def _command_path(argv: list[str]) -> tuple[list[str], argparse.ArgumentParser]:
    """The subcommand words at the start of `argv` and the parser they lead to."""
    parser, path = build_parser(), []
    for word in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        parser, path = subs[0].choices[word], [*path, word]
    return path, parser


def test_inline_commands_were_found():
    assert "mmcl app RUN --allow-runs RUN2 RUN3" in INLINE and "python -m bench.bench_train" in INLINE
    assert "mmcl --version" in INLINE and not any("error" in c for c in INLINE)


@pytest.mark.parametrize("command", INLINE)
def test_inline_command_is_valid(command, capsys):
    """Each command quoted in the prose exists as written: a bash line is one of the commands run above; an mmcl
    command path exists and its options parse (placeholders such as RUN, OUT stand for paths); a script's
    `--help` works and lists every option quoted."""
    words = shlex.split(command)
    if words[0] == "bash" and not words[1].startswith("bench/"):
        assert command in COMMANDS, f"{command} is not run by test_command_runs_as_written"
        return
    if words[0] in ("python", "bash"):  # a script or module (a bench/ wrapper passes its arguments on): its --help
        target = words[1:3] if words[1] == "-m" else words[1:2]  # `python -m bench.bench_train ...`
        run = [sys.executable if words[0] == "python" else "bash", *target, "--help"]
        done = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={**os.environ, **ENV, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable})  # fmt: skip
        assert done.returncode == 0 and done.stdout.startswith("usage:"), done.stderr[-2000:]
        for option in (w for w in words[1 + len(target) :] if w.startswith("--")):
            assert option in done.stdout, f"{command}: {option} not in its --help"
        return
    argv = words[1:]
    if argv == ["--version"]:
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 0 and capsys.readouterr().out.startswith("mmcl ")
        return
    path, parser = _command_path(argv)
    assert path and path[0] == argv[0], f"{command}: no such command"
    if len(path) < len(argv):  # a whole command line: it parses
        parser.parse_args(argv[len(path) :])


def _sugarcrepe_files(data: Path, images: Path) -> None:
    """Two entries of SugarCrepe's `replace_att.json` format and the two images they name."""
    import json

    from app_helpers import coloured

    data.mkdir(parents=True)
    images.mkdir(parents=True)
    entries = {
        "0": {"filename": "000000000001.jpg", "caption": "a red image", "negative_caption": "a blue image"},
        "1": {"filename": "000000000002.jpg", "caption": "a blue image", "negative_caption": "a red image"},
    }
    (data / "replace_att.json").write_text(json.dumps(entries))
    coloured("red").convert("RGB").save(images / "000000000001.jpg")
    coloured("blue").convert("RGB").save(images / "000000000002.jpg")
