"""Optional dependencies, grouped as pip extras (pyproject.toml), and the one-line error for a missing one.

mmcl is installed from its checkout (it is not on PyPI):

pip install -e .            # core: write shards, train, fine-tune, evaluate, export
pip install -e '.[app]'     # + gradio and faiss: `mmcl app`, `mmcl index`, `mmcl demo`
pip install -e '.[wandb]'   # + Weights & Biases logging (train.trackers=[wandb])
pip install -e '.[dev]'     # everything the tests need (includes app and wandb)
"""

from __future__ import annotations

import importlib
import re
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path
from types import ModuleType

from mmcl.utils import UserError

EXTRA_OF = {"gradio": "app", "faiss": "app", "wandb": "wandb"}  # import name -> extra that installs it


def _checkout() -> Path | None:
    """The source checkout this mmcl is imported from (an editable install or PYTHONPATH), if it is one."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "mmcl").is_dir() else None


def install_hint(extra: str, checkout: Path | None = None) -> str:
    """The command that installs `extra` here: `pip install -e '.[extra]'` in the checkout mmcl runs from; for a
    wheel installed without one, its packages by name (from the installed metadata)."""
    checkout = checkout or _checkout()
    if checkout is not None:
        return f"pip install -e '.[{extra}]' (in {checkout})"
    try:
        reqs = [r for r in requires("mmcl") or [] if re.search(rf"extra\s*==\s*['\"]{extra}['\"]", r)]
    except PackageNotFoundError:
        reqs = []
    names = [r.split(";")[0].strip().replace(" ", "") for r in reqs]
    return "pip install " + " ".join(f"'{n}'" for n in names) if names else f"install mmcl with its [{extra}] extra"


def require(module: str, what: str) -> ModuleType:
    """Import `module` or fail with one line naming the extra that installs it and the command to install it.

    Args:
        module: the import name (a key of `EXTRA_OF`).
        what: the feature needing it, for the message (e.g. "mmcl app").
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRA_OF[module]
        raise UserError(
            f"{what} needs the '{extra}' extra ({module} is not installed): {install_hint(extra)}"
        ) from None


def require_app(what: str) -> None:
    """gradio and faiss, the `[app]` extra."""
    for module in ("gradio", "faiss"):
        require(module, what)
