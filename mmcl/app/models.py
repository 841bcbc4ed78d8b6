"""Loading the app's model: anything `mmcl.inference.load_pipeline` loads (an mmcl run or checkpoint folder, a
transformers or open_clip folder, hf:ORG/NAME, hf-hub:ORG/NAME), or an open_clip model by name (`OpenClipPipeline`)."""

from __future__ import annotations

from pathlib import Path

from mmcl.inference import Encoder, OpenClipPipeline  # noqa: F401 (the app's and CLI's model choices)
from mmcl.utils import UserError


def load_run(path: str | Path) -> Encoder:
    """`mmcl.inference.load_pipeline` for a model folder or hub name, with a clear error if absent."""
    text = str(path).strip()
    if text.startswith(("hf:", "hf-hub:")):
        from mmcl.inference import load_pipeline

        return load_pipeline(text)
    path = Path(text).expanduser()
    if not text or not path.exists():
        from mmcl.run_folder import hub_hint

        raise UserError(f"{path}: no such run or checkpoint folder{hub_hint(text)}")
    from mmcl.inference import load_pipeline

    return load_pipeline(path)
