"""Training side by side: open_clip's trainer against mmcl's, same shards, same architecture, one run.

    python -m bench.bench_train             # full run (~13 min); writes bench/results/train.json + train.md
    python -m bench.bench_train --tiny      # a quick check of the script (results go to a temp folder)
    python -m bench.bench_train --phases throughput vit

Each training run is a child process (`python -m bench.bench_train --child KIND OUT -- ARGS`) that runs
the real trainer — open_clip: `open_clip_train.main.main(argv)` after the webdataset workaround of
`common.patch_open_clip` (webdataset's end-of-file marker turned off: open_clip #935) and registering `open_clip-tiny-64` (mmcl's clip-tiny-64 preset through the open_clip exporter, `common.openclip_tiny_config`); mmcl: `mmcl.engine.trainer.train`
on `load_experiment(None, overrides)` — with a global optimizer-step hook that records when every
optimizer step finishes. Steady-state samples/s = batch x steps / time, over the steps after the
first `skip`; the parent samples the memory of the child's whole process tree (loader workers included).

Phases:
  throughput  fp32, batch 128, 2 loader workers, open_clip-tiny-64 vs clip-tiny-64 (9.0M parameters each).
  bf16        the same with bf16 autocast, a few steps: documents the slowdown on CPUs without bf16 units.
  vit         ViT-B-32 (open_clip `ViT-B-32`, mmcl preset `vit-b-32`, no pretrained weights), batch 16.
  zeroshot    equal wall time: each trainer gets the steps it runs in `--budget-s` at the throughput
              phase's speed, then zero-shot top-1 on the held-out synthetic split (40 classes) through
              `mmcl.eval.runner.run_zero_shot` for both models. open_clip: its default recipe (lr 5e-4,
              wd 0.2, betas/eps from its defaults, no clipping) with warmup = 10% of the steps (its
              default 10000 would never finish warming up); mmcl: `mmcl.demo.DEMO_RECIPE` on clip-tiny-64.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    DATA,
    REPO,
    RESULTS,
    TreeMemory,
    brace_pattern,
    machine_info,
    machine_markdown,
    markdown_table,
    patch_open_clip,
    reproduce_command,
    synthetic_shards,
    wait_for_quiet,
    write_files,
)

PHASES = ("throughput", "bf16", "vit", "zeroshot")
MODELS = {"tiny": ("open_clip-tiny-64", "clip-tiny-64"), "vit": ("ViT-B-32", "vit-b-32")}


# ----------------------------------------------------------------------------- the child (one training run)


def child_main(kind: str, out: Path, trainer_args: list[str]) -> int:
    """Run one trainer in this process and write the finish time of every optimizer step to `out`."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    start = time.perf_counter()
    steps: list[float] = []
    register_optimizer_step_post_hook(lambda *_: steps.append(time.perf_counter() - start))
    status = "ok"
    try:
        if kind == "open_clip":
            patch_open_clip()
            from open_clip_train.main import main as open_clip_main

            open_clip_main(trainer_args)
        else:
            from mmcl.config import load_experiment
            from mmcl.engine.trainer import train
            from mmcl.utils import setup_logging

            setup_logging()
            train(load_experiment(None, trainer_args))
    except BaseException as e:
        status = f"{type(e).__name__}: {e}"
        raise
    finally:
        out.write_text(json.dumps({"status": status, "step_times": steps, "end": time.perf_counter() - start}))
    return 0


# ----------------------------------------------------------------------------- the parent


