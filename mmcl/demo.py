"""The end-to-end demo on built-in data: shards -> train a tiny CLIP -> evaluate -> report -> app index.

    from mmcl.demo import run_demo
    run_demo("runs/demo")                      # what `mmcl demo` and `bash pipelines/demo.sh` run

Everything lands in the run folder: `REPORT.md` (metrics, compositional table, what the recipe buys over plain CLIP,
curves, confusion matrix, example predictions), `eval/`, `metrics.jsonl`, `curves.png`, checkpoints, `final/`, and
`index/` (the retrieval index the app serves).

The recipe is `configs/recipes/binding.yaml` (the reasons and the measured numbers are there): a small CNN
(`clip-demo-cnn`) trained with counterfactual images (`counterfactual` term: each training scene comes with the
same scene with one thing changed, and its caption), so that the model binds colour to shape and objects to places
instead of matching captions by colour alone.
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

# The recipe, as overrides of the defaults; configs/clip/demo.yaml holds the same (a test checks), and
# configs/recipes/binding.yaml documents it (why each choice, the measured numbers, the reproducing command).
DEMO_RECIPE = [
    "model.preset=clip-demo-cnn",
    "data.batch_size=128",
    "data.num_workers=1",
    "data.shuffle_buffer=2000",
    "loss.terms=[counterfactual]",
    "train.lr=1e-3",
    "train.weight_decay=0.1",
    "train.warmup_steps=30",
    "train.grad_clip=1.0",
    "train.log_every=10",
    "train.ckpt_every=100",
    "train.eval_every=200",  # 2 evaluations in training, not 4: the recipe's steps cost 3.7x the old demo's
    "eval.templates=short",
    "eval.max_samples=1000",
    "eval.batch_size=256",
]


@dataclass
class DemoSettings:
    """Sizes of the demo; the defaults take about 5 minutes on a quiet 2-core CPU (estimated: bench/results/binding.md).

    The training shards carry one counterfactual scene per sample (`KEY.cf.*`), which the recipe's loss uses."""

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
    from mmcl.engine.trainer import train
    from mmcl.eval.hook import default_eval_hook

    s = settings or DemoSettings()
    started = time.perf_counter()
    log.info("[1/4] writing built-in synthetic shards (with counterfactual scenes) to %s", s.data)
    make_demo_shards(s)
    cfg = demo_config(s, extra)
    log.info("[2/4] training a tiny CLIP for %d steps (CPU) into %s", cfg.train.steps, s.out)
    train(cfg, eval_hook=default_eval_hook(cfg))
    log.info("[3/4] evaluating on the held-out split")
    results = evaluate_run(s.out, cfg)
    log.info("[4/4] indexing the held-out images and bundled photographs for the app")
    build_demo_index(s)
    write_demo_report(s.out, cfg, results, time.perf_counter() - started)
    return results


def make_demo_shards(s: DemoSettings) -> Path:
    """`s.data/train` (each sample with a counterfactual scene), `s.data/val` and `s.data/classnames.txt`.

    Re-running with the same settings keeps what is written; a `train` folder written without counterfactuals (a
    demo before the binding recipe) is refused with a one-line error naming it (delete it or give another --data).
    """
    from mmcl.data.synthetic import CLASSNAMES
    from mmcl.data.writer import write_synthetic_shards

    kw = {"image_size": s.image_size, "maxcount": 1000, "num_workers": 2, "progress": True}
    write_synthetic_shards(s.data / "train", s.n_train, split="train", counterfactuals=True, **kw)
    write_synthetic_shards(s.data / "val", s.n_val, split="val", **kw)
    atomic_write_text(s.data / "classnames.txt", "".join(c + "\n" for c in CLASSNAMES))
    return s.data


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


MEASURED = "recipes/binding.measured.json"  # under the shipped configs: the benchmark's comparison, for the report
MEASURED_ROWS = {"top1": "zero-shot top-1", "shape_acc": "zero-shot prediction's shape right",
                 "t2i_recall@5": "text->image R@5", "comp_replace_shape": "compositional: shape",
                 "comp_swap_att": "compositional: swapped attributes", "comp_swap_obj": "compositional: swapped objects",
                 "comp_change_count": "compositional: count", "comp_change_position": "compositional: position",
                 "group_mean_group": "group score: counterfactual image pairs, both ways (chance 16.7%)",
                 "heldout_tpl_top1": "zero-shot top-1, templates never trained on",
                 "unseen_top1": "zero-shot top-1, colour-shape pairs never seen", "digits_top1": "real digits: zero-shot top-1"}  # fmt: skip


def recipe_comparison_lines() -> list[str]:
    """The report's section on what the recipe buys: the benchmark's measured comparison shipped with the recipe
    (`configs/recipes/binding.measured.json`, written from bench/results/binding.json), not this run's numbers.
    Empty when the file is not shipped (a trimmed install): the report stays correct without it."""
    from mmcl.config.experiment import shipped_configs_dir

    root = shipped_configs_dir()
    path = root / MEASURED if root else None
    if path is None or not path.is_file():
        return []
    measured = json.loads(path.read_text())
    columns = measured["columns"]  # config name -> its heading
    rows = [f"| {label} | " + " | ".join(_measured_cell(measured["metrics"][c].get(k)) for c in columns) + " |"
            for k, label in MEASURED_ROWS.items() if any(k in measured["metrics"][c] for c in columns)]  # fmt: skip
    return [
        "## What the recipe buys over plain CLIP (measured by the benchmark, not by this run)",
        "",
        f"{measured['note']} Reproduce: `{measured['command']}`.",
        "",
        "| metric | " + " | ".join(columns.values()) + " |",
        "|---" * (len(columns) + 1) + "|",
        *rows,
        "",
    ]


def _measured_cell(v: dict | None) -> str:
    if not v:
        return "-"
    seeds = f" ({v['n']} seeds)" if v.get("n", 1) > 1 else " (1 seed)"
    return f"{v['mean']:.1%}{seeds}"


def write_demo_report(run: Path, cfg: ExperimentConfig, results: dict, seconds: float) -> Path:
    from mmcl.eval.report import compositional_table

    zs, ret = results["zeroshot"], results["retrieval"]
    chance = 1 / results["n_classes"]
    lines = [
        "# mmcl demo report",
        "",
        f"A tiny CLIP (`{cfg.model.preset}`, loss {', '.join(t.name for t in cfg.loss.terms)}) trained for "
        f"{cfg.train.steps} steps of {cfg.data.batch_size} on the built-in synthetic shapes, evaluated on the "
        f"held-out split. Total time {seconds / 60:.1f} min. The recipe: configs/recipes/binding.yaml.",
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
        *recipe_comparison_lines(),
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
