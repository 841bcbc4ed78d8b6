"""The task: a model plus its weighted loss terms (`task.py`)."""

from __future__ import annotations

from mmcl.tasks.task import Task, build_task

__all__ = ["Task", "build_task"]
