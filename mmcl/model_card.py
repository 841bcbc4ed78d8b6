"""Model cards for exported models, in the Hugging Face Hub's convention (`huggingface_hub.ModelCard`).

`README.md` = YAML front matter (library_name, tags, license (+ license_name when 'other'), base_model when
fine-tuned from a hub model, datasets, metrics, pipeline_tag, and `model-index` with the eval results, which
the Hub shows as the evaluation widget) + the run's training config, a data summary, its eval table (the last
eval of `metrics.jsonl`) and, where the run has one, its WiSE-FT table. The card is titled with the model's
name and holds no absolute local path (a hub cache path becomes its repo id; other paths their last name).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from mmcl.run_folder import read_metrics, run_dir_of
from mmcl.utils import atomic_write_text

_METRIC_NAMES = {"zeroshot_top1": "accuracy", "zeroshot_top5": "accuracy", "recall@": "recall",
                 "bleu4": "bleu", "cider_d": "cider"}  # fmt: skip


def last_eval(run_dir: Path) -> tuple[int | None, dict[str, float]]:
    """(step, {metric: value}) of the last row of the run's metric history (`read_metrics`) holding eval_* metrics."""
    step, found = None, {}
    for row in read_metrics(run_dir):
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


_HUB_CACHE = re.compile(r"(?:[^\s:]*/)?(?:models|datasets)--([\w.-]+)--([\w.-]+)(?:/snapshots/[0-9a-f]+)?(?:/[^\s:]*)?")
_ABS_PATH = re.compile(r"(?<![\w./])(?:~/|/(?!/))[^\s:,'\"]*")
_TASKS = [("recall", "image-text-retrieval", "recall"), ("zeroshot", "zero-shot-image-classification", "accuracy"),
          ("bleu", "image-to-text", "bleu"), ("cider", "image-to-text", "cider")]  # fmt: skip
_BUILTIN = {
    "shapes/train": "synthetic images of coloured shapes (32 px) with generated captions, 40 classes "
    "(`mmcl.data.synthetic`)",
    "shapes/val": "held-out synthetic shapes (32 px) with generated captions, 40 classes (`mmcl.data.synthetic`)",
    "digits": "scikit-learn's handwritten digits (8 x 8, upscaled to 64 px), 10 classes",
    "photos": "scikit-image's sample photographs (128 px)",
}


def hub_id(path: str) -> str | None:
    """ORG/NAME of a Hugging Face hub cache path (`.../models--ORG--NAME/snapshots/HASH`), else None."""
    m = _HUB_CACHE.fullmatch(str(path))
    return f"{m.group(1)}/{m.group(2)}" if m else None


def public_path(text: str) -> str:
    """`text` with every absolute local path replaced: a hub cache path by its repo id, others by their last name
    (URLs stay)."""

    def swap(m: re.Match) -> str:
        path = Path(m.group(0).rstrip("/"))
        if hub_id(m.group(0)):
            return hub_id(m.group(0))
        if path.name == "final" or path.name.startswith("step_"):  # a run's weights: name the run too
            run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
            return f"{run.name}/{path.relative_to(run)}"
        return path.name or m.group(0)

    return _ABS_PATH.sub(swap, text)


def _public(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_public(v) for v in value]
    return public_path(value) if isinstance(value, str) else value


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
        if spec.startswith("builtin:"):
            lines.append(_builtin_summary(spec))
            continue
        try:
            shards = expand_shards(spec)
            n = count_samples(shards) if shards else None
        except Exception:  # noqa: BLE001  (the data may live elsewhere now: the card still gets written)
            shards, n = [], None
        size = f"{len(shards)} shard(s), {n:,} samples" if shards and n is not None else "not readable where exported"
        origin = _source_shards([spec])
        made_from = f" (made from `{', '.join(map(public_path, origin))}`)" if origin != [spec] else ""
        lines.append(f"- `{public_path(spec)}`{made_from}: {size}")
    caption = data.get("caption_key", "txt")
    if caption.startswith("class_prompts:"):
        lines.append("- captions: each sample's class name in prompt templates (FLYP fine-tuning)")
    elif caption != "txt":
        lines.append(f"- captions from the `{caption}` field")
    steps, batch = cfg.get("train", {}).get("steps"), data.get("batch_size")
    if steps and batch:
        lines.append(f"- {steps} steps x {batch} samples per process and micro-batch")
    return "\n".join(lines) or "- (no training data recorded)"


