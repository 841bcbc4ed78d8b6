"""Loading the app's model: an mmcl run or checkpoint folder, or an open_clip model by name (`OpenClipPipeline`)."""

from __future__ import annotations

from pathlib import Path

from mmcl.inference import Encoder, OpenClipPipeline  # noqa: F401 (the app's and CLI's model choices)
from mmcl.utils import UserError


def load_run(path: str | Path) -> Encoder:
    """`mmcl.inference.load_pipeline` for a run folder or checkpoint folder, with a clear error if absent."""
    path = Path(str(path).strip()).expanduser()
    if not str(path) or not path.exists():
        raise UserError(f"{path}: no such run or checkpoint folder")
    from mmcl.inference import load_pipeline

    return load_pipeline(path)
