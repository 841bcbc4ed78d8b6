"""The contrastive-learning objectives at equal steps (or equal wall time), against plain CLIP and open_clip.

    python -m bench.bench_objectives --image-size 32       # the default table: CNN, 8 objectives + open_clip,
                                                           # 300 steps, seeds 0 1 (~1 h on 2 quiet cores)
    python -m bench.bench_objectives --captions shapeless  # captions that never name the shape
    python -m bench.bench_objectives --towers vit cnn --objectives clip +simclr --budget-s 60   # equal wall time
    python -m bench.bench_objectives --tiny                # seconds-long check of the script (temp folder)

Data: the built-in synthetic shapes at 64 px (20,000 training samples, 1,000 held-out; 40 classes =
8 colours x 5 shapes), the same shards as `bench_train.py` / `bench_recipe.py`; with `--captions shapeless`
the same images with every shape noun replaced by "shape" in the training captions.

Per image tower (ViT: `clip-tiny-64` = open_clip's `open_clip-tiny-64`; CNN: `clip-tiny-cnn-narrow-64`, a timm
resnet10t narrowed to channels 38-304 so that the model has at most clip-tiny-64's parameters and image FLOPs
(8.94M vs 8.99M, 103.5 vs 187.6 MFLOPs) = open_clip's `open_clip-tiny-cnn-narrow-64` with `timm_model_name`
`resnet10t_narrow`, registered by `common.patch_open_clip`; opt-in `--towers hybrid`:
`clip-tiny-hybrid-64`, a conv stem feeding clip-tiny-64's ViT blocks, mmcl only), per objective (`OBJECTIVES`:
every loss term alone added to CLIP, and a combination) and per seed:

1. with `--budget-s` only, calibration (once per configuration, seed 0): a short run in a child process gives
   the steady-state samples/s of that configuration (`bench_train.Bench.launch`: the time of every step);
2. training: `--steps` steps (default 300: at 60 s per run, 18-92 steps, nothing learnt shape or position;
   at about 300 the CNN binds), or with `--budget-s` steps = budget_s x samples/s / batch, so every
   configuration trains for the same wall time on this machine; open_clip with its defaults (lr 5e-4,
   wd 0.2, warmup 10%), mmcl with the demo recipe (`mmcl.demo.DEMO_RECIPE`'s optimizer settings);
3. evaluation with mmcl's eval code for both libraries: zero-shot top-1 / top-5 ('short' templates),
   colour and shape accuracy of the zero-shot predictions, text->image R@5, and each compositional subset
   of the built-in shapes (`mmcl.eval.compositional`: up to 200 caption / hard-negative pairs per subset
   from held-out generator samples; chance 50%), a linear probe and DINO's k-NN on frozen image features
   (the 40 classes and shape alone), and alignment / uniformity (Wang & Isola 2020).

Every number in the table is the mean over seeds with the spread (min-max). Step counts depend on the
calibration's speed (recorded with the load average); accuracies after a given number of steps do not.

Resumable: the calibration and every finished run are saved to `objectives.partial.json` in the results folder
as they complete; `--resume` picks up from there (a killed 2-hour run loses one configuration, not the table).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    DATA,
    OPENCLIP_TINY_NAME,
    RESULTS,
    machine_info,
    machine_markdown,
    markdown_table,
    reproduce_command,
    synthetic_shards,
)
from bench.common import write_files as write_results

TOWERS = {"vit": ("clip-tiny-64", "open_clip-tiny-64"),
          "cnn": ("clip-tiny-cnn-narrow-64", "open_clip-tiny-cnn-narrow-64"),  # resnet10t cut to the ViT's size
          "hybrid": ("clip-tiny-hybrid-64", None)}  # conv stem + ViT blocks: no open_clip equivalent  # fmt: skip
NO_COLOUR = "augment: {jitter_p: 0, grayscale_p: 0, flip_p: 0}"  # keep what colour / position captions say
# name -> (loss.terms, extra overrides, ViT blocks only: the vit and hybrid towers)
OBJECTIVES: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "clip": ("[clip]", (), False),
    "+simclr": ("[clip, simclr]", (), False),
    "+simclr-nocolour": (f"[clip, {{name: simclr, {NO_COLOUR}}}]", (), False),
    "+simsiam": (f"[clip, {{name: simsiam, {NO_COLOUR}}}]", (), False),
    "+byol": (f"[clip, {{name: byol, {NO_COLOUR}}}]", (), False),
    "+simcse": ("[clip, simcse]", ("model.text.dropout=0.1",), False),
    "+mlm": ("[clip, {name: mlm, weight: 0.5}]", (), False),
    "moco": ("[moco]", (), False),
    "+nnclr": ("[clip, {name: nnclr, weight: 0.5}]", (), False),
    "negclip": ("[negclip]", (), False),
    "flip": ("[clip]", ("model.image.patch_dropout=0.5",), True),
    "negclip+simclr-nocolour": (f"[negclip, {{name: simclr, weight: 0.5, {NO_COLOUR}}}]", (), False),
    "+dino": (f"[clip, {{name: dino, weight: 0.5, {NO_COLOUR}}}]", (), False),
    "+swav": (f"[clip, {{name: swav, weight: 0.5, {NO_COLOUR}}}]", (), False),
    "+mocov3": (f"[clip, {{name: mocov3, weight: 0.5, {NO_COLOUR}}}]", (), False),
    "+instdisc": ("[clip, {name: instdisc, weight: 1.0, loss: softmax}]", (), False),  # the softmax learns in seconds
    "cmc": (f"[{{name: cmc, image_views: 1, graph: full, temperature: 0, {NO_COLOUR}}}]", (), False),
}
# The default table: plain CLIP, the text-negative baseline, the no-negative and clustering image terms, and the
# image terms with negatives (SimCLR, InstDisc, CMC), on the CNN (the tower that learns shape at all on this
# data), each for `--steps` steps.
# (+swav and +mocov3 showed no effect in the learning tests and are left out of it for time: add them by name.)
DEFAULT_OBJECTIVES = ["clip", "negclip", "+byol", "+simsiam", "+dino", "+simclr-nocolour", "+instdisc", "cmc"]
RECIPE = ["train.lr=1e-3", "train.weight_decay=0.1", "train.warmup_steps=30", "train.grad_clip=1.0", "data.crop_scale=[0.8,1.0]",
          "data.shuffle_buffer=2000"]  # fmt: skip


_SHAPE_WORD = re.compile(r"\b(circle|square|triangle|star|cross)(es|s)?\b")


def shapeless_caption(caption: str) -> str:
    """The caption with every shape noun replaced by 'shape(s)': a caption that never names the shape, so only
    an image-side term can teach the image tower shape (issue: do BYOL / SimSiam add what CLIP cannot?)."""
    return _SHAPE_WORD.sub(lambda m: "shapes" if m.group(2) else "shape", caption)


def _shapeless_sample(index: int, seed: int, split: str, image_size: int):
    from mmcl.data.sources import _synthetic_sample

    s = _synthetic_sample(index, seed, split, image_size)
    s.caption = shapeless_caption(s.caption)
    return s


def shapeless_shards(out_dir: Path, n: int, image_size: int, maxcount: int) -> Path:
    """The training shards of `synthetic_shards` with shape-free captions (same images, same keys)."""
    import functools

    from mmcl.data.sources import RawSample, SyntheticSource
    from mmcl.data.writer import write_shards

    class Shapeless(SyntheticSource):
        def describe(self) -> dict[str, Any]:
            return {**super().describe(), "captions": "shapeless"}

        def __iter__(self):
            for i in range(self.start, self.start + self.n):
                yield RawSample(f"synthetic/{self.split}/{self.seed}/{i}",
                                loader=functools.partial(_shapeless_sample, i, self.seed, self.split, self.image_size))  # fmt: skip

    # in-process: the loader lives in this script, which spawned writer workers could not import by name
    write_shards(Shapeless(n, "train", 0, image_size), out_dir, maxcount=maxcount, num_workers=0, progress=False)
    return out_dir


def bench_args(args: argparse.Namespace):
    """The settings `bench_train.Bench` reads."""
    return argparse.Namespace(workers=args.workers, run_timeout=args.run_timeout)


def mmcl_overrides(objective: str, tower: str, steps: int, image_size: int = 64) -> list[str]:
    terms, extra, _ = OBJECTIVES[objective]
    warmup = [f"train.warmup_steps={min(30, max(1, steps // 10))}"]
    return [*RECIPE, *warmup, f"loss.terms={terms}", f"model.image.image_size={image_size}", *extra]


def open_clip_model(tower: str, image_size: int) -> str:
    """open_clip's name of the tower's twin at `image_size`: the 64 px config, or a copy of it at another size
    written to `DATA/open_clip_configs/` (which `common.patch_open_clip` registers in every process)."""
    name = TOWERS[tower][1]
    if image_size == 64:
        return name
    from bench.common import REPO, openclip_tiny_config

    source = openclip_tiny_config() if name == OPENCLIP_TINY_NAME else REPO / "bench" / "configs" / f"{name}.json"
    cfg = json.loads(source.read_text())
    cfg["vision_cfg"]["image_size"] = image_size
    sized = name.removesuffix("-64") + f"-{image_size}"
    path = DATA / "open_clip_configs" / f"{sized}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=2))
    return sized


def evaluate(
    pipe: Any, val: Path, classnames_file: Path, compositional: bool = True, image_size: int = 64
) -> dict[str, Any]:
    """Zero-shot, its colour / shape breakdown (built-in shapes' 8 x 5 label order), text->image R@5 and
    the compositional subsets of held-out built-in samples (`compositional`)."""
    from mmcl.eval.datasets import open_eval_dataset
    from mmcl.eval.runner import evaluate_retrieval, evaluate_zero_shot
    from mmcl.eval.templates import load_classnames, load_templates

    classnames = load_classnames(classnames_file)
    zs = evaluate_zero_shot(pipe, open_eval_dataset(str(val), classnames=classnames), classnames,
                            load_templates("short"), batch_size=256)  # fmt: skip
    rows = zs["predictions"]
    ret = evaluate_retrieval(pipe, open_eval_dataset(str(val)), batch_size=256)
    out = {
        "top1": zs["metrics"]["top1"],
        "top5": zs["metrics"]["top5"],
        "colour_acc": sum(r["label"] // 5 == r["pred"] // 5 for r in rows) / len(rows),
        "shape_acc": sum(r["label"] % 5 == r["pred"] % 5 for r in rows) / len(rows),
        "t2i_recall@5": ret["metrics"]["t2i_recall@5"],
    }
    out.update({k: ret["metrics"][k] for k in ("align", "uniform_image") if k in ret["metrics"]})
    out.update(probes(pipe, val, classnames))
    if not compositional:
        return out
    from mmcl.eval.compositional import evaluate_compositional, generated_pairs, synthetic_samples

    pairs = generated_pairs(synthetic_samples(2000, split="val", image_size=image_size), max_per_subset=200)
    res = evaluate_compositional(pipe, pairs, batch_size=256, num_examples=0)
    out.update({f"comp_{k}": float(v) for k, v in res["metrics"].items() if k != "n_pairs"})
    return out


def probes(pipe: Any, val: Path, classnames: list[str]) -> dict[str, float]:
    """Frozen image features of the held-out split, probed for the 40 classes and for shape alone (5 classes):
    DINO's weighted k-NN and a linear probe, fit on one seeded half and scored on the other
    (`mmcl.eval.runner.probe_metrics`)."""
    from mmcl.eval.datasets import open_eval_dataset
    from mmcl.eval.runner import probe_metrics, run_features

    feats, labels, _ = run_features(pipe.encode_images, open_eval_dataset(str(val), classnames=classnames), 256)
    out = {k.replace("_top1", ""): v for k, v in probe_metrics(feats, labels).items()}  # knn, linear_probe
    shape = {k.replace("_top1", "_shape"): v for k, v in probe_metrics(feats, labels % 5).items()}
    return {**out, **shape}


def open_clip_pipe(work: Path, name: str, model: str) -> Any:
    import torch

    from bench.bench_train import _open_clip_checkpoint
    from bench.common import patch_open_clip
    from mmcl.inference import OpenClipPipeline

    patch_open_clip()
    pipe = OpenClipPipeline(model)
    state = torch.load(_open_clip_checkpoint(work, name), map_location="cpu", weights_only=True)["state_dict"]
    pipe.model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    pipe.model.eval()
    return pipe


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.bench_train import Bench
    from mmcl.inference import load_pipeline

    n_train, n_val = (1200, 200) if args.tiny else (20000, 1000)
    S = args.image_size
    if args.captions == "shapeless":
        train = shapeless_shards(DATA / f"shapeless_train_{S}px_{n_train}", n_train, S, max(n_train // 20, 1))
    else:
        train = synthetic_shards(DATA / f"synthetic_train_{S}px_{n_train}", n_train, "train", S, max(n_train // 20, 1))
    val = synthetic_shards(DATA / f"synthetic_val_{S}px_{n_val}", n_val, "val", S, 250)
    work = Path(tempfile.mkdtemp(prefix="bench_objectives_"))
    bench = Bench(bench_args(args), work)
    B = args.batch_size
    configs = [(t, o) for t in args.towers for o in args.objectives if not (OBJECTIVES[o][2] and t == "cnn")]
    kinds = [
        *(("mmcl", t, o) for t, o in configs),
        *(("open_clip", t, "open_clip") for t in args.towers if TOWERS[t][1] and args.open_clip),
    ]
    calib_steps = 4 if args.tiny else args.calib_steps
    partial = args.results_dir / f"{args.name}.partial.json"
    results: dict[str, Any] = {"calibration": {}, "runs": []}
    if args.resume and partial.is_file():
        results = json.loads(partial.read_text())
        results["runs"] = [r for r in results["runs"] if "error" not in r]  # a failed run is tried again
        print(f"resuming from {partial}: {len(results['calibration'])} calibrations, {len(results['runs'])} runs")
    done = {(r["tower"], r["objective"], r["seed"]) for r in results["runs"]}

    def save() -> None:
        from mmcl.utils import atomic_write_text

        args.results_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(partial, json.dumps(results, indent=2) + "\n")

    try:
        for kind, tower, objective in kinds:  # 1. samples/s of every configuration (equal wall time only)
            key = f"{tower}/{objective}"
            if args.budget_s is None or key in results["calibration"]:
                continue
            name = f"calib_{tower}_{objective}".replace("+", "p")
            if kind == "mmcl":
                argv = bench.mmcl_args(
                    name, TOWERS[tower][0], train, calib_steps, B, mmcl_overrides(objective, tower, calib_steps, S)
                )
            else:
                argv = bench.open_clip_args(name, open_clip_model(tower, S), train, calib_steps, B)
            res = bench.launch(name, kind, argv, B, skip=min(6, calib_steps // 2))
            results["calibration"][key] = {k: res.get(k) for k in ("samples_per_s", "loadavg_1min_after", "error")}
            shutil.rmtree(work / name, ignore_errors=True)
            save()
        # the baselines first in every seed: a run cut short still compares each term with both of them
        ordered = sorted(kinds, key=lambda k: k[2] not in ("clip", "open_clip"))
        for seed in args.seeds:  # 2. + 3. equal wall time, then the same evaluation for both libraries
            for kind, tower, objective in ordered:
                key = f"{tower}/{objective}"
                sps = results["calibration"].get(key, {}).get("samples_per_s") if args.budget_s else None
                if (args.budget_s and not sps) or (tower, objective, seed) in done:
                    continue
                if args.tiny:
                    steps = 3
                elif args.budget_s:
                    steps = max(8, int(args.budget_s * sps / B))
                else:
                    steps = args.steps
                name = f"{tower}_{objective}_s{seed}".replace("+", "p")
                if kind == "mmcl":
                    argv = bench.mmcl_args(name, TOWERS[tower][0], train, steps, B,
                                           [*mmcl_overrides(objective, tower, steps, S), f"train.seed={seed}"])  # fmt: skip
                else:
                    argv = bench.open_clip_args(name, open_clip_model(tower, S), train, steps, B, ["--seed", str(seed)])
                res = bench.launch(name, kind, argv, B, skip=min(6, steps // 2))
                row = {"tower": tower, "objective": objective, "seed": seed, "steps": steps, "kind": kind,
                       "samples_per_s": sps or res.get("samples_per_s"), "train_wall_s": res.get("wall_s"),
                       "loadavg_after": res.get("loadavg_1min_after")}  # fmt: skip
                if "error" in res:
                    row["error"] = res["error"][-500:]
                else:
                    pipe = (
                        load_pipeline(work / name)
                        if kind == "mmcl"
                        else open_clip_pipe(work, name, open_clip_model(tower, S))
                    )
                    row.update(evaluate(pipe, val, train / "classnames.txt", image_size=S))
                print(json.dumps(row), flush=True)
                results["runs"].append(row)
                shutil.rmtree(work / name, ignore_errors=True)
                save()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


METRICS = ("top1", "top5", "colour_acc", "shape_acc", "t2i_recall@5", "linear_probe", "knn", "linear_probe_shape",
           "knn_shape")  # fmt: skip
DISTANCES = ("align", "uniform_image")  # Wang & Isola's measures: lower is better, not percentages


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread over seeds per (tower, objective)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        if "error" not in r:
            groups.setdefault((r["tower"], r["objective"]), []).append(r)
    out = []
    for (tower, objective), rs in groups.items():
        names = [m for m in rs[0] if m in METRICS or m in DISTANCES or m.startswith("comp_")]
        speeds = [r["samples_per_s"] for r in rs if r.get("samples_per_s")]
        row = {"tower": tower, "objective": objective, "seeds": len(rs), "steps": rs[0]["steps"],
               "samples_per_s": statistics.fmean(speeds) if speeds else None}  # fmt: skip
        for m in names:
            values = [r[m] for r in rs]
            row[m] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
        out.append(row)
    return out


def to_markdown(res: dict[str, Any]) -> str:
    def cell(v: dict[str, float] | None) -> str:
        if not v:
            return "-"
        return f"{100 * v['mean']:.1f} ({100 * v['min']:.0f}-{100 * v['max']:.0f})"

    def raw(v: dict[str, float] | None) -> str:
        return f"{v['mean']:.2f}" if v else "-"

    summary = res["summary"]
    comp = sorted({m for r in summary for m in r if m.startswith("comp_")})
    headers = ["tower", "objective", "seeds", "steps", "samples/s", "top-1 %", "top-5 %", "colour %", "shape %",
               "t2i R@5 %", "linear probe %", "k-NN %", "shape probe %", "shape k-NN %", "align", "uniform",
               *(c.removeprefix("comp_") + " %" for c in comp)]  # fmt: skip
    rows = [
        [r["tower"], r["objective"], r["seeds"], r["steps"], f"{r['samples_per_s'] or 0:.0f}",
         *(cell(r.get(m)) for m in METRICS), *(raw(r.get(m)) for m in DISTANCES), *(cell(r.get(c)) for c in comp)]
        for r in summary
    ]  # fmt: skip
    s = res["settings"]
    if s.get("budget_s"):
        title = f"# Contrastive objectives at equal wall time (built-in shapes, {s['image_size']} px)"
        budget = (f"Each configuration trains for the steps it runs in {s['budget_s']:.0f} s at its calibrated speed "
                  "on this machine")  # fmt: skip
    else:
        title = f"# Contrastive objectives at equal steps (built-in shapes, {s['image_size']} px, {s['steps']} steps)"
        budget = (f"Each configuration trains for {s['steps']} optimizer steps (samples/s: measured in the run itself, "
                  "the mean over seeds, under the load recorded below, so compare speeds within the table only)")  # fmt: skip
    if s.get("captions", "full") != "full":
        title = title[:-1] + f", {s['captions']} training captions)"
    return "\n\n".join([
        title,
        f"{budget} (batch {s['batch_size']}, {s['workers']} loader workers); mean over seeds {s['seeds']} with the "
        "range in brackets. Held-out 1,000 images, 40 classes (chance 2.5% top-1); colour / shape: the zero-shot "
        "prediction's colour / shape is right (chance 12.5% / 20%); linear probe / k-NN: frozen image features of "
        "the held-out images, fit on one half and scored on the other, for the 40 classes (chance 2.5%) and for "
        "shape alone (chance 20%); align / uniform: Wang & Isola's alignment of image-caption pairs and uniformity "
        "of the image embeddings (lower is better for both); compositional subsets: the true caption scored "
        "above its hard negative (chance 50%). open_clip: its own trainer and defaults on the same architecture.",
        markdown_table(headers, rows),
        res.get("conclusion", ""),
        machine_markdown(res["machine"]),
        f"Reproduce: `{res['command']}`",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--towers", nargs="+", choices=list(TOWERS), default=["cnn"])
    p.add_argument("--objectives", nargs="+", choices=list(OBJECTIVES), default=DEFAULT_OBJECTIVES)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run (equal steps; the default)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="equal wall time instead: each run trains for the steps its calibrated speed fits in this")  # fmt: skip
    p.add_argument("--captions", choices=["full", "shapeless"], default="full",
                   help="shapeless: training captions never name the shape (evaluation unchanged); results go to "
                   "objectives_shapeless.{json,md}")  # fmt: skip
    p.add_argument("--image-size", type=int, default=64, help="pixels (data, both libraries' towers)")
    p.add_argument("--no-open-clip", dest="open_clip", action="store_false",
                   help="leave out open_clip's run (e.g. for --captions shapeless, a question about mmcl's terms)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--calib-steps", type=int, default=16)
    p.add_argument("--run-timeout", type=float, default=900.0)
    p.add_argument("--tiny", action="store_true", help="3 steps on 1,200 samples: a check of the script")
    p.add_argument("--results", type=Path, default=None, help="results folder (default bench/results/)")
    p.add_argument("--resume", action="store_true", help="continue from the results folder's objectives.partial.json")
    p.add_argument("--report-partial", action="store_true",
                   help="write the table from objectives.partial.json as it is (a run cut short), train nothing")  # fmt: skip
    args = p.parse_args(argv)
    if args.tiny and args.results is None:
        args.results = Path(tempfile.mkdtemp(prefix="bench_objectives_results_"))
    args.results_dir = args.results or RESULTS
    args.name = "objectives" if args.captions == "full" else f"objectives_{args.captions}"
    logging.basicConfig(level=logging.WARNING)
    given = sys.argv[1:] if argv is None else argv
    t0 = time.perf_counter()
    partial = args.results_dir / f"{args.name}.partial.json"
    res = json.loads(partial.read_text()) if args.report_partial else run(args)
    res.update(
        benchmark="objectives",
        command=reproduce_command(
            "bench_objectives.py", [a for a in given if a not in ("--resume", "--report-partial")]
        ),
        machine=machine_info(),
        settings={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        wall_s=round(time.perf_counter() - t0, 1),
        loadavg_end=[round(v, 2) for v in os.getloadavg()],
    )
    res["summary"] = summarise(res["runs"])
    res["settings"].pop("results_dir")
    res["settings"].pop("name")
    paths = write_results(args.name, res, to_markdown(res), args.results_dir)
    if not args.report_partial:
        partial.unlink(missing_ok=True)
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
