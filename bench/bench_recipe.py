"""Small-data recipe sweep: which init, learning rate, temperature, batch and image tower learn fastest.

    python -m bench.bench_recipe                         # all but long-1200, ~30 min; results/recipe.{json,md}
    python -m bench.bench_recipe --trials init-timm init-clip lr-1e-3
    python -m bench.bench_recipe --tiny                  # seconds-long check of the script (temp folder)

Each trial trains one mmcl CLIP in this process on the same 64 px built-in synthetic shards as
`bench_train.py` (20,000 samples, 40 classes = 8 colours x 5 shapes) for a fixed number of optimizer
steps, then evaluates on the held-out split (1,000 images, 'short' templates): zero-shot top-1/top-5,
text->image R@5, and where the errors come from: colour accuracy, shape accuracy, and a linear probe of
the image embeddings for shape (logistic regression, 600 train / 400 test images). Fixed steps make the
accuracy independent of machine load; the wall time is reported for scale only. 248 steps x 128 is what
mmcl trains in `bench_train.py`'s 180 s budget on a 2-core Xeon (177 samples/s).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    DATA,
    Table,
    machine_info,
    reproduce_command,
    synthetic_shards,
    write_results,
)

BASE = ["train.warmup_steps=30", "train.grad_clip=1.0", "train.weight_decay=0.1", "data.shuffle_buffer=2000"]
OPEN_CLIP_LIKE = ["train.lr=5e-4", "train.weight_decay=0.2", "train.warmup_steps=11", "train.grad_clip=0",
                  "train.betas=[0.9,0.999]", "train.eps=1e-8"]  # fmt: skip
# name -> (preset, steps, batch, overrides, what it tests)
TRIALS: dict[str, tuple[str, int, int, list[str], str]] = {
    "init-timm": ("clip-tiny-64", 117, 128, [*OPEN_CLIP_LIKE, "model.image.init=timm"],
                  "open_clip's hyper-parameters, timm's ViT init"),
    "init-clip": ("clip-tiny-64", 117, 128, OPEN_CLIP_LIKE, "open_clip's hyper-parameters, CLIP's ViT init"),
    "lr-5e-4": ("clip-tiny-64", 248, 128, [*BASE, "train.lr=5e-4"], "learning rate"),
    "lr-1e-3": ("clip-tiny-64", 248, 128, [*BASE, "train.lr=1e-3"], "learning rate (the demo recipe)"),
    "lr-2e-3": ("clip-tiny-64", 248, 128, [*BASE, "train.lr=2e-3"], "learning rate"),
    "lr-3e-3": ("clip-tiny-64", 248, 128, [*BASE, "train.lr=3e-3", "train.warmup_steps=15"], "learning rate"),
    "no-augment": ("clip-tiny-64", 248, 128, [*BASE, "train.lr=2e-3", "data.augment=false"], "augmentation"),
    "temperature-50": ("clip-tiny-64", 248, 128, [*BASE, "train.lr=1e-3", "model.init_logit_scale=50"],
                       "initial logit scale 50 instead of 1/0.07"),
    "batch-64": ("clip-tiny-64", 496, 64, [*BASE, "train.lr=1e-3", "train.warmup_steps=60"], "batch size"),
    "long-1200": ("clip-tiny-64", 1200, 128, [*BASE, "train.lr=1e-3"], "5x longer"),
    "cnn-tower": ("clip-tiny-cnn-64", 248, 128, [*BASE, "train.lr=1e-3"], "resnet10t image tower"),
    "cnn-batch-512": ("clip-tiny-cnn-64", 62, 512, [*BASE, "train.lr=2e-3", "train.warmup_steps=8"],
                      "resnet10t, batch 512 (more same-colour negatives per batch)"),
    "hybrid-tower": ("clip-tiny-hybrid-64", 248, 128, [*BASE, "train.lr=1e-3"], "conv stem + ViT blocks image tower"),
}  # fmt: skip
OPT_IN = {"long-1200"}  # ~13 min alone: run it with --trials
# name -> preset whose image tower is trained on the shape labels alone (can the architecture see shape?)
SUPERVISED: dict[str, str] = {"shape-supervised-vit": "clip-tiny-64", "shape-supervised-cnn": "clip-tiny-cnn-64",
                               "shape-supervised-hybrid": "clip-tiny-hybrid-64"}  # fmt: skip
SUPERVISED_STEPS, SUPERVISED_BATCH = 200, 128


def run_trial(name: str, train: Path, val: Path, work: Path, tiny: bool) -> dict[str, Any]:
    from mmcl.config import load_experiment
    from mmcl.demo import evaluate_run
    from mmcl.engine.trainer import train as train_run

    preset, steps, batch, overrides, what = TRIALS[name]
    if tiny:
        steps, batch = 3, 16
    out = work / name
    cfg = load_experiment(None, [
        f"model.preset={preset}", f"data.train_shards=[{train}]", f"data.batch_size={batch}", "data.num_workers=2",
        f"train.steps={steps}", f"train.output_dir={out}", "train.trackers=[none]", "train.progress=false",
        f"train.ckpt_every={steps}", "train.log_every=10", "train.seed=0", f"eval.shards=[{val}]",
        f"eval.classnames={train / 'classnames.txt'}", "eval.templates=short", *overrides,
    ])  # fmt: skip
    t0 = time.perf_counter()
    train_run(cfg)
    train_s = time.perf_counter() - t0
    results = evaluate_run(out, cfg)
    rows = [json.loads(line) for line in (out / "eval" / "zeroshot" / "predictions.jsonl").read_text().splitlines()]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    return {
        "trial": name, "what": what, "preset": preset, "steps": steps, "batch": batch, "overrides": overrides,
        "train_s": round(train_s, 1), "final_loss": round(losses[-1], 3) if losses else None,
        "top1": results["zeroshot"]["top1"], "top5": results["zeroshot"].get("top5"),
        "t2i_recall@5": results["retrieval"]["t2i_recall@5"],
        "colour_acc": sum(r["label"] // 5 == r["pred"] // 5 for r in rows) / len(rows),
        "shape_acc": sum(r["label"] % 5 == r["pred"] % 5 for r in rows) / len(rows),
        "shape_probe": shape_probe(out, val, train / "classnames.txt"),
    }  # fmt: skip


def run_supervised(name: str, tiny: bool) -> dict[str, Any]:
    """The preset's image tower + a linear head trained with cross-entropy on the shape of built-in samples
    (AdamW lr 1e-3, batch 128, fresh samples each step); held-out shape accuracy on 500 validation images."""
    import numpy as np
    import torch

    from mmcl.config import load_experiment
    from mmcl.data.synthetic import SHAPES, generate
    from mmcl.models.towers import build_image_tower

    preset = SUPERVISED[name]
    steps, batch = (3, 16) if tiny else (SUPERVISED_STEPS, SUPERVISED_BATCH)
    torch.manual_seed(0)
    tower = build_image_tower(load_experiment(None, [f"model.preset={preset}"]).model.image, len(SHAPES))
    mean, std = torch.tensor(tower.mean).view(1, 3, 1, 1), torch.tensor(tower.std).view(1, 3, 1, 1)

    def shapes_batch(start: int, n: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        samples = [generate(i, image_size=64, split=split) for i in range(start, start + n)]
        pixels = torch.from_numpy(np.stack([np.asarray(s.image) for s in samples])).permute(0, 3, 1, 2)
        return (pixels.float() / 255 - mean) / std, torch.tensor([s.label % len(SHAPES) for s in samples])

    val_x, val_y = shapes_batch(0, 100 if tiny else 500, "val")
    opt = torch.optim.AdamW(tower.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for step in range(steps):
        x, y = shapes_batch(step * batch, batch, "train")
        loss = torch.nn.functional.cross_entropy(tower(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    tower.eval()
    with torch.no_grad():
        acc = (tower(val_x).argmax(1) == val_y).float().mean().item()
    return {"trial": name, "preset": preset, "steps": steps, "batch": batch, "final_loss": round(loss.item(), 3),
            "shape_acc": acc, "train_s": round(time.perf_counter() - t0, 1)}  # fmt: skip


def shape_probe(run: Path, val: Path, classnames_file: Path) -> float:
    """Held-out accuracy of a logistic regression from image embeddings to the 5 shapes (chance 20%)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from mmcl.eval.datasets import open_eval_dataset
    from mmcl.eval.templates import load_classnames
    from mmcl.inference import load_pipeline

    samples = list(open_eval_dataset([str(val)], classnames=load_classnames(classnames_file)))
    features = load_pipeline(run).encode_images([s.image for s in samples]).numpy()
    shapes = np.array([s.label % 5 for s in samples])
    cut = int(0.6 * len(samples))
    probe = LogisticRegression(max_iter=2000).fit(features[:cut], shapes[:cut])
    return float(probe.score(features[cut:], shapes[cut:]))


