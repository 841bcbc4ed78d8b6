"""Fine-tune a pretrained CLIP/SigLIP on your pairs, then interpolate back towards the start (WiSE-FT).

    result = finetune(FinetuneSpec(start="runs/clip-tiny", train_shards=["data/digits-train"],
                                   out_dir="runs/ft", target=EvalConfig(shards=["data/digits-test"]),
                                   reference=EvalConfig(shards=["builtin:shapes/val"]),
                                   wise_alphas=[0, 0.25, 0.5, 0.75, 1]))

- **FLYP** (Goyal et al. 2023, "Finetune like you pretrain"): fine-tune with the pretraining objective
  (the start model's contrastive loss). For a labelled set (a `classnames.txt` beside the shards) the
  captions are the class names in the templates, one drawn per sample and step, made by the loader from
  each sample's label (`write_class_prompts`): the shards are read in place, never copied.
- **LiT** (Zhai et al. 2022): `lock_image` / `lock_text` freeze a tower but its last `unlocked_layers`.
- **Layer-wise lr decay** (`layer_decay`, `mmcl.engine.layer_decay`).
- **WiSE-FT** (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): the weights
  (1 - alpha) * start + alpha * fine-tuned, each alpha evaluated zero-shot on the target and on a
  reference set (what the start model was good at); the curve is written as JSON, markdown and PNG.

Training is one `mmcl.engine.trainer.train` run from `model.init_from` = the start weights.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mmcl.config import (
    EvalConfig,
    ExperimentConfig,
    LossConfig,
    TermConfig,
    deep_merge,
    from_dict,
    load_yaml,
    parse_overrides,
    to_dict,
)
from mmcl.utils import UserError, atomic_write_text

log = logging.getLogger("mmcl")
FLYP_FILE = "flyp_captions.json"  # RUN/FLYP_FILE: the prompts of each class (data.caption_key picks one at random)


@dataclass
class FinetuneSpec:
    """What to fine-tune, on what, and how (see the module docstring)."""

    start: str  # an mmcl run, an open_clip folder or a transformers CLIP/SigLIP folder (mmcl.models.pretrained)
    train_shards: list[str]
    out_dir: str
    captions: Literal["auto", "pairs", "classes"] = "auto"  # auto: class prompts when classnames.txt is there
    classnames: str = ""  # class names of a labelled training set (default: classnames.txt beside it)
    templates: str = "openai"  # prompt templates for class-name captions
    steps: int = 300
    lr: float = 1e-5
    warmup_steps: int = 30
    weight_decay: float = 0.1
    layer_decay: float = 1.0
    batch_size: int = 64
    num_workers: int = 2
    lock_image: bool = False
    lock_text: bool = False
    unlocked_layers: int = 0  # with a lock: the last N blocks of the locked tower(s) still train
    target: EvalConfig | None = None  # evaluated during training and for each WiSE-FT alpha
    reference: EvalConfig | None = None  # the start model's own task, to see what fine-tuning costs
    wise_alphas: list[float] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)  # dotted experiment overrides, last word


@dataclass
class FinetuneResult:
    run_dir: Path
    final_dir: Path
    eval_metrics: dict[str, float]
    wise: list[dict[str, float]]  # one row per alpha: alpha, target_top1, reference_top1


# ----------------------------------------------------------------------------- FLYP data


def _classnames_beside(shards: list[str]) -> Path | None:
    from mmcl.data.reader import list_shards as expand_shards

    for url in expand_shards(shards):
        for folder in (Path(url).parent, Path(url).parent.parent):
            if (folder / "classnames.txt").is_file():
                return folder / "classnames.txt"
    return None


def write_class_prompts(classnames: list[str], templates: list[str], out_file: Path, label_key: str = "label") -> str:
    """Write the prompts of each class (`out_file`, JSON) and return the `data.caption_key` that makes each
    sample's captions from its label when the loader reads it (`mmcl.data.decode.caption_options`): the
    training shards are read where they are, images untouched, nothing copied."""
    from mmcl.data.decode import CLASS_PROMPTS
    from mmcl.eval.templates import format_prompts

    table = {"label_key": label_key, "prompts": [format_prompts(name, templates) for name in classnames]}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_file, json.dumps(table, indent=1))
    return CLASS_PROMPTS + str(out_file.resolve())


# ----------------------------------------------------------------------------- the run


def _start_loss(model_cfg: Any, start: str) -> LossConfig:
    """The start model's pretraining objective (FLYP): its run's loss, else SigLIP's when it has a bias."""
    from mmcl.models.pretrained import resolve_source

    src = resolve_source(start)
    if src.kind == "mmcl":
        from mmcl.run_folder import find_weights

        return from_dict(ExperimentConfig, load_yaml(find_weights(src.path)[1])).loss  # older layouts upgraded
    name = "siglip" if model_cfg.init_logit_bias is not None else "clip"
    return LossConfig(terms=[TermConfig.from_config(name, "loss.terms")])


