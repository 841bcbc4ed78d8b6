"""Optional dependencies, grouped as pip extras (pyproject.toml), and the one-line error for a missing one.

pip install mmcl            # core: write shards, train, fine-tune, evaluate, export
pip install 'mmcl[app]'     # + gradio and faiss: `mmcl app`, `mmcl index`, `mmcl demo`
pip install 'mmcl[wandb]'   # + Weights & Biases logging (train.trackers=[wandb])
pip install 'mmcl[dev]'     # everything the tests need (includes app and wandb)
"""

from __future__ import annotations

import importlib
from types import ModuleType

from mmcl.utils import UserError

EXTRA_OF = {"gradio": "app", "faiss": "app", "wandb": "wandb"}  # import name -> extra that installs it


def require(module: str, what: str) -> ModuleType:
    """Import `module` or fail with one line naming the extra that installs it.

    Args:
        module: the import name (a key of `EXTRA_OF`).
        what: the feature needing it, for the message (e.g. "mmcl app").
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRA_OF[module]
        raise UserError(
            f"{what} needs the '{extra}' extra ({module} is not installed): pip install 'mmcl[{extra}]'"
        ) from None


def require_app(what: str) -> None:
    """gradio and faiss, the `[app]` extra."""
    for module in ("gradio", "faiss"):
        require(module, what)
