"""Does the demo's recipe bind colour to shape, objects to places? The recipe against plain CLIP and open_clip.

    python -m bench.bench_binding                          # the whole table; results/binding.{json,md}
    python -m bench.bench_binding --configs recipe clip-cnn --seeds 0 --checks shapes
    python -m bench.bench_binding --resume                 # continue a cut run from binding.partial.json
    python -m bench.bench_binding --report-partial         # write the table from what has finished, train nothing
    python -m bench.bench_binding --tiny                   # seconds-long check of the script (temp folder)

Every configuration trains for the same number of optimizer steps (`--steps`, the demo's 400 x 128) on the demo's
data (the built-in shapes at 32 px: 20,000 training samples, 1,000 held-out, 40 colour x shape classes), in a
child process (`bench_train.Bench.launch`, which times every optimizer step), and is judged on three checks,
each its own training run:

* **shapes**: trained on the demo's shards (with one counterfactual scene per sample, `KEY.cf.*`, where the
  configuration's loss uses them); evaluated on the held-out split: zero-shot top-1 with the 'short' templates
  and with held-out phrasings it never saw (`HELDOUT_TEMPLATES`), the share of predictions whose shape / colour
  is right, text->image R@5, every compositional subset (`mmcl.eval.compositional`, the demo's pairs) and
  Winoground's group score on counterfactual image pairs (`mmcl.eval.group_scores`);
* **unseen**: trained on shards from which every scene showing one of `HELDOUT_CLASSES` (as the main object, the
  distractor, or the counterfactual) is left out; zero-shot top-1 and shape accuracy on held-out images of exactly
  those classes (the model must name a green cross it has only seen as green things and as crosses);
* **digits**: the same configuration on scikit-learn's handwritten digits (1,437 training images at 32 px, their
  captions), zero-shot on the 360 test digits (10 classes): a recipe must not be worse on real images.

open_clip trains with its own trainer and defaults (lr 5e-4, wd 0.2, warmup 10%) on the same tower
(`open_clip-demo-cnn`: resnet10t at channels 24-192, registered by `common.patch_open_clip`) and is
evaluated by the same code. Accuracies after a fixed number of steps do not depend on the machine's load; the wall
time does, so the table gives each configuration's speed only as a ratio to the old demo's measured in this run.

Resumable: every finished run is saved to `binding.partial.json` in the results folder as it completes.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    DATA,
    REPO,
    RESULTS,
    machine_info,
    machine_markdown,
    markdown_table,
    reproduce_command,
)
from bench.common import write_files as write_results

HELDOUT_CLASSES = ("green cross", "red star", "blue triangle", "yellow circle")  # one per shape x colour, 4 of 40
# Phrasings unlike the training captions ("a picture of ...", "there is ...") and unlike the 'short' templates
HELDOUT_TEMPLATES = ("an illustration showing a {}.", "{} on a plain background", "this picture contains a {}",
                     "a simple drawing: {}", "look, a {}!")  # fmt: skip
IMAGE_SIZE = 32  # the demo's shards
OPTIM = ["train.lr=1e-3", "train.weight_decay=0.1", "train.grad_clip=1.0", "data.shuffle_buffer=2000"]  # the demo's


@dataclass(frozen=True)
class Config:
    """One row of the table: a tower and an objective (mmcl), or open_clip on a tower."""

    what: str  # for the table
    kind: str = "mmcl"  # or "open_clip"
    preset: str = ""  # mmcl model preset, or open_clip model name
    terms: str = "[clip]"
    cf_data: bool = False  # train on shards with a counterfactual scene per sample
    extra: tuple[str, ...] = field(default_factory=tuple)


CNN = "clip-demo-cnn"
CONFIGS: dict[str, Config] = {
    "recipe": Config("the recipe: CNN + counterfactual images", preset=CNN, terms="[counterfactual]", cf_data=True),
    "clip-cnn": Config("plain CLIP, the recipe's tower (counterfactual images off)", preset=CNN),
    "clip-vit": Config("the old demo: clip-demo ViT, plain CLIP", preset="clip-demo"),
    "open_clip-cnn": Config("open_clip, the recipe's tower, its defaults", kind="open_clip", preset="open_clip-demo-cnn"),
    "cf-vit": Config("counterfactual images on the old demo's ViT", preset="clip-demo", terms="[counterfactual]",
                     cf_data=True),
    "negclip-cnn": Config("text negatives (NegCLIP, 3 per caption) instead of counterfactual images", preset=CNN,
                          terms="[negclip]"),
    "recipe+negclip": Config("the recipe + NegCLIP's text negatives (weight 0.5)", preset=CNN,
                             terms="[counterfactual, {name: negclip, weight: 0.5}]", cf_data=True),
}  # fmt: skip
CHECKS = ("shapes", "unseen", "digits")


# ----------------------------------------------------------------------------- data


def _involves(scene: Any, held: set[str]) -> bool:
    return f"{scene.colour} {scene.shape}" in held or (scene.distractor or "") in held


def shows_heldout(index: int, split: str, held: set[str], counterfactuals: bool, seed: int = 0) -> bool:
    """Whether sample `index` (or, with `counterfactuals`, any counterfactual edit of it) shows a held-out class."""
    from mmcl.data.counterfactual import EDITS
    from mmcl.data.synthetic import scene_of

    scene = scene_of(index, seed, split)
    if _involves(scene, held):
        return True
    if counterfactuals:  # the writer picks one applicable edit: leave the sample out if any edit could show one
        for name, edit in EDITS.items():
            edited = edit(scene, random.Random(f"mmcl-counterfactual/{split}/{seed}/{index}/{name}"))
            if edited is not None and _involves(edited, held):
                return True
    return False


class FilteredSynthetic:
    """The built-in generator's samples, keeping those whose main class is (`keep_heldout`) or whose scene
    (counterfactuals included) is not (`not keep_heldout`) in `held`; `n` kept samples, rendered in the workers."""

    def __init__(self, n: int, split: str, held: tuple[str, ...], keep_heldout: bool, counterfactuals: bool = False):
        from mmcl.data.synthetic import CLASSNAMES

        self.n, self.split, self.held, self.keep = n, split, set(held), keep_heldout
        self.counterfactuals, self.classnames = counterfactuals, list(CLASSNAMES)

    def __len__(self) -> int:
        return self.n

    def describe(self) -> dict[str, Any]:
        return {"type": "synthetic-filtered", "n": self.n, "split": self.split, "held": sorted(self.held),
                "keep_heldout": self.keep, "counterfactuals": self.counterfactuals, "image_size": IMAGE_SIZE}  # fmt: skip

    def __iter__(self):
        from mmcl.data.sources import RawSample, _synthetic_sample
        from mmcl.data.synthetic import scene_of

        kept, i = 0, 0
        while kept < self.n:
            if self.keep:
                ok = f"{scene_of(i, 0, self.split).colour} {scene_of(i, 0, self.split).shape}" in self.held
            else:
                ok = not shows_heldout(i, self.split, self.held, self.counterfactuals)
            if ok:
                loader = functools.partial(_synthetic_sample, i, 0, self.split, IMAGE_SIZE, self.counterfactuals)
                yield RawSample(f"synthetic/{self.split}/0/{i}", loader=loader)
                kept += 1
            i += 1


def datasets(tiny: bool, data_root: Path = DATA) -> dict[str, Path]:
    """Every shard folder the checks need, written once under `data_root`/binding/ (default data/bench/)."""
    from mmcl.data.synthetic import CLASSNAMES
    from mmcl.data.writer import write_real_shards, write_shards, write_synthetic_shards
    from mmcl.utils import atomic_write_text

    n_train, n_val, n_unseen = (1200, 200, 100) if tiny else (20000, 1000, 200)
    root = data_root / "binding" / ("tiny" if tiny else "full")
    kw = {"image_size": IMAGE_SIZE, "maxcount": max(n_train // 20, 1), "num_workers": 2, "progress": False}
    out = {
        "train": root / "train",
        "train_cf": root / "train_cf",
        "val": root / "val",
        "unseen_train": root / "unseen_train",
        "unseen_train_cf": root / "unseen_train_cf",
        "unseen_val": root / "unseen_val",
        "digits_train": data_root / "digits_train_32px",
        "digits_test": data_root / "digits_test_32px",
    }
    write_synthetic_shards(out["train"], n_train, split="train", **kw)
    write_synthetic_shards(out["train_cf"], n_train, split="train", counterfactuals=True, **kw)
    write_synthetic_shards(out["val"], n_val, split="val", **kw)
    write_shards(FilteredSynthetic(n_train, "train", HELDOUT_CLASSES, False), out["unseen_train"], **kw)
    write_shards(FilteredSynthetic(n_train, "train", HELDOUT_CLASSES, False, True), out["unseen_train_cf"], **kw)
    write_shards(FilteredSynthetic(n_unseen, "val", HELDOUT_CLASSES, True), out["unseen_val"], **kw)
    for split in ("train", "test"):
        if not (out[f"digits_{split}"] / "classnames.txt").is_file():
            write_real_shards(out[f"digits_{split}"], "digits", split=split, image_size=32, progress=False)
    atomic_write_text(root / "classnames.txt", "".join(c + "\n" for c in CLASSNAMES))
    templates = root / "heldout_templates.txt"
    atomic_write_text(templates, "".join(t + "\n" for t in HELDOUT_TEMPLATES))
    out.update(classnames=root / "classnames.txt", templates=templates)
    return out


# ----------------------------------------------------------------------------- evaluation


def _zero_shot(pipe: Any, shards: Path, classnames_file: Path, templates: str | Path) -> dict[str, float]:
    from mmcl.eval.datasets import open_eval_dataset
    from mmcl.eval.runner import evaluate_zero_shot
    from mmcl.eval.templates import load_classnames, load_templates

    classnames = load_classnames(classnames_file)
    zs = evaluate_zero_shot(pipe, open_eval_dataset(str(shards), classnames=classnames), classnames,
                            load_templates(templates), batch_size=256)  # fmt: skip
    rows = zs["predictions"]
    out = {"top1": zs["metrics"]["top1"]}
    if len(classnames) == 40:  # the built-in shapes' label order: colour-major, 5 shapes
        out["shape_acc"] = sum(r["label"] % 5 == r["pred"] % 5 for r in rows) / len(rows)
        out["colour_acc"] = sum(r["label"] // 5 == r["pred"] // 5 for r in rows) / len(rows)
    return out


def evaluate(check: str, pipe: Any, data: dict[str, Path], tiny: bool) -> dict[str, Any]:
    """The metrics of one check (see the module docstring)."""
    if check == "digits":
        return {"digits_top1": _zero_shot(pipe, data["digits_test"], data["digits_test"] / "classnames.txt",
                                          "short")["top1"]}  # fmt: skip
    if check == "unseen":
        zs = _zero_shot(pipe, data["unseen_val"], data["classnames"], "short")
        return {"unseen_top1": zs["top1"], "unseen_shape_acc": zs["shape_acc"]}
    from mmcl.eval.compositional import evaluate_compositional, generated_pairs
    from mmcl.eval.datasets import open_eval_dataset
    from mmcl.eval.group_scores import counterfactual_groups, evaluate_group_scores
    from mmcl.eval.runner import evaluate_retrieval

    out: dict[str, Any] = _zero_shot(pipe, data["val"], data["classnames"], "short")
    held = _zero_shot(pipe, data["val"], data["classnames"], data["templates"])
    out.update(heldout_tpl_top1=held["top1"], heldout_tpl_shape_acc=held["shape_acc"])
    out["t2i_recall@5"] = evaluate_retrieval(pipe, open_eval_dataset(str(data["val"])), batch_size=256)["metrics"][
        "t2i_recall@5"
    ]
    pairs = generated_pairs(open_eval_dataset(str(data["val"])), max_per_subset=200)  # the demo's pairs
    comp = evaluate_compositional(pipe, pairs, batch_size=256, num_examples=0)
    out.update({f"comp_{k}": float(v) for k, v in comp["metrics"].items() if k != "n_pairs"})
    groups = counterfactual_groups(60 if tiny else 400, split="val", image_size=IMAGE_SIZE)
    gs = evaluate_group_scores(pipe, groups, batch_size=256)["metrics"]
    out.update({f"group_{k}": v for k, v in gs.items() if k.endswith("_group")})
    return out


# ----------------------------------------------------------------------------- runs


def train_shards(config: Config, check: str, data: dict[str, Path]) -> Path:
    if check == "digits":
        return data["digits_train"]
    base = "unseen_train" if check == "unseen" else "train"
    return data[base + ("_cf" if config.cf_data else "")]


def mmcl_overrides(config: Config, image_size: int, steps: int, seed: int) -> list[str]:
    return [*OPTIM, f"train.warmup_steps={min(30, max(1, steps // 10))}", f"model.image.image_size={image_size}",
            f"loss.terms={config.terms}", f"train.seed={seed}", *config.extra]  # fmt: skip


def one_run(bench: Any, config_name: str, check: str, seed: int, args: argparse.Namespace, data: dict[str, Path],
            work: Path) -> dict[str, Any]:  # fmt: skip
    from bench.bench_objectives import open_clip_pipe
    from mmcl.inference import load_pipeline

    config = CONFIGS[config_name]
    name = f"{config_name}_{check}_s{seed}".replace("+", "p")
    shards = train_shards(config, check, data)
    load0 = [round(v, 2) for v in os.getloadavg()]
    if config.kind == "mmcl":
        argv = bench.mmcl_args(name, config.preset, shards, args.steps, args.batch_size,
                               mmcl_overrides(config, IMAGE_SIZE, args.steps, seed))  # fmt: skip
    else:
        argv = bench.open_clip_args(name, config.preset, shards, args.steps, args.batch_size, ["--seed", str(seed)])
    res = bench.launch(name, config.kind, argv, args.batch_size, skip=min(6, args.steps // 2))
    row: dict[str, Any] = {"config": config_name, "check": check, "seed": seed, "steps": res.get("steps"),
                           "samples_per_s": res.get("samples_per_s"), "train_wall_s": res.get("wall_s"),
                           "cpu_s": res.get("cpu_s"), "loadavg_before": load0}  # fmt: skip
    if "error" in res:
        row["error"] = res["error"][-500:]
    else:
        pipe = load_pipeline(work / name) if config.kind == "mmcl" else open_clip_pipe(work, name, config.preset)
        row.update(evaluate(check, pipe, data, args.tiny))
    row["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    shutil.rmtree(work / name, ignore_errors=True)
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.bench_train import Bench

    data = datasets(args.tiny, args.data)
    work = Path(tempfile.mkdtemp(prefix="bench_binding_"))
    bench = Bench(argparse.Namespace(workers=args.workers, run_timeout=args.run_timeout), work)
    partial = args.results_dir / "binding.partial.json"
    results: dict[str, Any] = {"runs": []}
    if args.resume and partial.is_file():
        results = json.loads(partial.read_text())
        print(f"resuming from {partial}: {len(results['runs'])} runs")
    done = {(r["config"], r["check"], r["seed"]) for r in results["runs"] if "error" not in r}
    results["runs"] = [r for r in results["runs"] if "error" not in r]
    # seed 0 of everything first, each configuration's checks together: a run cut short still has whole rows
    todo = [(c, k, s) for s in args.seeds for c in args.configs for k in args.checks]
    if args.step_cost and "step_cost" not in results:
        results["step_cost"] = step_cost(data, work)
        print(json.dumps(results["step_cost"]), flush=True)
    try:
        for config_name, check, seed in todo:
            if (config_name, check, seed) in done:
                continue
            row = one_run(bench, config_name, check, seed, args, data, work)
            print(json.dumps(row), flush=True)
            results["runs"].append(row)
            from mmcl.utils import atomic_write_text

            args.results_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(partial, json.dumps(results, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def step_cost(data: dict[str, Path], work: Path, configs: tuple[str, ...] = ("clip-vit", "recipe")) -> dict[str, Any]:
    """CPU seconds (trainer + loader worker) and wall seconds per optimizer step of each configuration, from the
    difference of a 13-step and a 3-step run in this process (start-up and the final save cancel out), one thread
    each, one after the other: the ratio to the old demo (clip-vit) is what the demo's time budget needs, and CPU
    time barely depends on what else the machine runs."""
    import resource

    from mmcl.config import load_experiment
    from mmcl.engine.trainer import train

    def cpu() -> float:
        a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime

    out: dict[str, Any] = {}
    for name in configs:
        config, measured = CONFIGS[name], []
        for steps in (3, 13):
            cfg = load_experiment(None, [
                f"model.preset={config.preset}", f"data.train_shards=[{train_shards(config, 'shapes', data)}]",
                "data.batch_size=128", "data.num_workers=1", f"train.steps={steps}", f"train.output_dir={work / name}",
                "train.trackers=[none]", "train.progress=false", "train.ckpt_every=100000",
                *mmcl_overrides(config, IMAGE_SIZE, steps, 0),
            ])  # fmt: skip
            c0, t0 = cpu(), time.perf_counter()
            train(cfg)
            measured.append((cpu() - c0, time.perf_counter() - t0))
            shutil.rmtree(work / name, ignore_errors=True)
        out[name] = {"cpu_s_per_step": (measured[1][0] - measured[0][0]) / 10,
                     "wall_s_per_step": (measured[1][1] - measured[0][1]) / 10, "loadavg_after": os.getloadavg()[0]}  # fmt: skip
    base = out.get("clip-vit", {}).get("cpu_s_per_step")
    for v in out.values():
        v["cpu_ratio_vs_old_demo"] = v["cpu_s_per_step"] / base if base else None
    return out


# ----------------------------------------------------------------------------- the table

COLUMNS = [  # (metric, header, check)
    ("top1", "top-1 %", "shapes"), ("shape_acc", "shape %", "shapes"), ("colour_acc", "colour %", "shapes"),
    ("t2i_recall@5", "t2i R@5 %", "shapes"), ("comp_replace_colour", "colour pairs %", "shapes"),
    ("comp_replace_shape", "shape pairs %", "shapes"), ("comp_swap_att", "swap_att %", "shapes"),
    ("comp_swap_obj", "swap_obj %", "shapes"), ("comp_change_count", "count %", "shapes"),
    ("comp_change_position", "position %", "shapes"), ("group_mean_group", "group score %", "shapes"),
    ("heldout_tpl_top1", "held-out templates top-1 %", "shapes"), ("unseen_top1", "unseen combos top-1 %", "unseen"),
    ("unseen_shape_acc", "unseen combos shape %", "unseen"), ("digits_top1", "digits top-1 %", "digits"),
]  # fmt: skip


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and range over seeds per configuration, each metric from the check that measures it."""
    out = []
    for config_name in sorted({r["config"] for r in runs}, key=list(CONFIGS).index):  # the table in CONFIGS' order
        rs = [r for r in runs if r["config"] == config_name and "error" not in r]
        row: dict[str, Any] = {"config": config_name, "what": CONFIGS[config_name].what}
        shapes = [r for r in rs if r["check"] == "shapes"]
        row["seeds"] = {k: len([r for r in rs if r["check"] == k]) for k in CHECKS}
        row["steps"] = rs[0]["steps"] if rs else None
        sps = [r["samples_per_s"] for r in shapes if r.get("samples_per_s")]
        row["samples_per_s"] = statistics.fmean(sps) if sps else None
        for metric, _, check in COLUMNS:
            values = [r[metric] for r in rs if r["check"] == check and metric in r]
            if values:
                row[metric] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
                               "n": len(values)}  # fmt: skip
        out.append(row)
    return out