def write(res: dict[str, Any], out: Path | None) -> tuple[Path, Path]:
    """bench/results/recipe.{json,md} (or `out`) through the one results writer."""

    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    rows = [
        [r["trial"], r["what"], r["preset"], r["steps"], r["batch"], " ".join(r["overrides"]), r["final_loss"],
         pct(r["top1"]), pct(r["top5"]), pct(r["t2i_recall@5"]), pct(r["colour_acc"]), pct(r["shape_acc"]),
         pct(r["shape_probe"]), r["train_s"]]
        for r in res["results"] if r["trial"] in TRIALS
    ]  # fmt: skip
    supervised = [[r["trial"], r["preset"], r["steps"], r["batch"], r["final_loss"], pct(r["shape_acc"]), r["train_s"]]
                  for r in res["results"] if r["trial"] in SUPERVISED]  # fmt: skip
    headers = ["trial", "tests", "preset", "steps", "batch", "overrides", "final loss", "top-1", "top-5",
               "t2i R@5", "colour acc", "shape acc", "shape probe", "train s"]  # fmt: skip
    supervised_table = Table(
        ["trial", "preset", "steps", "batch", "final loss", "shape acc", "train s"],
        supervised,
        "Can the image tower see shape at all? Trained on the shape labels directly (cross-entropy, AdamW 1e-3, "
        "fresh built-in samples each step), held-out shape accuracy on 500 images (chance 20%):",
    )
    intro = (
        "Fixed optimizer steps per trial; held-out split of 1,000 images, 40 classes (chance 2.5%), 'short' "
        "templates. colour / shape acc: the zero-shot prediction's colour / shape is right (chance 12.5% / 20%); "
        "shape probe: logistic regression from image embeddings to shape on held-out images (chance 20%)."
    )
    title = "Small-data recipe sweep (mmcl CLIP, built-in shapes, 64 px)"
    return write_results("recipe", rows, headers, title, machine=res["machine"], intro=intro,
                         tables=[supervised_table], data=res, command=res["command"], out_dir=out)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--trials",
        nargs="+",
        choices=[*TRIALS, *SUPERVISED],
        default=[*(t for t in TRIALS if t not in OPT_IN), *SUPERVISED],
    )
    p.add_argument("--tiny", action="store_true", help="3 steps on 1,200 samples: a check of the script")
    p.add_argument("--results", type=Path, default=None, help="results folder (default bench/results/)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    n_train, n_val = (1200, 200) if args.tiny else (20000, 1000)
    train = synthetic_shards(DATA / f"synthetic_train_64px_{n_train}", n_train, "train", 64, max(n_train // 20, 1))
    val = synthetic_shards(DATA / f"synthetic_val_64px_{n_val}", n_val, "val", 64, 250)
    work = Path(tempfile.mkdtemp(prefix="bench_recipe_"))
    results = []
    try:
        for name in args.trials:
            run = run_supervised if name in SUPERVISED else lambda n, t: run_trial(n, train, val, work, t)
            results.append(run(name, args.tiny))
            print(json.dumps(results[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = {"benchmark": "recipe", "command": reproduce_command("bench_recipe.py"), "machine": machine_info(),
           "results": results}  # fmt: skip
    out = args.results or (Path(tempfile.mkdtemp(prefix="bench_recipe_results_")) if args.tiny else None)
    write(res, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
