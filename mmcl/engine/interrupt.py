"""Ctrl-C during training: stop between steps, then one line saying where it stopped and how to resume."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


class StopBetweenSteps:
    """While active, a first Ctrl-C (SIGINT) only asks the loop to stop before its next step; a second one
    interrupts at once.

    Stopping between steps leaves nothing half done: no batch half received from a loader worker (an interrupt
    inside that hand-over made the worker print a BrokenPipe traceback). Only for a single process: ranks of a
    distributed run would stop at different steps, each waiting for the others in a collective.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.requested = enabled, False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopBetweenSteps:
        import signal
        import threading

        self.enabled = self.enabled and threading.current_thread() is threading.main_thread()
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        import signal

        if self.enabled:
            signal.signal(signal.SIGINT, self._previous)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; its message is the one line to show (where it stopped, how to resume)."""

    def __init__(self, step: int, total: int, checkpoint_step: int | None) -> None:
        self.step, self.total, self.checkpoint_step = step, total, checkpoint_step
        saved = f"last checkpoint: step {checkpoint_step}" if checkpoint_step is not None else "no checkpoint yet"
        super().__init__(f"interrupted at step {step} of {total} ({saved}); resume with: {_resume_command()}")


def checkpoint_step_of(path: Path | None) -> int | None:
    """The step of a checkpoint folder `step_0000200` (None for None)."""
    return None if path is None else int(path.name.rsplit("_", 1)[1])


def _resume_command() -> str:
    """The command line that started this process when it is the `mmcl` CLI (re-running it resumes)."""
    import shlex

    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is not None and (argv0.name == "mmcl" or argv0.parts[-2:] == ("cli", "__main__.py")):
        return shlex.join(["mmcl", *sys.argv[1:]])
    return "the same command or train() call (it continues from the last checkpoint)"
