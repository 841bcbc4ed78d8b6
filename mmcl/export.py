"""Exporting a run: the model of an mmcl run or checkpoint folder, written as an open_clip or a transformers
model with a model card (README.md). The state-dict converters live with the models
(`mmcl.models.openclip_compat.export_open_clip`, `mmcl.models.hf_export.export_hf`); this module loads the
run, keeps the export out of run folders and writes the card.

    export_open_clip_run("runs/demo", "exported/")        # open_clip.create_model_and_transforms("local-dir:...")
    export_hf_run("runs/demo", "exported-hf/")            # transformers.pipeline(..., model="exported-hf/")
"""

from __future__ import annotations

from pathlib import Path

from mmcl.inference import load_pipeline
from mmcl.model_card import write_model_card
from mmcl.models.hf_export import export_hf
from mmcl.models.openclip_compat import export_open_clip
from mmcl.run_folder import check_export_target, find_weights


def export_open_clip_run(run_or_ckpt: str | Path, out_dir: str | Path, name: str | None = None) -> tuple[Path, Path]:
    """Export the model of an mmcl run or checkpoint folder (see `mmcl.inference.find_weights`) to open_clip,
    with a model card (README.md)."""
    check_export_target(out_dir)  # before loading anything: a run folder's own weights must stay its own
    pipe = load_pipeline(run_or_ckpt, device="cpu")
    paths = export_open_clip(pipe.model, out_dir, name)

    usage = f"""```python
import open_clip

model, _, preprocess = open_clip.create_model_and_transforms("local-dir:PATH/TO/{Path(out_dir).name}")
```"""
    write_model_card(out_dir, find_weights(run_or_ckpt)[1], "open_clip", usage, model_name=name or "")
    return paths


def export_hf_run(run_or_ckpt: str | Path, out_dir: str | Path, license: str = "other") -> Path:
    """Export the model of an mmcl run or checkpoint folder to transformers, with a model card."""
    check_export_target(out_dir)  # before loading anything: a run folder's own weights must stay its own
    pipe = load_pipeline(run_or_ckpt, device="cpu")
    out = export_hf(pipe.model, out_dir)
    usage = f"""```python
from transformers import pipeline

classifier = pipeline("zero-shot-image-classification", model="PATH/TO/{Path(out).name}")  # or the Hub id
classifier("image.jpg", candidate_labels=["a cat", "a dog"])
```"""
    write_model_card(out, find_weights(run_or_ckpt)[1], "transformers", usage, license=license)
    return out
