"""Why mmcl and open_clip learn differently at equal steps: crop scale, gradient clipping, AdamW's beta2/eps.

    python -m bench.bench_isolation                      # ~20 min on 2 cores; results/isolation.{json,md}
    python -m bench.bench_isolation --variants base crop-0.9 --seeds 0
    python -m bench.bench_isolation --tiny               # seconds-long check of the script (temp folder)

mmcl's small-data defaults differ from open_clip's in three places that could matter for captions about
position or count: the training crop keeps 0.8-1 of the image (open_clip 0.9-1: a tighter range can cut off
an object near an edge), gradients are clipped at norm 1.0 (open_clip: no clipping) while the logged norms
sit at 2-5, and AdamW runs with betas (0.9, 0.98), eps 1e-6 (open_clip: 0.999, 1e-8). Each variant changes
exactly one of them from mmcl's recipe (lr 1e-3, wd 0.1, the objectives benchmark's settings), at equal
steps, on two sets:

- **shapes**: the built-in shapes (clip-tiny-64, 64 px, captions naming colour, shape, size, position,
  count); zero-shot top-1/top-5 with 'short' templates (unlike the training captions), text->image R@5,
  and the compositional subsets, among them `change_position` and `change_count`;
- **digits**: scikit-learn's handwritten digits (the 4-in-5 train split, 1,437 images with varied
  captions; zero-shot on the 360 test images, 10 classes), the same architecture at 32 px.

Mean over seeds with the spread (min-max). Equal steps make accuracies independent of machine load.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    DATA,
    RESULTS,
    machine_info,
    reproduce_command,
    synthetic_shards,
    write_results,
)

RECIPE = ["train.lr=1e-3", "train.weight_decay=0.1", "train.grad_clip=1.0", "train.betas=[0.9,0.98]",
          "train.eps=1e-6", "data.crop_scale=[0.8,1.0]", "data.shuffle_buffer=2000"]  # fmt: skip
# name -> (overrides on top of RECIPE, what it changes)
VARIANTS: dict[str, tuple[list[str], str]] = {
    "base": ([], "mmcl's recipe: crop 0.8-1, grad clip 1.0, betas (0.9, 0.98), eps 1e-6"),
    "crop-0.9": (["data.crop_scale=[0.9,1.0]"], "open_clip's crop scale 0.9-1"),
    "no-clip": (["train.grad_clip=0"], "no gradient clipping (open_clip)"),
    "adamw-0.999": (["train.betas=[0.9,0.999]", "train.eps=1e-8"], "AdamW betas (0.9, 0.999), eps 1e-8 (open_clip)"),
}
DATASETS = {"shapes": ("clip-tiny-64", 64), "digits": ("clip-tiny-64", 32)}


def data(tiny: bool) -> dict[str, tuple[Path, Path]]:
    """(train shards, held-out shards) per dataset, written once under data/bench/."""
    from mmcl.data.writer import write_real_shards

    n_train, n_val = (1200, 200) if tiny else (20000, 1000)
    shapes = (synthetic_shards(DATA / f"synthetic_train_64px_{n_train}", n_train, "train", 64, max(n_train // 20, 1)),
              synthetic_shards(DATA / f"synthetic_val_64px_{n_val}", n_val, "val", 64, 250))  # fmt: skip
    digits = {}
    for split in ("train", "test"):
        out = DATA / f"digits_{split}_32px"
        if not (out / "classnames.txt").is_file():
            write_real_shards(out, "digits", split=split, image_size=32, progress=False)
        digits[split] = out
    return {"shapes": shapes, "digits": (digits["train"], digits["test"])}


def train_and_evaluate(dataset: str, variant: str, seed: int, steps: int, shards: tuple[Path, Path], work: Path,
                       batch: int) -> dict[str, Any]:  # fmt: skip
    from bench.bench_objectives import evaluate
    from mmcl.config import load_experiment
    from mmcl.engine.trainer import train
    from mmcl.inference import load_pipeline

    preset, size = DATASETS[dataset]
    train_shards, val = shards
    out = work / f"{dataset}_{variant}_s{seed}"
    cfg = load_experiment(None, [
        f"model.preset={preset}", f"model.image.image_size={size}", f"data.train_shards=[{train_shards}]",
        f"data.batch_size={batch}", "data.num_workers=2", f"train.steps={steps}", f"train.output_dir={out}",
        "train.trackers=[none]", "train.progress=false", f"train.ckpt_every={steps}", "train.log_every=5",
        f"train.warmup_steps={max(1, steps // 10)}", f"train.seed={seed}", *RECIPE, *VARIANTS[variant][0],
    ])  # fmt: skip
    t0 = time.perf_counter()
    train(cfg)
    train_s = time.perf_counter() - t0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    norms = [r["grad_norm"] for r in logged if "grad_norm" in r]
    res = evaluate(load_pipeline(out), val, train_shards / "classnames.txt", compositional=dataset == "shapes")
    return {"dataset": dataset, "variant": variant, "seed": seed, "steps": steps, "train_s": round(train_s, 1),
            "grad_norm_median": statistics.median(norms) if norms else None, **res}  # fmt: skip


METRICS = ("top1", "top5", "t2i_recall@5", "comp_change_position", "comp_change_count", "comp_swap_obj", "comp_mean")


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["variant"]), []).append(r)
    out = []
    for (dataset, variant), rs in groups.items():
        row: dict[str, Any] = {"dataset": dataset, "variant": variant, "seeds": len(rs), "steps": rs[0]["steps"],
                               "grad_norm_median": statistics.fmean(r["grad_norm_median"] or 0 for r in rs)}  # fmt: skip
        for m in METRICS:
            values = [r[m] for r in rs if m in r]
            if values:
                row[m] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
        out.append(row)
    return out


def write(res: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """bench/results/isolation.{json,md} (or `out`) through the one results writer."""

    def cell(v: dict[str, float] | None) -> str:
        return "-" if not v else f"{100 * v['mean']:.1f} ({100 * v['min']:.0f}-{100 * v['max']:.0f})"

    headers = ["dataset", "variant", "changes", "seeds", "steps", "median grad norm", "top-1 %", "top-5 %",
               "t2i R@5 %", "change_position %", "change_count %", "swap_obj %", "compositional mean %"]  # fmt: skip
    rows = [[r["dataset"], r["variant"], VARIANTS[r["variant"]][1], r["seeds"], r["steps"],
             f"{r['grad_norm_median']:.2f}", *(cell(r.get(m)) for m in METRICS)] for r in res["summary"]]  # fmt: skip
    s = res["settings"]
    intro = (
        f"{s['steps']} steps x {s['batch_size']} per run, seeds {s['seeds']} (mean, range in brackets). shapes: "
        "clip-tiny-64 at 64 px on 20,000 built-in samples, zero-shot on 1,000 held-out images ('short' templates, "
        "40 classes, chance 2.5%), compositional subsets on held-out generator pairs (chance 50%). digits: the same "
        "architecture at 32 px on scikit-learn's 1,437 training digits, zero-shot on the 360 test digits (10 classes, "
        "chance 10%). Every variant changes one setting of mmcl's recipe to open_clip's."
    )
    title = "Crop scale, gradient clipping and AdamW's beta2/eps, one at a time (mmcl, equal steps)"
    return write_results("isolation", rows, headers, title, res.get("conclusion", ""), res["machine"], intro=intro,
                         data=res, command=res["command"], out_dir=out)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--tiny", action="store_true", help="3 steps on 1,200 samples: a check of the script")
    p.add_argument("--results", type=Path, default=None, help="results folder (default bench/results/)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.tiny:
        args.steps, args.batch_size = 3, 32
    t0 = time.perf_counter()
    shards = data(args.tiny)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_isolation_") as work:
        for seed in args.seeds:
            for dataset in args.datasets:
                for variant in args.variants:
                    row = train_and_evaluate(dataset, variant, seed, args.steps, shards[dataset], Path(work),
                                             args.batch_size)  # fmt: skip
                    print(json.dumps(row), flush=True)
                    runs.append(row)
    res = {"benchmark": "isolation", "command": reproduce_command("bench_isolation.py", argv),
           "machine": machine_info(), "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "wall_s": round(time.perf_counter() - t0, 1), "runs": runs, "summary": summarise(runs)}  # fmt: skip
    out = args.results or (Path(tempfile.mkdtemp(prefix="bench_isolation_results_")) if args.tiny else RESULTS)
    write(res, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