def experiment_for(spec: FinetuneSpec) -> ExperimentConfig:
    """The training experiment of `spec` (FLYP data written on the way when the set is labelled)."""
    from mmcl.eval.templates import load_classnames, load_templates
    from mmcl.models.pretrained import pretrained_model_config

    model = pretrained_model_config(spec.start)
    model.image.lock = model.image.lock or spec.lock_image
    model.text.lock = model.text.lock or spec.lock_text
    for tower, locked in ((model.image, spec.lock_image), (model.text, spec.lock_text)):
        if locked:
            tower.unlocked_layers = spec.unlocked_layers
    out = Path(spec.out_dir)
    shards, caption_key = list(spec.train_shards), "txt"
    names_file = Path(spec.classnames) if spec.classnames else _classnames_beside(shards)
    if spec.captions == "classes" and names_file is None:
        raise UserError("captions=classes needs class names: pass --classnames or put classnames.txt beside the shards")
    if spec.captions != "pairs" and names_file is not None:
        names, templates = load_classnames(names_file), load_templates(spec.templates)
        caption_key = write_class_prompts(names, templates, out / FLYP_FILE)
        log.info("FLYP: training captions are the %s class names in the '%s' templates", names_file, spec.templates)
    raw = {
        "model": to_dict(model),
        "data": {"train_shards": shards, "batch_size": spec.batch_size, "num_workers": spec.num_workers,
                 "caption_key": caption_key},
        "loss": to_dict(_start_loss(model, spec.start)),
        "train": {"steps": spec.steps, "lr": spec.lr, "min_lr": 0.0, "warmup_steps": spec.warmup_steps,
                  "weight_decay": spec.weight_decay, "layer_decay": spec.layer_decay, "output_dir": str(out),
                  "ckpt_every": max(spec.steps, 1), "log_every": max(1, min(50, spec.steps // 10))},
        "eval": to_dict(spec.target) if spec.target is not None else {},
    }  # fmt: skip
    return from_dict(ExperimentConfig, deep_merge(raw, parse_overrides(spec.overrides)))


def interpolate(start: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float) -> dict:
    """WiSE-FT weights: (1 - alpha) * start + alpha * tuned for floating tensors (others: tuned's)."""
    if start.keys() != tuned.keys():
        raise UserError("the start and fine-tuned weights have different tensors: not the same architecture")
    return {k: torch.lerp(start[k], tuned[k], alpha) if tuned[k].is_floating_point() else tuned[k] for k in tuned}


def zero_shot_top1(model: torch.nn.Module, ev: EvalConfig) -> float:
    """Zero-shot top-1 of `model` on the labelled set `ev`."""
    from mmcl.data.transforms import transform_from_model
    from mmcl.eval.runner import zero_shot_from_config
    from mmcl.inference import Pipeline

    encoder = Pipeline.from_model(model)
    transform = transform_from_model(model, train=False)
    out = zero_shot_from_config(ev, encoder.encode_images, encoder.encode_texts, transform=transform)
    return float(out["metrics"]["top1"])


def wise_ft_curve(cfg: ExperimentConfig, final_dir: Path, alphas: list[float], target: EvalConfig,
                  reference: EvalConfig | None) -> list[dict[str, float]]:  # fmt: skip
    """Evaluate the WiSE-FT interpolation of `cfg.model.init_from` and `final_dir` at each alpha."""
    from safetensors.torch import load_file

    from mmcl.models import build_model

    model = build_model(cfg.model).eval()  # the start weights (init_from)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tuned = load_file(str(final_dir / "model.safetensors"))
    rows = []
    for alpha in alphas:
        model.load_state_dict(interpolate(start, tuned, float(alpha)))
        row = {"alpha": float(alpha), "target_top1": zero_shot_top1(model, target)}
        if reference is not None:
            row["reference_top1"] = zero_shot_top1(model, reference)
        log.info("WiSE-FT alpha %.2f: %s", alpha, ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "alpha"))
        rows.append(row)
    return rows


def write_wise_ft(rows: list[dict[str, float]], out: Path, title: str = "WiSE-FT") -> list[Path]:
    """`out`.json, `out`.md (table) and `out`.png (target vs reference accuracy, one point per alpha)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps({"title": title, "rows": rows}, indent=2))
    has_ref = all("reference_top1" in r for r in rows)
    head = "| alpha | target top-1 |" + (" reference top-1 |" if has_ref else "")
    lines = [f"# {title}", "", "alpha 0 = the start weights, 1 = the fine-tuned weights.", "", head,
             "|---|---|" + ("---|" if has_ref else "")]  # fmt: skip
    for r in rows:
        ref = f" {r['reference_top1']:.3f} |" if has_ref else ""
        lines.append(f"| {r['alpha']:.2f} | {r['target_top1']:.3f} |{ref}")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(5, 4))
    xs = [r.get("reference_top1", r["alpha"]) for r in rows]
    ys = [r["target_top1"] for r in rows]
    ax.plot(xs, ys, "o-")
    for x, y, r in zip(xs, ys, rows):
        ax.annotate(f"α={r['alpha']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("reference zero-shot top-1" if has_ref else "alpha")
    ax.set_ylabel("target zero-shot top-1")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.png.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out.with_suffix(".png"))
    return [out.with_suffix(s) for s in (".json", ".md", ".png")]


def finetune(spec: FinetuneSpec, progress: bool = True) -> FinetuneResult:
    """Fine-tune `spec.start` on `spec.train_shards` in `spec.out_dir` (resumes there), then the WiSE-FT curve."""
    from mmcl.engine.trainer import train
    from mmcl.eval.hook import default_eval_hook

    if spec.wise_alphas and spec.target is None:
        raise UserError("--wise-alphas needs a target set (--target) to evaluate each alpha on")
    if any(not 0.0 <= a <= 1.0 for a in spec.wise_alphas):
        raise UserError(f"WiSE-FT alphas must lie in [0, 1], got {spec.wise_alphas}")
    cfg = experiment_for(spec)
    cfg.train.progress = cfg.train.progress and progress
    result = train(cfg, eval_hook=default_eval_hook(cfg))
    rows: list[dict[str, float]] = []
    if spec.wise_alphas:
        rows = wise_ft_curve(cfg, result.final_dir, spec.wise_alphas, spec.target, spec.reference)
        write_wise_ft(rows, Path(spec.out_dir) / "wise_ft", title=f"WiSE-FT: {Path(spec.start).name} -> {spec.out_dir}")
    return FinetuneResult(result.run_dir, result.final_dir, result.eval_metrics, rows)
