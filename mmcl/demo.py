"""The end-to-end demo on built-in data: shards -> train a tiny CLIP -> evaluate -> report -> app index.

    from mmcl.demo import run_demo
    run_demo("runs/demo")                      # what `mmcl demo` and `bash pipelines/demo.sh` run

Everything lands in the run folder: `REPORT.md` (metrics, compositional table, curves, confusion
matrix, example predictions), `eval/`, `metrics.jsonl`, `curves.png`, checkpoints, `final/`, and `index/` (the
retrieval index the app serves).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from mmcl.config import ExperimentConfig, load_experiment
from mmcl.utils import atomic_write_text

log = logging.getLogger("mmcl.demo")

# The recipe, as overrides of the defaults; configs/clip/demo.yaml holds the same (a test checks).
DEMO_RECIPE = [
    "model.preset=clip-demo",
    "data.batch_size=128",
    "data.num_workers=1",
    "data.shuffle_buffer=2000",
    "loss.terms=[clip]",
    "train.lr=1e-3",
    "train.weight_decay=0.1",
    "train.warmup_steps=30",
    "train.grad_clip=1.0",
    "train.log_every=10",
    "train.ckpt_every=100",
    "train.eval_every=100",
    "eval.templates=short",
    "eval.max_samples=1000",
    "eval.batch_size=256",
]


@dataclass
class DemoSettings:
    """Sizes of the demo; the defaults finish in under 10 minutes on a 2-core CPU."""

    out: Path = Path("runs/demo")
    data: Path = Path("data/demo")
    n_train: int = 20000
    n_val: int = 1000
    image_size: int = 32
    steps: int = 400


def demo_config(s: DemoSettings, extra: list[str] = ()) -> ExperimentConfig:
    shards = [
        f"data.train_shards=[{s.data / 'train'}]",
        f"eval.shards=[{s.data / 'val'}]",
        f"eval.classnames={s.data / 'classnames.txt'}",
        f"train.output_dir={s.out}",
        f"train.steps={s.steps}",
        f"model.image.image_size={s.image_size}",
    ]
    return load_experiment(None, [*DEMO_RECIPE, *shards, *extra])


def run_demo(settings: DemoSettings | None = None, extra: list[str] = ()) -> dict:
    """Run every stage (each one resumes if its output is already there) and return the final metrics."""
    from mmcl.data.writer import make_demo_data
    from mmcl.engine.trainer import train
    from mmcl.eval.hook import default_eval_hook

    s = settings or DemoSettings()
    started = time.perf_counter()
    log.info("[1/4] writing built-in synthetic shards to %s", s.data)
    make_demo_data(s.data, n_train=s.n_train, n_val=s.n_val, image_size=s.image_size, num_workers=2, progress=True)
    cfg = demo_config(s, extra)
    log.info("[2/4] training a tiny CLIP for %d steps (CPU) into %s", cfg.train.steps, s.out)
    train(cfg, eval_hook=default_eval_hook(cfg))
    log.info("[3/4] evaluating on the held-out split")
    results = evaluate_run(s.out, cfg)
    log.info("[4/4] indexing the held-out images and bundled photographs for the app")
    build_demo_index(s)
    write_demo_report(s.out, cfg, results, time.perf_counter() - started)
    return results


def evaluate_run(run: Path, cfg: ExperimentConfig) -> dict:
    """Zero-shot, retrieval and compositional pairs on `cfg.eval.shards` with the final model; reports under run/eval/."""
    from mmcl.eval.compositional import evaluate_compositional, generated_pairs
    from mmcl.eval.datasets import open_eval_dataset
    from mmcl.eval.report import write_report
    from mmcl.eval.runner import evaluate_retrieval, evaluate_zero_shot
    from mmcl.eval.templates import load_classnames, load_templates
    from mmcl.inference import load_pipeline

    pipe = load_pipeline(run)
    classnames = load_classnames(cfg.eval.classnames)
    zs = evaluate_zero_shot(
        pipe,
        open_eval_dataset(cfg.eval.shards, classnames=classnames),
        classnames,
        load_templates(cfg.eval.templates),
        batch_size=256,
        progress=True,
    )
    write_report(zs, run / "eval" / "zeroshot", title="Zero-shot classification (held-out split)")
    ret = evaluate_retrieval(pipe, open_eval_dataset(cfg.eval.shards), batch_size=256, progress=True)
    write_report(ret, run / "eval" / "retrieval", title="Image-text retrieval (held-out split)")
    pairs = generated_pairs(open_eval_dataset(cfg.eval.shards), max_per_subset=200, source="the held-out split")
    comp = evaluate_compositional(pipe, pairs, batch_size=256)
    write_report(comp, run / "eval" / "compositional", title="Compositional pairs (held-out split)")
    compositional = {k: comp[k] for k in ("metrics", "subsets", "chance")}
    return {
        "zeroshot": zs["metrics"],
        "retrieval": ret["metrics"],
        "compositional": compositional,
        "n_classes": len(classnames),
    }


def build_demo_index(s: DemoSettings) -> Path:
    """An index over the held-out shards plus the bundled photographs, for `mmcl app`."""
    from mmcl.data.writer import write_real_shards
    from mmcl.index import build_index
    from mmcl.inference import load_pipeline

    photos = s.data / "photos"
    write_real_shards(photos, "photos", image_size=128, progress=False)
    out = s.out / "index"
    build_index(
        load_pipeline(s.out),
        [str(s.data / "val"), str(photos)],
        out,
        overwrite=True,
        info={"run": str(s.out)},
        progress=True,
    )
    return out


def write_demo_report(run: Path, cfg: ExperimentConfig, results: dict, seconds: float) -> Path:
    from mmcl.eval.report import compositional_table

    zs, ret = results["zeroshot"], results["retrieval"]
    chance = 1 / results["n_classes"]
    lines = [
        "# mmcl demo report",
        "",
        f"A tiny CLIP (`{cfg.model.preset}`) trained for {cfg.train.steps} steps of {cfg.data.batch_size} on the "
        f"built-in synthetic shapes, evaluated on the held-out split. Total time {seconds / 60:.1f} min.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| zero-shot top-1 ({results['n_classes']} classes, chance {chance:.1%}) | {zs['top1']:.1%} "
        f"({zs['top1'] / chance:.1f}x chance) |",
        f"| zero-shot top-5 | {zs.get('top5', float('nan')):.1%} |",
        f"| mean per-class recall | {zs['mean_per_class_recall']:.1%} |",
        f"| text->image recall@1 / @5 / @10 | {ret['t2i_recall@1']:.1%} / {ret['t2i_recall@5']:.1%} / "
        f"{ret['t2i_recall@10']:.1%} |",
        f"| image->text recall@1 / @5 / @10 | {ret['i2t_recall@1']:.1%} / {ret['i2t_recall@5']:.1%} / "
        f"{ret['i2t_recall@10']:.1%} |",
        "",
        "## Compositional pairs: the image's caption against one hard negative",
        "",
        compositional_table(results["compositional"]),
        "![compositional examples](eval/compositional/examples.png)",
        "",
        "![training curves](curves.png)",
        "",
        "![confusion matrix](eval/zeroshot/confusion.png)",
        "",
        "![example predictions](eval/zeroshot/examples.png)",
        "",
        "![example retrievals](eval/retrieval/examples.png)",
        "",
        f"Open the app on this model: `mmcl app {run}` (then http://127.0.0.1:7860).",
        "",
    ]
    path = run / "REPORT.md"
    atomic_write_text(path, "\n".join(lines))
    atomic_write_text(run / "demo_results.json", json.dumps({**results, "seconds": seconds}, indent=1))
    return path
