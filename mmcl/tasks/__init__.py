"""The task: a model plus its weighted loss terms (`task.py`), owning the optimizer step's forward and
backward (gradient accumulation that keeps every negative)."""

from __future__ import annotations

from mmcl.tasks.task import StepOutput, Task, build_task

__all__ = ["StepOutput", "Task", "build_task"]
