"""Every command shown in README.md and pipelines/ parses as written, up to the point of starting work.

Commands are taken from the files themselves (bash blocks of the README, the launch lines of the pipeline
scripts, with `$shards` set to the README's brace pattern), so a drifting example fails here. `mmcl train`
commands are loaded into a full `ExperimentConfig`; the others through the CLI's own parser.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mmcl.cli import build_parser
from mmcl.config import load_experiment

ROOT = Path(__file__).resolve().parents[2]
SHARDS = "/data/laion/{00000..41407}.tar"


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _pipeline_commands() -> list[str]:
    found = []
    for script in sorted((ROOT / "pipelines").glob("*.s*")):
        text = re.sub(r"\\\n\s*", " ", script.read_text())
        for line in text.splitlines():
            if ("mmcl.cli" in line or "bin/mmcl" in line) and not line.lstrip().startswith("#"):
                found.append(line.replace("$shards", SHARDS).replace('"$@"', "").strip())
    return found


def _mmcl_argv(command: str) -> list[str] | None:
    """The argv after `mmcl` / `-m mmcl.cli` / `.venv/bin/mmcl`, or None for a command that is not mmcl's."""
    words = shlex.split(command.replace("...", ""))
    for i, word in enumerate(words):
        if word in ("mmcl", ".venv/bin/mmcl") or (word == "mmcl.cli" and words[i - 1] == "-m"):
            return [w for w in words[i + 1 :] if not w.startswith("${")]
    return None


COMMANDS = _readme_commands() + _pipeline_commands()


def test_commands_were_found():
    assert any("{00000..41407}" in c for c in COMMANDS) and any("slurm" in c or "srun" in c for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_command_parses_as_written(command, monkeypatch):
    monkeypatch.chdir(ROOT)
    if command.startswith(("bash pipelines/", "sbatch ")):
        script = ROOT / shlex.split(command)[-1 if command.startswith("bash") else 3].split()[0]
        assert script.is_file(), command  # its own launch line is checked among the pipeline commands
        return
    argv = _mmcl_argv(command)
    assert argv is not None, f"not an mmcl command: {command}"
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    assert callable(args.func)
    if args.command == "train":
        overrides = [*args.overrides, *extra]
        cfg = load_experiment(args.config, overrides)
        if any("train_shards" in o for o in overrides):
            assert cfg.data.train_shards == [SHARDS]
    else:
        assert not extra, (command, extra)
