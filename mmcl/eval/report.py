"""Write an eval result (from `mmcl.eval.runner.run_*`) to a folder.

    eval.json          metrics, settings, per-class recall (JSON; NaN -> null)
    eval.md            the same as markdown tables (compositional: accuracy per subset, chance stated)
    predictions.jsonl  one line per sample (zero-shot class, generated caption, or scored caption pair)
    confusion.csv/png  zero-shot only: counts (rows = true class) and the row-normalised matrix
    examples.png       a grid of a few images with true/predicted labels, retrieved or generated captions

Every file is written atomically. Plots use matplotlib's object API (`Figure`, rendered by Agg) and
never pyplot, so they neither switch a caller's backend nor share global state between threads.
"""

from __future__ import annotations

import csv
import io
import json
import math
import textwrap
from pathlib import Path
from typing import Any

import torch

from mmcl.data.decode import describe_counts
from mmcl.utils import atomic_write_bytes, atomic_write_text


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.4f}"
    return str(v)


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _markdown(results: dict, title: str) -> str:
    task, metrics = results["task"], results["metrics"]
    parts = [f"# {title}\n"]
    if results.get("settings"):
        parts.append(_md_table(["setting", "value"], [[k, v] for k, v in results["settings"].items()]))
    if results.get("skipped"):
        parts.append(f"Skipped while reading the data: {describe_counts(results['skipped'])}.\n")
    if task == "retrieval":
        ks = sorted(int(k.split("@")[1]) for k in metrics if k.startswith("i2t_recall@"))
        rows = [
            [name]
            + [100 * metrics[f"{p}_recall@{k}"] for k in ks]
            + [metrics[f"{p}_median_rank"], metrics[f"{p}_mean_rank"]]
            for name, p in (("image -> text", "i2t"), ("text -> image", "t2i"))
        ]
        parts.append(_md_table(["direction"] + [f"R@{k} (%)" for k in ks] + ["median rank", "mean rank"], rows))
        parts.append(f"rsum {metrics['rsum']:.2f}; {metrics['n_images']} images, {metrics['n_texts']} texts\n")
    elif task == "compositional":
        parts.append(compositional_table(results))
    else:
        parts.append(_md_table(["metric", "value"], [[k, v] for k, v in metrics.items()]))
    if task == "zeroshot":
        names, recall = results["classnames"], results["per_class_recall"]
        rows = sorted(
            ([n, r, int(s)] for n, r, s in zip(names, recall, results["confusion"].sum(1).tolist()) if s > 0),
            key=lambda row: row[1],
        )
        parts.append("## Per-class recall" + (" (10 worst)" if len(rows) > 30 else "") + "\n")
        parts.append(_md_table(["class", "recall", "samples"], rows[:10] if len(rows) > 30 else rows))
        conf = results["confusion"].clone()
        conf.fill_diagonal_(0)
        flat = conf.flatten()
        top = flat.topk(min(10, flat.numel())).indices.tolist()
        pairs = [[names[i // len(names)], names[i % len(names)], int(flat[i])] for i in top if flat[i] > 0]
        if pairs:
            parts.append("## Most frequent confusions\n")
            parts.append(_md_table(["true", "predicted", "count"], pairs))
    if task == "captions":
        rows = [[p["key"], p["prediction"], p["references"][0]] for p in results["predictions"][:10]]
        parts.append("## Examples\n")
        parts.append(_md_table(["key", "prediction", "first reference"], rows))
    return "\n".join(parts)


def compositional_table(results: dict) -> str:
    """Markdown: accuracy per subset of a `run_compositional` result, with its chance level."""
    chance = results.get("chance", 0.5)
    rows = [[name, e["pairs"], f"{e['accuracy']:.1%}"] for name, e in results["subsets"].items()]
    rows.append(["mean over subsets", results["metrics"]["n_pairs"], f"{results['metrics']['mean']:.1%}"])
    note = (
        f"A pair is right when the image's caption scores above its hard negative (cosine similarity); "
        f"chance is {chance:.0%}.\n"
    )
    return _md_table(["subset", "pairs", "accuracy"], rows) + "\n" + note


def _png(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_confusion(confusion: torch.Tensor, classnames: list[str], path: Path) -> None:
    """Row-normalised confusion matrix; class names on the axes when there are at most 40 classes."""
    from matplotlib.figure import Figure

    c = confusion.shape[0]
    norm = confusion.double() / confusion.sum(1, keepdim=True).clamp_min(1)
    size = min(4 + 0.25 * c, 16) if c <= 40 else 10
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if c <= 40:
        ax.set_xticks(range(c), [n[:20] for n in classnames], rotation=90, fontsize=8)
        ax.set_yticks(range(c), [n[:20] for n in classnames], fontsize=8)
    ax.set_title("zero-shot confusion (rows sum to 1)")
    _png(fig, path)


# What an examples figure shows when it is not a plain sample (the compositional one picks failures).
EXAMPLES_TITLE = {
    "compositional": "one pair per subset: its first failure (red, the negative scored higher) where the subset "
    "has one, else its first pair (green)\n+ the true caption, - the negative",
}


def plot_examples(results: dict, path: Path, max_examples: int = 8) -> None:
    """Grid of example images, each titled with its labels / predictions / captions."""
    from matplotlib.figure import Figure

    examples = results["examples"][:max_examples]
    cols = min(4, len(examples))
    rows = math.ceil(len(examples) / cols)
    text_lines = {"zeroshot": 3, "compositional": 8}.get(results["task"], 6)
    # constrained layout makes room for the multi-line titles that carry the labels and captions
    fig = Figure(figsize=(3.4 * cols, (2.4 + 0.15 * text_lines) * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, ex in zip(axes.flat, examples):
        ax.imshow(ex["image"])
        if results["task"] == "zeroshot":
            text, color = f"true: {ex['label']}\npred: {ex['pred']}", "green" if ex["correct"] else "red"
        elif results["task"] == "retrieval":
            text = "\n".join(
                textwrap.shorten(f"{'+' if r['correct'] else '-'} {r['text']}", 44) for r in ex["retrieved"]
            )
            color = "green" if ex["retrieved"] and ex["retrieved"][0]["correct"] else "red"
        elif results["task"] == "compositional":
            wrapped = [textwrap.wrap(f"{sign} {t}", 48) for sign, t in (("+", ex["caption"]), ("-", ex["negative"]))]
            text = "\n".join([ex["subset"], *wrapped[0][:3], *wrapped[1][:3]])
            color = "green" if ex["correct"] else "red"
        else:
            pred, ref = textwrap.shorten(ex["prediction"], 80), textwrap.shorten(ex["captions"][0], 80)
            text, color = "\n".join(textwrap.wrap(f"pred: {pred}", 44) + textwrap.wrap(f"ref: {ref}", 44)), "black"
        ax.set_title(f"{ex['key'][:40]}\n{text}", fontsize=7, color=color)
    if results["task"] in EXAMPLES_TITLE:
        fig.suptitle(EXAMPLES_TITLE[results["task"]], fontsize=9)
    _png(fig, path)


def write_report(
    results: dict, out_dir: str | Path, title: str | None = None, settings: dict | None = None
) -> dict[str, Path]:
    """Write `results` of `run_zero_shot` / `run_retrieval` / `run_captioning` into `out_dir`.

    Args:
        results: a `run_*` result dict (`task`, `metrics`, ...).
        out_dir: created if needed.
        title: heading of eval.md (default: the task name).
        settings: extra key/values recorded in eval.json and eval.md (model, data, templates, ...).

    Returns:
        name -> path of each file written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {**results, "settings": {**results.get("settings", {}), **(settings or {})}}
    task = results["task"]
    written: dict[str, Path] = {}

    summary = {k: v for k, v in results.items() if k not in ("examples", "predictions", "confusion")}
    if task == "zeroshot":
        summary["per_class_recall"] = dict(zip(results["classnames"], results["per_class_recall"]))
        summary.pop("classnames")
    written["eval.json"] = out / "eval.json"
    atomic_write_text(written["eval.json"], json.dumps(_jsonable(summary), indent=2) + "\n")
    written["eval.md"] = out / "eval.md"
    atomic_write_text(written["eval.md"], _markdown(results, title or f"{task} evaluation"))

    if results.get("predictions"):
        written["predictions.jsonl"] = out / "predictions.jsonl"
        lines = (json.dumps(_jsonable(p), ensure_ascii=False) for p in results["predictions"])
        atomic_write_text(written["predictions.jsonl"], "\n".join(lines) + "\n")
    if task == "zeroshot":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["true \\ predicted", *results["classnames"]])
        for name, row in zip(results["classnames"], results["confusion"].tolist()):
            writer.writerow([name, *row])
        written["confusion.csv"] = out / "confusion.csv"
        atomic_write_text(written["confusion.csv"], buf.getvalue())
        written["confusion.png"] = out / "confusion.png"
        plot_confusion(results["confusion"], results["classnames"], written["confusion.png"])
    if results.get("examples"):
        written["examples.png"] = out / "examples.png"
        plot_examples(results, written["examples.png"])
    return written