def speed_ratios(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Each configuration's samples/s on the shapes check over the old demo's (clip-vit), per seed pass
    (runs of one pass ran minutes apart, under similar load), averaged over the passes."""
    base = {r["seed"]: r["samples_per_s"] for r in runs if r["config"] == "clip-vit" and r["check"] == "shapes"}
    ratios: dict[str, list[float]] = {}
    for r in runs:
        if r["check"] == "shapes" and r.get("samples_per_s") and base.get(r["seed"]):
            ratios.setdefault(r["config"], []).append(r["samples_per_s"] / base[r["seed"]])
    return {k: statistics.fmean(v) for k, v in ratios.items()}


def to_markdown(res: dict[str, Any]) -> str:
    def cell(v: dict[str, float] | None) -> str:
        if not v:
            return "-"
        single = v.get("n", 2) == 1
        return f"{100 * v['mean']:.1f}" + ("*" if single else f" ({100 * v['min']:.0f}-{100 * v['max']:.0f})")

    ratios = {k: v["cpu_ratio_vs_old_demo"] for k, v in res.get("step_cost", {}).items()} or res.get(
        "speed_vs_old_demo", {}
    )
    headers = ["config", "what", "steps", "CPU per step vs old demo", *(h for _, h, _ in COLUMNS)]
    rows = [[r["config"], r["what"], r["steps"], f"{ratios[r['config']]:.2f}x" if r["config"] in ratios else "-",
             *(cell(r.get(m)) for m, _, _ in COLUMNS)] for r in res["summary"]]  # fmt: skip
    s = res["settings"]
    loads = [r.get("loadavg_after", [None])[0] for r in res["runs"]]
    return "\n\n".join([
        "# Binding on the built-in shapes: the demo's recipe against plain CLIP and open_clip (equal steps)",
        f"Every run: {s['steps']} steps x {s['batch_size']} at {IMAGE_SIZE} px (the demo's data and optimizer: lr 1e-3, "
        "wd 0.1, clip 1.0; open_clip: its defaults), seeds "
        f"{s['seeds']}; mean with the range in brackets (`*`: one seed only, the run was cut short). Held-out split: "
        "1,000 images, 40 classes (chance 2.5% top-1, colour 12.5%, shape 20%); compositional pairs: caption vs one "
        "hard negative (chance 50%); group score: Winoground's, on 400 held-out counterfactual image pairs (chance "
        f"16.7%); held-out templates: {', '.join(repr(t) for t in HELDOUT_TEMPLATES)}; unseen combos: trained "
        f"without any scene showing {', '.join(HELDOUT_CLASSES)}, zero-shot on 200 held-out images of exactly "
        "those classes; digits: the same configuration trained on 1,437 handwritten digits, zero-shot on 360 "
        "(chance 10%). Cost: CPU seconds per optimizer step relative to the old demo's (clip-vit), measured one after "
        "the other by `--step-cost` (`step_cost`); accuracies after a fixed number of steps do not depend on the "
        "load, wall times do, so none is given.",
        markdown_table(headers, rows),
        res.get("conclusion", ""),
        machine_markdown(res["machine"], during=loads),
        f"Reproduce: `{res['command']}`",
    ])  # fmt: skip


SHIPPED = REPO / "configs" / "recipes" / "binding.measured.json"  # what the demo report shows (mmcl.demo.MEASURED)
SHIPPED_COLUMNS = {"recipe": "the recipe", "clip-cnn": "plain CLIP, same tower and steps",
                   "clip-vit": "old demo (ViT, plain CLIP)", "open_clip-cnn": "open_clip, same tower and steps"}  # fmt: skip


def shipped_comparison(res: dict[str, Any]) -> dict[str, Any]:
    """The comparison the demo report shows, from this benchmark's summary: mean and seed count per metric."""
    by_config = {r["config"]: r for r in res["summary"]}
    columns = {c: h for c, h in SHIPPED_COLUMNS.items() if c in by_config}
    metrics = {c: {m: {"mean": round(by_config[c][m]["mean"], 4), "n": by_config[c][m]["n"]}
                   for m, _, _ in COLUMNS if m in by_config[c]} for c in columns}  # fmt: skip
    note = (f"{res['settings']['steps']} steps x {res['settings']['batch_size']} per run on the demo's data, mean over "
            "the seeds given; held-out templates, never-seen colour-shape pairs and real digits are separate "
            "training runs (bench/results/binding.md).")  # fmt: skip
    return {"columns": columns, "metrics": metrics, "note": note, "command": res["command"],
            "machine": res["machine"].get("cpu_model"), "date": res["machine"].get("date")}  # fmt: skip


def _public_args(given: list[str]) -> list[str]:
    """The command line to print as the reproducing command: no --resume / --report-partial, no local --data path."""
    out, skip = [], False
    for a in given:
        if skip:
            skip = False
        elif a == "--data":
            skip = True
        elif a not in ("--resume", "--report-partial") and not a.startswith("--data="):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--run-timeout", type=float, default=3600.0)
    p.add_argument("--tiny", action="store_true", help="3 steps on 1,200 samples: a check of the script")
    p.add_argument("--results", type=Path, default=None, help="results folder (default bench/results/)")
    p.add_argument("--step-cost", action="store_true", help="also measure CPU s per step: recipe vs old demo")
    p.add_argument("--data", type=Path, default=DATA, help="where the shards are written (default data/bench/)")
    p.add_argument("--resume", action="store_true", help="continue from the results folder's binding.partial.json")
    p.add_argument(
        "--report-partial", action="store_true", help="write the table from binding.partial.json, train nothing"
    )
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.batch_size = 3, 32
        args.results = args.results or Path(tempfile.mkdtemp(prefix="bench_binding_results_"))
    args.results_dir = args.results or RESULTS
    logging.basicConfig(level=logging.WARNING)
    given = sys.argv[1:] if argv is None else argv
    t0 = time.perf_counter()
    partial = args.results_dir / "binding.partial.json"
    res = json.loads(partial.read_text()) if args.report_partial else run(args)
    conclusion_file = args.results_dir / "binding.conclusion.md"  # the reading of the table, written by hand
    res.update(
        benchmark="binding",
        command=reproduce_command("bench_binding.py", _public_args(given)),
        machine=machine_info(),
        settings={
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("results_dir", "data")
        },
        wall_s=round(time.perf_counter() - t0, 1),
        loadavg_end=[round(v, 2) for v in os.getloadavg()],
        conclusion=conclusion_file.read_text() if conclusion_file.is_file() else "",
    )
    res["summary"] = summarise(res["runs"])
    res["speed_vs_old_demo"] = speed_ratios(res["runs"])
    paths = write_results("binding", res, to_markdown(res), args.results_dir)
    print("wrote", *paths)
    if args.results_dir == RESULTS:  # the published table: ship its comparison with the recipe, for the demo report
        from mmcl.utils import atomic_write_text

        atomic_write_text(SHIPPED, json.dumps(shipped_comparison(res), indent=1) + "\n")
        print("wrote", SHIPPED)
    return 0


if __name__ == "__main__":
    sys.exit(main())
