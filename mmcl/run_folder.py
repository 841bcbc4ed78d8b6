"""A training run's folder, the one place that knows its layout.

    runs/NAME/
      config.yaml            the resolved experiment config
      final/                 model.safetensors (+ config.yaml) of the finished run
      checkpoints/step_N/    model, optimizer, RNG and data position (`mmcl.engine.checkpoint`)
      metrics.jsonl          one JSON line per logged step (written by `mmcl.engine.metrics.MetricsLog`)

`find_weights` turns any folder a user may name (a run, its `final/`, one checkpoint) into the weights and
config to load; `check_export_target` keeps exports out of run folders, so nothing beside a run's own files
can shadow its weights; `read_metrics` is how anything reads `metrics.jsonl`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mmcl.utils import UserError

STEP_PREFIX = "step_"
MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"


def metrics_file(run_dir: str | Path) -> Path:
    """Where a run folder keeps its metric history."""
    return Path(run_dir) / METRICS


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metric history: `path` is the `metrics.jsonl` file or the run folder holding it (none: []).

    A line cut by a kill mid-write (or otherwise not a JSON object) is left out, never an error.
    """
    path = Path(path)
    file = metrics_file(path) if path.is_dir() else path
    if not file.is_file():
        return []
    rows = []
    for line in file.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def run_dir_of(config_path: str | Path) -> Path:
    """The run folder of a run's, its `final/`'s or one checkpoint's `config.yaml` (the folder holding
    `metrics.jsonl`); the config's own folder when none above it has one."""
    config_path = Path(config_path)
    for folder in (config_path.parent, config_path.parent.parent, config_path.parent.parent.parent):
        if metrics_file(folder).is_file():
            return folder
    return config_path.parent


def step_dir(root: Path, step: int) -> Path:
    return root / f"{STEP_PREFIX}{step:07d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Published checkpoints (a manifest, or a trainer.json that lost its manifest), oldest first; not verified."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)]
    marked = (p for p in done if (p / MANIFEST).is_file() or (p / "trainer.json").is_file())
    return sorted(marked, key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def hub_hint(text: str) -> str:
    """A hint when a missing path reads like a Hugging Face hub name (ORG/NAME): the prefixes that fetch it."""
    parts = str(text).split("/")
    if len(parts) == 2 and all(re.fullmatch(r"[A-Za-z0-9][\w.-]*", p) for p in parts):
        return f" (a Hugging Face hub name? write hf:{text} for a transformers model, hf-hub:{text} for open_clip)"
    return ""


def is_run_folder(path: str | Path) -> bool:
    """A training run's folder: `config.yaml` with `final/` or `checkpoints/` (its weights live there)."""
    path = Path(path)
    return (path / "config.yaml").is_file() and ((path / "final").is_dir() or (path / "checkpoints").is_dir())


def check_export_target(out_dir: str | Path) -> None:
    """Refuse to write an export into a run folder or anywhere inside one (its files would mix with the run's)."""
    out = Path(out_dir).expanduser().resolve()
    for folder in (out, *out.parents):
        if is_run_folder(folder):
            where = "is" if folder == out else f"is inside {folder}, which is"
            raise UserError(f"{out_dir}: {where} a training run folder; export to a folder of its own")


def find_weights(path: str | Path) -> tuple[Path, Path]:
    """(model.safetensors, config.yaml) for a run folder, a final/ folder or a checkpoint folder.

    A run folder's weights come from its `final/` (else its newest checkpoint), never from a stray
    `model.safetensors` beside its config."""
    text, path = str(path), Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such run or checkpoint folder{hub_hint(text)}")
    if path.is_file():
        raise UserError(f"{path}: give the run or checkpoint folder, not a file")
    # a run folder's own weights only; any other folder: itself first (a final/ or checkpoint folder)
    candidates = [path / "final"] if is_run_folder(path) else [path, path / "final"]
    latest = latest_checkpoint(path / "checkpoints")
    if latest is not None:
        candidates.append(latest)
    for folder in candidates:
        weights = folder / "model.safetensors"
        if weights.is_file():
            for cfg in (folder / "config.yaml", folder.parent / "config.yaml", folder.parent.parent / "config.yaml"):
                if cfg.is_file():
                    return weights, cfg
    raise UserError(f"{path}: not an mmcl run or checkpoint (no model.safetensors with a config.yaml)")
