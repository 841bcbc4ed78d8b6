"""The run's metric history: `metrics.jsonl` (one JSON object per logged step) and `curves.png`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mmcl.run_folder import read_metrics
from mmcl.utils import atomic_write_text


class MetricsLog:
    """Appends one JSON line per logged step; on resume, forgets lines past the restored step."""

    def __init__(self, path: Path, resume_step: int = 0) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path.is_file() and resume_step > 0:
            self.rows = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def plot_curves(rows: list[dict[str, Any]], out: Path, title: str = "") -> Path | None:
    """Loss, accuracy-like and eval metrics against step, one panel each, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = sorted(
        {
            k
            for r in rows
            for k, v in r.items()
            if isinstance(v, (int, float)) and k not in ("step", "epoch", "time", "samples")
        }
    )
    panels = {
        "loss": [k for k in numeric if "loss" in k and not k.startswith("eval_")],
        "training accuracy": [k for k in numeric if "acc" in k and not k.startswith("eval_")],
        "evaluation": [k for k in numeric if k.startswith("eval_") and any(s in k for s in ("top1", "@5", "cider"))],
        "learning rate": [k for k in numeric if k == "lr"],
        "throughput": [k for k in numeric if k.endswith("per_s")],
    }
    panels = {name: keys for name, keys in panels.items() if keys}
    if not panels:
        return None
    # a grid, not a row: five panels in a row made a 2475x396 strip, unreadable inlined in a report
    cols = min(len(panels), 2 if len(panels) <= 4 else 3)
    n_rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.5 * cols, 3.4 * n_rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (name, keys) in zip(axes.flat, panels.items()):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 20 else None, ms=3, label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
