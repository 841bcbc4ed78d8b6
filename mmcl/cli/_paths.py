"""Checks on the paths a command will write, made before any work so a bad one costs one line, not a traceback."""

from __future__ import annotations

from pathlib import Path

from mmcl.utils import UserError


def require_output_folder(path: str | Path, what: str = "output folder") -> Path:
    """`path` as a folder a command may create or resume in: refused in one line if it, or a folder above it,
    is an existing file (which the command would otherwise meet as FileExistsError/NotADirectoryError).

    Args:
        path: the folder the command writes into (need not exist yet).
        what: how the message names it, e.g. "--out".
    """
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists() and not candidate.is_dir():
            where = "" if candidate == path else f" (in {path})"
            raise UserError(f"{what} {candidate} is a file, not a folder{where}: choose another path")
    return path


def require_output_file(path: str | Path, what: str = "output file") -> Path:
    """`path` as a file a command may (over)write: refused in one line if it is a folder, or if a folder above it
    is an existing file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a file: name the file to write, e.g. {path / 'x'}")
    require_output_folder(path.parent, f"{what}'s folder")
    return path