def _builtin_summary(spec: str) -> str:
    """`builtin:NAME`: what the data is and, where it has been written here, its size."""
    from mmcl.data.builtin import SHAPES, builtin_dir

    name = spec[len("builtin:") :]
    what = _BUILTIN.get(name, "a built-in dataset of mmcl")
    try:
        sizes = json.loads((builtin_dir(spec) / "sizes.json").read_text())
        size = f"; {len(sizes)} shard(s), {sum(sizes.values()):,} samples"
    except Exception:  # noqa: BLE001  (not written on this machine: the generator's own size where it has one)
        split = name.split("/")[-1]
        size = f"; {SHAPES[split]:,} samples" if name.startswith("shapes/") and split in SHAPES else ""
    return f"- `{spec}`: {what}{size}"


def _eval_results(metrics: dict[str, float], dataset: str) -> list[Any]:
    """`model-index` entries (the Hub's evaluation widget) for the metrics with a known task."""
    from huggingface_hub import EvalResult

    out = []
    for key, value in metrics.items():
        task = next(((t, m) for part, t, m in _TASKS if part in key), None)
        if task is None or not isinstance(value, (int, float)):
            continue
        out.append(EvalResult(task_type=task[0], dataset_type=dataset, dataset_name=dataset, metric_type=task[1],
                              metric_name=key, metric_value=round(float(value), 4)))  # fmt: skip
    return out


def _base_model(init_from: str) -> tuple[str | None, str]:
    """(the hub id for `base_model`, or None for a local start; how to name the start in the card's text)."""
    if not init_from:
        return None, ""
    repo = hub_id(init_from) or (init_from[3:] if init_from.startswith("hf:") else None)
    if init_from.startswith("hf-hub:"):
        repo = init_from[len("hf-hub:") :]
    return repo, repo or public_path(init_from)


def write_model_card(
    out_dir: str | Path,
    config_path: str | Path,
    library_name: str,
    usage: str,
    license: str = "other",
    extra_tags: tuple[str, ...] = (),
    model_name: str = "",
) -> Path:
    """Write `out_dir/README.md` for the model trained with the config at `config_path`; returns its path.

    `model_name` titles the card (default: the run folder's name)."""
    from huggingface_hub import ModelCard, ModelCardData

    config_path = Path(config_path)
    cfg = yaml.safe_load(config_path.read_text()) or {}
    model, loss = cfg.get("model", {}), cfg.get("loss", {})
    run_dir = run_dir_of(config_path)
    step, metrics = last_eval(run_dir)
    objective = loss.get("contrastive", "clip")
    tags = ["mmcl", "clip" if objective != "siglip" else "siglip", "zero-shot-image-classification", *extra_tags]
    base_repo, base_text = _base_model(model.get("init_from", ""))
    if base_text:
        tags.append("fine-tuned")
    name = model_name or run_dir.resolve().name
    eval_data = ", ".join(_dataset_names(cfg.get("eval", {}).get("shards", []))) or "evaluation set"
    data = ModelCardData(
        model_name=name,
        base_model=base_repo,
        library_name=library_name,
        license=license,
        license_name="unspecified" if license == "other" else None,  # the Hub asks for a name with 'other'
        tags=sorted(set(tags)),
        datasets=[public_path(d) for d in _dataset_names(cfg.get("data", {}).get("train_shards", []))],
        metrics=sorted({v for k, v in _METRIC_NAMES.items() for m in metrics if k in m}),
        pipeline_tag="zero-shot-image-classification",
        eval_results=_eval_results(metrics, eval_data) or None,
    )
    parts = [f"# {name}", "", f"An image-text dual encoder ({model.get('arch', 'clip')}, {objective} loss) trained "
             f"with mmcl, exported for `{library_name}`."]  # fmt: skip
    if base_text:
        parts.append(f"Fine-tuned from `{base_text}`.")
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
        shards = ", ".join(public_path(x) for x in cfg.get("eval", {}).get("shards", []))
        parts += [f"Last evaluation of the run (step {step}) on `{shards}`:", "", "| metric | value |", "|---|---|"]
        parts += [f"| {k} | {v:.4f} |" for k, v in metrics.items()]
    else:
        parts.append("The run recorded no evaluation (train with `eval.shards` set to get one here).")
    wise = run_dir_of(config_path) / "wise_ft.md"
    if wise.is_file():
        body = wise.read_text().split("\n", 2)[-1]  # without its title
        parts += ["", "### WiSE-FT (weight interpolation between the start and the fine-tuned model)", "", body.strip()]
    if license == "other":
        parts += ["", "## License", "", "Not set at export (`--license`): it follows from the training data and, when "
                  "fine-tuned, the base model's license."]  # fmt: skip
    config_text = yaml.safe_dump(_public(cfg), sort_keys=False).strip()
    parts += ["", "## Training config", "", "```yaml", config_text, "```", ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(parts))
    path = Path(out_dir) / "README.md"
    atomic_write_text(path, str(card))
    return path
