"""The install scripts and CI on a bare machine, in a newcomer's order.

The scripts run for real with bash, in a copy of the repository whose `.venv` is a stand-in: its `python`
records each `pip install` and grants the modules of the extra installed (pyproject.toml's groups), and its
`python -c "import ..."` succeeds only for modules installed so far; its `mmcl` needs what the real command
imports. So the order and the extras of what the scripts install are what is checked, without a network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# what a bare `pip install -e ".EXTRA"` makes importable (pyproject.toml)
PROVIDES = {
    "": ["mmcl", "torch", "timm", "open_clip", "webdataset", "accelerate"],
    "[app]": ["gradio", "faiss"],
    "[dev]": ["gradio", "faiss", "wandb", "pytest", "playwright", "clip_benchmark", "pycocoevalcap", "ruff"],
}
# stand-in interpreter: `-c "import a, b"` and `-m pip install -q -e .EXTRA`, against a state file
FAKE_PYTHON = """#!{python}
import json, re, sys
from pathlib import Path
state = Path({state!r})
provides = {provides!r}
installed = set(json.loads(state.read_text())) if state.exists() else set()
args = sys.argv[1:]
if args[:1] == ["-c"]:
    wanted = re.findall(r"[\\w.]+", args[1].replace("import", ""))
    sys.exit(0 if set(wanted) <= installed else 1)
if args[:3] == ["-m", "pip", "install"]:
    spec = args[-1]
    extra = spec[1:] if spec.startswith(".") else spec
    installed |= set(provides[""]) | set(provides.get(extra, []))
    state.write_text(json.dumps(sorted(installed)))
    with open({log!r}, "a") as f:
        f.write("pip install " + spec + "\\n")
    sys.exit(0)
sys.exit("fake python: unexpected " + " ".join(args))
"""
# stand-in for a console script: logs its argv, fails like the real one when a module it needs is missing
FAKE_TOOL = """#!{python}
import json, sys
from pathlib import Path
installed = set(json.loads(Path({state!r}).read_text()))
needs = {needs!r}
with open({log!r}, "a") as f:
    f.write(" ".join([{name!r}, *sys.argv[1:]]) + "\\n")
missing = [m for m in needs.get(sys.argv[1] if len(sys.argv) > 1 else "", needs.get("*", [])) if m not in installed]
sys.exit("{name}: missing " + ", ".join(missing) if missing else 0)
"""


def _bare_clone(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of README, pipelines/ and .ci/ with a stand-in .venv; returns (repo, log file)."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "pipelines", repo / "pipelines")
    shutil.copytree(ROOT / ".ci", repo / ".ci")
    shutil.copy(ROOT / "README.md", repo / "README.md")
    venv_bin = repo / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    state, log = str(tmp_path / "installed.json"), str(tmp_path / "log")
    fmt = {"python": sys.executable, "state": state, "log": log}
    (venv_bin / "python").write_text(FAKE_PYTHON.format(provides=PROVIDES, **fmt))
    # `mmcl demo` imports faiss (its app index), every mmcl command the core; ruff comes with [dev]
    mmcl_needs = {"demo": ["mmcl", "torch", "faiss"], "*": ["mmcl", "torch"]}
    (venv_bin / "mmcl").write_text(FAKE_TOOL.format(name="mmcl", needs=mmcl_needs, **fmt))
    (venv_bin / "ruff").write_text(FAKE_TOOL.format(name="ruff", needs={"*": ["ruff"]}, **fmt))
    for tool in venv_bin.iterdir():
        tool.chmod(0o755)
    return repo, Path(log)


def _bash(script: str, repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{repo / 'stub-bin'}:{os.environ['PATH']}"}
    return subprocess.run(["bash", script, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=120)


def test_demo_sh_on_a_bare_install_installs_what_the_demo_needs(tmp_path):
    """README's first command on a fresh clone: the demo imports faiss (the [app] extra), so demo.sh installs it."""
    repo, log = _bare_clone(tmp_path)
    done = _bash("pipelines/demo.sh", repo)
    assert done.returncode == 0, done.stdout + done.stderr
    assert log.read_text().splitlines() == ["pip install .[app]", "mmcl demo"]
    again = _bash("pipelines/demo.sh", repo, "--steps", "3")  # a second run only checks
    assert again.returncode == 0 and log.read_text().splitlines()[2:] == ["mmcl demo --steps 3"]


def test_setup_sh_extras(tmp_path):
    repo, log = _bare_clone(tmp_path)
    (repo / "stub-bin").mkdir()
    for name in ("sudo", "apt-get"):  # Chromium for --dev, where the machine lacks it: recorded, not installed
        (repo / "stub-bin" / name).write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> {log}\n')
        (repo / "stub-bin" / name).chmod(0o755)
    for args, installs in (([], "."), (["--app"], ".[app]"), (["--app"], None), (["--dev"], ".[dev]")):
        before = log.read_text().splitlines() if log.exists() else []
        done = _bash("pipelines/setup.sh", repo, *args)
        assert done.returncode == 0, done.stderr
        pips = [line for line in log.read_text().splitlines()[len(before) :] if line.startswith("pip")]
        assert pips == ([f"pip install {installs}"] if installs else []), (args, pips)
    bad = _bash("pipelines/setup.sh", repo, "--typo")
    assert bad.returncode == 2 and "usage: bash pipelines/setup.sh [--app|--dev]" in bad.stderr


def test_ci_runs_readme_first_command_as_written_before_the_dev_install(tmp_path):
    """.ci/run: README's first bash block, read from README.md, demo first on the bare clone; then --dev, ruff,
    and README's test command."""
    repo, log = _bare_clone(tmp_path)
    for name in ("demo.sh", "test.sh"):  # the scripts themselves are tested above: here, what CI calls in what order
        (repo / "pipelines" / name).write_text(f'echo "{name} $*" >> {log}\n')
    readme = (repo / "README.md").read_text()
    marked = readme.replace("bash pipelines/demo.sh ", "bash pipelines/demo.sh --steps 7 ", 1)
    assert marked != readme
    (repo / "README.md").write_text(marked)  # proves the command comes from README.md, word for word
    shutil.copy(ROOT / "pipelines" / "setup.sh", repo / "pipelines" / "setup.sh")
    (repo / "stub-bin").mkdir()
    for name in ("sudo", "apt-get"):
        (repo / "stub-bin" / name).write_text("#!/usr/bin/env bash\n")
        (repo / "stub-bin" / name).chmod(0o755)
    done = _bash(".ci/run", repo)
    assert done.returncode == 0, done.stdout + done.stderr
    assert log.read_text().splitlines() == [
        "demo.sh --steps 7",
        "pip install .[dev]",
        "ruff check .",
        "ruff format --check .",
        "test.sh ",
    ]


def test_ci_refuses_a_readme_whose_first_block_is_not_demo_then_tests(tmp_path):
    repo, _ = _bare_clone(tmp_path)
    text = (repo / "README.md").read_text().replace("bash pipelines/demo.sh", "bash pipelines/other.sh", 1)
    (repo / "README.md").write_text(text)
    done = _bash(".ci/run", repo)
    assert done.returncode == 1 and "README's first bash block" in done.stderr
