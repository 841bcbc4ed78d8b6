"""The Gradio app (`mmcl app`): zero-shot classification, retrieval over an index, captioning.

`mmcl.app.handlers` holds the logic as plain functions; `mmcl.app.ui` the Gradio Blocks (imported on
first use, so `import mmcl.app` stays light).
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_app", "launch", "make_state"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from mmcl.app import ui

        return getattr(ui, name)
    raise AttributeError(f"module 'mmcl.app' has no attribute '{name}'")
