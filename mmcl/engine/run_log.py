"""What a training run says: Accelerate trackers (TensorBoard, W&B), plain log lines, the terminal's bar."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Any

from mmcl.config import ExperimentConfig, to_dict


def logs_beside_bars():
    """On a terminal, log lines go through tqdm.write: printed above the training bar, not glued onto it."""
    if not sys.stderr.isatty():
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm(loggers=[logging.getLogger("mmcl")])


def store_config(acc, flat: dict[str, Any]) -> None:
    """The run's config in every tracker. TensorBoard's: as hparams of this run's own event file; Accelerate's
    `add_hparams` would open a second, timestamped run beside it (an extra entry in TensorBoard's run list)."""
    for tracker in acc.trackers:
        if tracker.name != "tensorboard":
            tracker.store_init_configuration(flat)
            continue
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(flat, metric_dict={}):  # experiment, session start and end
            tracker.writer.file_writer.add_summary(summary)
        tracker.writer.flush()


def build_trackers(names: list[str], run_dir: Path) -> list[Any]:
    """Accelerate's trackers by name; W&B as a tracker object so its project is 'mmcl' and its run is named
    after the run folder (Accelerate would name the W&B project after `init_trackers`' TensorBoard folder)."""
    out: list[Any] = []
    for name in names:
        if name == "wandb":
            from mmcl.extras import require

            require("wandb", "train.trackers=[wandb]")
            from accelerate.tracking import WandBTracker

            out.append(WandBTracker("mmcl", name=run_dir.name, dir=str(run_dir)))
        else:
            out.append(name)
    return out


def log_line(step: int, total: int, m: dict[str, float], elapsed: float, done: int) -> str:
    """One plain progress line for logs that are not a terminal (SLURM, CI, nohup)."""
    eta = elapsed / max(done, 1) * (total - step)
    skipped = sum(v for k, v in m.items() if k.startswith("skipped_"))
    return (
        f"step {step}/{total} loss {m.get('loss', float('nan')):.4f} lr {m['lr']:.3g} "
        f"samples/s {m['samples_per_s']:.1f} eta {_hms(eta)} skipped {int(skipped)}"
    )


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def training_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def flat_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """Scalars only, dotted keys: what TensorBoard's hparams accept."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, (int, float, str, bool)):
            flat[prefix] = value
        else:
            flat[prefix] = str(value)

    walk("", to_dict(cfg))
    return flat