def _children_cpu_s() -> float:
    """CPU seconds used so far by this process's finished children (and the workers they waited for)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.runs: dict[str, dict[str, Any]] = {}

    def launch(self, name: str, kind: str, trainer_args: list[str], batch: int, skip: int) -> dict[str, Any]:
        """Run one trainer in a child process; returns timing, memory and paths."""
        out = self.work / f"{name}.steps.json"
        log_path = self.work / f"{name}.log"
        cmd = [sys.executable, "-m", "bench.bench_train", "--child", kind, str(out), "--", *trainer_args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        print(f"[train] {name}: {kind} {' '.join(trainer_args)}", flush=True)
        t0 = time.perf_counter()
        cpu0 = _children_cpu_s()
        with log_path.open("w") as log_file:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, env=env)
            with TreeMemory(proc.pid, interval_s=0.5) as mem:
                try:
                    rc = proc.wait(timeout=self.args.run_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    rc = proc.wait()
        wall = time.perf_counter() - t0
        res: dict[str, Any] = {"kind": kind, "args": trainer_args, "batch_size": batch, "log": str(log_path)}
        if rc != 0 or not out.is_file():  # recorded, not raised: the other runs' numbers are still worth having
            res["error"] = f"exit {rc} after {wall:.0f} s: " + log_path.read_text()[-1500:]
            print(f"[train] {name} FAILED: {res['error']}", flush=True)
        times = json.loads(out.read_text())["step_times"] if out.is_file() else []
        n = len(times)
        skip = max(min(skip, n - 1), 0)
        timed = n - skip
        span = (times[-1] - (times[skip - 1] if skip > 0 else 0.0)) if times else 0.0
        res.update({
            "steps": n,
            "skipped_steps": skip,
            "samples_per_s": round(batch * timed / span, 2) if span > 0 else None,
            "step_s": round(span / timed, 3) if timed and span > 0 else None,
            "first_step_s": round(times[0], 2) if times else None,  # process start to the first optimizer step
            "train_span_s": round(times[-1] - times[0], 1) if times else None,
            "wall_s": round(wall, 1),
            "cpu_s": round(_children_cpu_s() - cpu0, 1),  # user + system of the child and its loader workers
            "loadavg_1min_after": round(os.getloadavg()[0], 2),  # the run itself adds about 2 on 2 cores
            **mem.result(),
        })  # fmt: skip
        print(
            f"[train] {name}: {res['samples_per_s']} samples/s over {timed} steps, peak RSS {res['peak_rss_mib']} MiB "
            f"(PSS {res['peak_pss_mib']}), wall {res['wall_s']} s, CPU {res['cpu_s']} s",
            flush=True,
        )
        self.runs[name] = res
        return res

    # ------------------------------------------------------------------ argument lists of the two trainers

    def open_clip_args(
        self, name: str, model: str, shards: Path, steps: int, batch: int, extra: list[str] = ()
    ) -> list[str]:
        workers = self.args.workers
        steps = -(-steps // max(workers, 1)) * max(workers, 1)  # open_clip rounds batches up to a multiple
        return [
            "--train-data", brace_pattern(shards), "--dataset-type", "webdataset",
            "--train-num-samples", str(steps * batch), "--epochs", "1",
            "--batch-size", str(batch), "--workers", str(workers), "--model", model,
            "--precision", "fp32", "--device", "cpu", "--seed", "0",
            "--logs", str(self.work / "open_clip_logs"), "--name", name,
            "--log-every-n-steps", "10", "--save-frequency", "1", "--report-to", "",
            "--lr", "5e-4", "--wd", "0.2", "--warmup", str(max(1, steps // 10)),
            *extra,
        ]  # fmt: skip

    def mmcl_args(
        self, name: str, preset: str, shards: Path, steps: int, batch: int, extra: list[str] = ()
    ) -> list[str]:
        return [
            f"model.preset={preset}", f"data.train_shards=[{shards}]", f"data.batch_size={batch}",
            f"data.num_workers={self.args.workers}", f"train.steps={steps}", f"train.output_dir={self.work / name}",
            "train.trackers=[none]", "train.progress=false", f"train.ckpt_every={steps}", "train.log_every=10",
            "train.seed=0", *extra,
        ]  # fmt: skip

    def pair(self, phase: str, models: tuple[str, str], shards: Path, steps: int, batch: int, skip: int, **kw):
        """open_clip then mmcl (order swapped on odd phases), same settings."""
        oc_extra, mm_extra = kw.get("oc_extra", []), kw.get("mm_extra", [])
        jobs = [
            ("open_clip", lambda: self.open_clip_args(f"{phase}_open_clip", models[0], shards, steps, batch, oc_extra)),
            ("mmcl", lambda: self.mmcl_args(f"{phase}_mmcl", models[1], shards, steps, batch, mm_extra)),
        ]
        if kw.get("swap"):
            jobs.reverse()
        out = {}
        for kind, make in jobs:
            out[kind] = self.launch(f"{phase}_{kind}", kind, make(), batch, skip)
            out[kind]["model"] = models[0] if kind == "open_clip" else models[1]
        return out


# ----------------------------------------------------------------------------- zero-shot evaluation


def _open_clip_checkpoint(work: Path, name: str) -> Path:
    found = sorted((work / "open_clip_logs" / name / "checkpoints").glob("epoch_*.pt"))
    if not found:
        raise FileNotFoundError(f"open_clip run {name} saved no checkpoint")
    return found[-1]


def zero_shot(kind: str, work: Path, name: str, val: Path, classnames_file: Path) -> dict[str, Any]:
    """Zero-shot top-1/top-5 of a trained model on the held-out split, with mmcl's eval for both."""
    import torch

    from mmcl.eval.datasets import open_eval_dataset
    from mmcl.eval.runner import run_zero_shot
    from mmcl.eval.templates import load_classnames, load_templates

    classnames = load_classnames(classnames_file)
    templates = load_templates("short")
    dataset = open_eval_dataset(str(val), classnames=classnames)
    if kind == "open_clip":
        import open_clip

        patch_open_clip()
        model, _, preprocess = open_clip.create_model_and_transforms(MODELS["tiny"][0])
        state = torch.load(_open_clip_checkpoint(work, name), map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
        model.eval()
        tokenizer = open_clip.get_tokenizer(MODELS["tiny"][0])
        res = run_zero_shot(
            lambda x: model.encode_image(x, normalize=True),
            lambda texts: model.encode_text(tokenizer(texts), normalize=True),
            dataset,
            classnames,
            templates,
            batch_size=256,
            transform=preprocess,
        )
    else:
        from mmcl.inference import load_pipeline

        pipe = load_pipeline(work / name)
        res = run_zero_shot(
            pipe.encode_images,
            pipe.encode_texts,
            dataset,
            classnames,
            templates,
            batch_size=256,
            transform=pipe.preprocess,
        )
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in res["metrics"].items()}


