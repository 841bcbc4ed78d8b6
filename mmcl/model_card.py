"""Model cards for exported models, in the Hugging Face Hub's convention (`huggingface_hub.ModelCard`).

`README.md` = YAML front matter (library_name, tags, license, datasets, metrics, pipeline_tag) + the
run's training config, a data summary, its eval table (the last eval of `metrics.jsonl`) and, where the
run has one, its WiSE-FT table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from mmcl.utils import atomic_write_text

_METRIC_NAMES = {"zeroshot_top1": "accuracy", "zeroshot_top5": "accuracy", "recall@": "recall",
                 "bleu4": "bleu", "cider_d": "cider"}  # fmt: skip


def _run_dir(config_path: Path) -> Path:
    """The run folder of a run / final / checkpoint config (where metrics.jsonl lives)."""
    for folder in (config_path.parent, config_path.parent.parent, config_path.parent.parent.parent):
        if (folder / "metrics.jsonl").is_file():
            return folder
    return config_path.parent


def last_eval(run_dir: Path) -> tuple[int | None, dict[str, float]]:
    """(step, {metric: value}) of the last row of `run_dir/metrics.jsonl` holding eval_* metrics."""
    file = run_dir / "metrics.jsonl"
    step, found = None, {}
    if file.is_file():
        for line in file.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            evals = {k[len("eval_") :]: v for k, v in row.items() if k.startswith("eval_")}
            if evals:
                step, found = row.get("step"), evals
    return step, found


def _source_shards(shards: list[str]) -> list[str]:
    """The user's shards behind derived ones (FLYP caption shards record their source in done.json)."""
    out = []
    for spec in shards:
        done = Path(spec) / "done.json"
        source = json.loads(done.read_text()).get("source") if done.is_file() else None
        out.extend(source if isinstance(source, list) else [spec])
    return out


def _dataset_names(shards: list[str]) -> list[str]:
    names = []
    for spec in _source_shards(shards):
        name = spec.split(":", 1)[1] if spec.startswith("builtin:") else Path(spec.split("{")[0]).name or spec
        names.append(name.strip("/") or spec)
    return sorted(set(names))


def _data_summary(cfg: dict[str, Any]) -> str:
    from mmcl.data.shards import count_samples, expand_shards

    data = cfg.get("data", {})
    lines = []
    for spec in data.get("train_shards", []):
        try:
            shards = expand_shards(spec) if not spec.startswith("builtin:") else []
            n = count_samples(shards) if shards else None
        except Exception:  # noqa: BLE001  (the data may live elsewhere now: the card still gets written)
            shards, n = [], None
        count = f"{n:,} samples" if n is not None else "sample count unknown"
        origin = _source_shards([spec])
        made_from = f" (made from `{', '.join(origin)}`)" if origin != [spec] else ""
        lines.append(f"- `{spec}`{made_from}: {len(shards) or '?'} shard(s), {count}")
    caption = data.get("caption_key", "txt")
    if caption != "txt":
        lines.append(f"- captions from the `{caption}` field (class names in templates: FLYP fine-tuning)")
    steps, batch = cfg.get("train", {}).get("steps"), data.get("batch_size")
    if steps and batch:
        lines.append(f"- {steps} steps x {batch} samples per process and micro-batch")
    return "\n".join(lines) or "- (no training data recorded)"


def write_model_card(
    out_dir: str | Path,
    config_path: str | Path,
    library_name: str,
    usage: str,
    license: str = "other",
    extra_tags: tuple[str, ...] = (),
) -> Path:
    """Write `out_dir/README.md` for the model trained with the config at `config_path`; returns its path."""
    from huggingface_hub import ModelCard, ModelCardData

    config_path = Path(config_path)
    cfg = yaml.safe_load(config_path.read_text()) or {}
    model, loss = cfg.get("model", {}), cfg.get("loss", {})
    step, metrics = last_eval(_run_dir(config_path))
    objective = loss.get("contrastive", "clip")
    tags = ["mmcl", "clip" if objective != "siglip" else "siglip", "zero-shot-image-classification", *extra_tags]
    if model.get("init_from"):
        tags.append("fine-tuned")
    data = ModelCardData(
        library_name=library_name,
        license=license,
        tags=sorted(set(tags)),
        datasets=_dataset_names(cfg.get("data", {}).get("train_shards", [])),
        metrics=sorted({v for k, v in _METRIC_NAMES.items() for m in metrics if k in m}),
        pipeline_tag="zero-shot-image-classification",
    )
    title = Path(out_dir).resolve().name
    parts = [f"# {title}", "", f"An image-text dual encoder ({model.get('arch', 'clip')}, {objective} loss) trained "
             f"with mmcl, exported for `{library_name}`."]  # fmt: skip
    if model.get("init_from"):
        parts.append(f"Fine-tuned from `{model['init_from']}`.")
    parts += [
        "",
        "## Usage",
        "",
        usage.strip(),
        "",
        "## Training data",
        "",
        _data_summary(cfg),
        "",
        "## Evaluation",
        "",
    ]
    if metrics:
        parts += [f"Last evaluation of the run (step {step}) on `{', '.join(cfg.get('eval', {}).get('shards', []))}`:",
                  "", "| metric | value |", "|---|---|"]  # fmt: skip
        parts += [f"| {k} | {v:.4f} |" for k, v in metrics.items()]
    else:
        parts.append("The run recorded no evaluation (train with `eval.shards` set to get one here).")
    wise = _run_dir(config_path) / "wise_ft.md"
    if wise.is_file():
        body = wise.read_text().split("\n", 2)[-1]  # without its title
        parts += ["", "### WiSE-FT (weight interpolation between the start and the fine-tuned model)", "", body.strip()]
    parts += ["", "## Training config", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).strip(), "```", ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(parts))
    path = Path(out_dir) / "README.md"
    atomic_write_text(path, str(card))
    return path