def last_loss(kind: str, run: dict[str, Any], work: Path, name: str) -> float | None:
    """The last logged training loss (open_clip: its log line; mmcl: metrics.jsonl)."""
    if kind == "open_clip":
        found = re.findall(r"Contrastive_loss: ([0-9.]+)", Path(run["log"]).read_text())
        return float(found[-1]) if found else None
    rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return round(losses[-1], 4) if losses else None


# ----------------------------------------------------------------------------- phases


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mmcl.demo import DEMO_RECIPE

    tiny = args.tiny
    n_train = 1200 if tiny else 20000
    train64 = synthetic_shards(DATA / f"synthetic_train_64px_{n_train}", n_train, "train", 64, max(n_train // 20, 1))
    val64 = synthetic_shards(
        DATA / f"synthetic_val_64px_{200 if tiny else 1000}", 200 if tiny else 1000, "val", 64, 250
    )
    train256 = None
    if "vit" in args.phases:
        train256 = synthetic_shards(DATA / "synthetic_train_256px_2000", 2000, "train", 256, 100)
    load = {"quiet": None, "threshold": None, "waited_s": 0, "load_history": [round(os.getloadavg()[0], 2)]}
    if not args.no_wait:
        load = wait_for_quiet()
    info = machine_info()
    work = Path(tempfile.mkdtemp(prefix="bench_train_", dir=args.work_dir))
    bench = Bench(args, work)
    started = time.time()
    B, S = args.batch_size, args.steps
    result: dict[str, Any] = {}
    phases = {
        "throughput": lambda: bench.pair("fp32", MODELS["tiny"], train64, S, B, args.skip),
        "bf16": lambda: bench.pair(
            "bf16", MODELS["tiny"], train64, args.bf16_steps, B, 1,
            oc_extra=["--precision", "amp_bf16"], mm_extra=["train.precision=bf16"], swap=True,
        ),
        "vit": lambda: bench.pair("vit", MODELS["vit"], train256, args.vit_steps, args.vit_batch, 1),
        "zeroshot": lambda: zeroshot_phase(bench, args, train64, val64, DEMO_RECIPE),
    }  # fmt: skip
    wanted = set(args.phases) | ({"throughput"} if "zeroshot" in args.phases else set())  # zeroshot calibrates on it
    errors: dict[str, str] = {}
    try:
        for phase, fn in phases.items():
            if phase in wanted:
                try:
                    result[phase] = fn()
                except Exception as e:  # keep what the other phases measured
                    import traceback

                    traceback.print_exc()
                    errors[phase] = f"{type(e).__name__}: {e}"
    finally:
        load["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return {
        "benchmark": "train",
        "command": reproduce_command("bench_train.py"),
        "settings": {
            "phases": args.phases,
            "batch_size": B,
            "steps": S,
            "skip": args.skip,
            "workers": args.workers,
            "bf16_steps": args.bf16_steps,
            "vit_batch": args.vit_batch,
            "vit_steps": args.vit_steps,
            "budget_s": args.budget_s,
            "train_shards": str(train64),
            "val_shards": str(val64),
            "tiny": tiny,
        },
        "machine": info,
        "load": load,
        "duration_s": round(time.time() - started),
        "results": result,
        "errors": errors,
    }


def zeroshot_phase(bench: Bench, args: argparse.Namespace, train: Path, val: Path, recipe: list[str]) -> dict:
    B = args.batch_size
    out: dict[str, Any] = {"budget_s": args.budget_s}
    # mmcl: the demo recipe on the benchmark architecture; loader workers, batch and checkpointing kept
    # equal to open_clip's run (the recipe's 1 worker suits its 32 px demo; both save once at the end).
    # The loss too: the demo's counterfactual term needs shards with counterfactual scenes; here CLIP vs CLIP.
    drop = ("model.preset=", "data.batch_size=", "data.num_workers=", "train.ckpt_every=", "train.eval_every=",
            "loss.terms=")  # fmt: skip
    mm_recipe = [o for o in recipe if not o.startswith(drop) and not o.startswith("eval.")]
    for kind in ("mmcl", "open_clip"):
        sps = bench.runs.get(f"fp32_{kind}", {}).get("samples_per_s")
        if not sps:
            out[kind] = {"kind": kind, "error": "no fp32 throughput to size the run from"}
            continue
        steps = max(4, int(args.budget_s * sps / B))
        name = f"zeroshot_{kind}"
        if kind == "open_clip":
            trainer_args = bench.open_clip_args(name, MODELS["tiny"][0], train, steps, B)
        else:
            trainer_args = bench.mmcl_args(name, MODELS["tiny"][1], train, steps, B, mm_recipe)
        run = bench.launch(name, kind, trainer_args, B, min(args.skip, steps // 4))
        run["model"] = MODELS["tiny"][0] if kind == "open_clip" else MODELS["tiny"][1]
        run["planned_steps"] = steps
        run["calibration_samples_per_s"] = sps
        run["recipe"] = (
            "mmcl.demo.DEMO_RECIPE: " + ", ".join(o.removeprefix("train.") for o in mm_recipe)
            if kind == "mmcl"
            else f"open_clip defaults: lr 5e-4, wd 0.2, warmup {max(1, steps // 10)} (10%), betas (0.9, 0.999), "
            "eps 1e-8 (its non-ViT-name defaults), no grad clip"
        )
        if "error" in run:
            out[kind] = run
            continue
        run["final_loss"] = last_loss(kind, run, bench.work, name)
        t0 = time.perf_counter()
        run["zeroshot"] = zero_shot(kind, bench.work, name, val, train / "classnames.txt")
        run["eval_s"] = round(time.perf_counter() - t0, 1)
        print(f"[train] {name}: {run['zeroshot']}", flush=True)
        out[kind] = run
    return out


# ----------------------------------------------------------------------------- report


def _loads(results: dict[str, Any]) -> list[float]:
    return [
        run.get("loadavg_1min_after")
        for phase in results.values()
        for run in phase.values()
        if isinstance(run, dict) and "kind" in run
    ]


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def to_markdown(res: dict[str, Any]) -> str:
    r, s = res["results"], res["settings"]
    parts = [
        "# Training: mmcl vs open_clip (same shards, same architecture, one run)",
        "",
        "Each run is the real trainer in a child process; samples/s is steady state (batch x steps / time, "
        f"the first {s['skip']} optimizer steps excluded; 1 for the short bf16 and ViT runs), timed by an "
        "optimizer-step hook. Memory is the peak over the whole process tree (trainer + loader workers): "
        "RSS sums each process every 0.5 s (shared pages counted per process), PSS splits shared pages "
        "(sampled every 20 s near the RSS peak, so a lower bound). 'first step' = process start to the end "
        "of the first optimizer step (imports, model, loader start); 'CPU s' = user + system time of the "
        "run's process tree (less sensitive to other jobs than wall time).",
        "",
    ]
    headers = ["trainer", "model", "precision", "batch", "steps", "samples/s", "s/step", "first step s",
               "peak RSS MiB", "peak PSS MiB", "wall s", "CPU s"]  # fmt: skip
    table, notes = [], []
    for phase, precision in (("throughput", "fp32"), ("bf16", "bf16 autocast"), ("vit", "fp32")):
        for kind, v in sorted(r.get(phase, {}).items()):
            g = v.get
            table.append([kind, g("model", "?"), precision, g("batch_size"), g("steps"), _fmt(g("samples_per_s")),
                          _fmt(g("step_s"), ".2f"), _fmt(g("first_step_s")), _fmt(g("peak_rss_mib"), ".0f"),
                          _fmt(g("peak_pss_mib"), ".0f"), _fmt(g("wall_s")), _fmt(g("cpu_s"))])  # fmt: skip
            if "error" in v:
                notes.append(f"{phase} {kind} failed: {v['error'].splitlines()[0]}")
        sps = {k: v.get("samples_per_s") for k, v in r.get(phase, {}).items()}
        ratio = _ratio(sps.get("mmcl"), sps.get("open_clip"))
        if ratio:
            notes.append(f"{phase}: mmcl / open_clip samples/s = {ratio:.2f}")
    for kind in ("open_clip", "mmcl"):
        slow = _ratio(r.get("throughput", {}).get(kind, {}).get("samples_per_s"),
                      r.get("bf16", {}).get(kind, {}).get("samples_per_s"))  # fmt: skip
        if slow:
            notes.append(f"{kind}: fp32 / bf16 autocast samples/s = {slow:.2f} (above 1: bf16 is slower)")
    if table:
        parts += [f"## Throughput and memory ({s['workers']} loader workers)", "", markdown_table(headers, table), ""]
        parts += ["; ".join(notes) + ".", ""]
    z = r.get("zeroshot")
    if z:
        zrows = []
        for kind in ("open_clip", "mmcl"):
            v = z.get(kind, {})
            zs = v.get("zeroshot", {})
            zrows.append([kind, v.get("recipe", v.get("error", "-")), v.get("steps", "-"),
                          v.get("steps", 0) * v.get("batch_size", 0), _fmt(v.get("train_span_s")),
                          _fmt(v.get("wall_s")), _fmt(v.get("cpu_s")), _fmt(v.get("samples_per_s")),
                          _fmt(v.get("final_loss"), ".3f"), _fmt(zs.get("top1"), ".1%"), _fmt(zs.get("top5"), ".1%"),
                          _fmt(zs.get("mean_per_class_recall"), ".1%")])  # fmt: skip
        zs = next((z[k]["zeroshot"] for k in ("mmcl", "open_clip") if "zeroshot" in z.get(k, {})), {})
        n_classes = zs.get("n_classes", 40)
        parts += [
            f"## Zero-shot after equal wall time (budget {z['budget_s']:.0f} s of training each)",
            "",
            "Steps = budget x the trainer's fp32 samples/s above / batch, so on a quiet machine each finishes "
            "its whole schedule in about the budget ('train s' = first to last optimizer step; when other jobs "
            "load the machine the wall times stretch, and the step budgets stay what the calibration gave). "
            f"Held-out synthetic split ({zs.get('n_samples')} images, {n_classes} classes, chance "
            f"{1 / n_classes:.1%}), 'short' templates, mmcl's `run_zero_shot` for both models (open_clip's "
            "through its own eval transform and tokenizer).",
            "",
            markdown_table(
                [
                    "trainer",
                    "recipe",
                    "steps",
                    "samples",
                    "train s",
                    "wall s",
                    "CPU s",
                    "samples/s",
                    "final loss",
                    "top-1",
                    "top-5",
                    "mean class recall",
                ],
                zrows,
            ),  # fmt: skip
            "",
        ]
    if res.get("errors"):
        parts += ["Phases that failed: " + "; ".join(f"{k}: {v}" for k, v in res["errors"].items()), ""]
    parts += [
        machine_markdown(res["machine"], res["load"], _loads(r)),
        "",
        f"Shards: {s['train_shards']} (built-in synthetic, 64 px JPEG); held out: {s['val_shards']}; "
        "ViT-B-32 reads 256 px shards. Full per-run details (arguments, logs) in `train.json`. Reproduce:",
        "",
        "```",
        res["command"],
        "```",
    ]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=30, help="fp32 throughput steps per trainer")
    p.add_argument("--skip", type=int, default=8, help="first steps left out of samples/s")
    p.add_argument("--workers", type=int, default=2, help="loader workers, both trainers")
    p.add_argument("--bf16-steps", type=int, default=2)
    p.add_argument("--vit-batch", type=int, default=16)
    p.add_argument("--vit-steps", type=int, default=4)
    p.add_argument("--budget-s", type=float, default=180.0, help="training time per trainer for zero-shot")
    p.add_argument("--run-timeout", type=float, default=900.0, help="kill a training run after this long")
    p.add_argument("--work-dir", type=Path, default=None, help="where runs go (a temp folder, deleted)")
    p.add_argument("--keep", action="store_true", help="keep the run folders")
    p.add_argument("--results", type=Path, default=None, help=f"default {RESULTS} (a temp folder with --tiny)")
    p.add_argument("--no-wait", action="store_true", help="do not wait for a 1-min load average below 1.5")
    p.add_argument("--tiny", action="store_true", help="seconds-long check of the script, not a measurement")
    args = p.parse_args(argv)
    if args.tiny:
        args.batch_size, args.steps, args.skip, args.no_wait = 16, 4, 1, True
        args.bf16_steps, args.vit_batch, args.vit_steps, args.budget_s = 2, 2, 2, 5.0
    if args.results is None:
        args.results = Path(tempfile.mkdtemp(prefix="bench_train_results_")) if args.tiny else RESULTS
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        sep = argv.index("--")
        return child_main(argv[1], Path(argv[2]), argv[sep + 1 :])
    args = parse_args(argv)
    res = run(args)
    md = to_markdown(res)
    js, mdp = write_files("train", res, md, args.results, echo=False)
    print(md)
    print(f"wrote {js} and {mdp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
