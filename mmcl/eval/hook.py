"""The trainer's eval hook: zero-shot, frozen-feature probes (k-NN, linear), retrieval with alignment and
uniformity, compositional pairs (contrastive models); caption metrics (captioners)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from mmcl.config import EvalConfig, ExperimentConfig

if TYPE_CHECKING:
    from mmcl.inference import Encoder


def default_eval_hook(cfg: ExperimentConfig) -> Callable[[nn.Module, int], dict[str, float]] | None:
    """The hook the trainer calls every `train.eval_every` steps and at the end, or None without eval shards."""
    return make_eval_hook(cfg) if cfg.eval.shards else None


def make_eval_hook(cfg: ExperimentConfig) -> Callable[[nn.Module, int], dict[str, float]]:
    """A hook `(model, step) -> metrics` evaluating on `cfg.eval.shards` with what the model can do."""
    from mmcl.eval.datasets import open_eval_dataset
    from mmcl.eval.runner import evaluate_captions, evaluate_retrieval, probe_metrics, zero_shot_from_config
    from mmcl.inference import Pipeline

    ev = cfg.eval
    compositional = compositional_metrics(ev)

    def hook(model: nn.Module, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        encoder = Pipeline.from_model(model)
        if encoder.can_encode:
            zs = zero_shot_from_config(ev, encoder.encode_images, encoder.encode_texts, keep_features=True)
            metrics.update({f"zeroshot_{k}": v for k, v in zs["metrics"].items() if k in ("top1", "top5")})
            metrics.update(probe_metrics(zs["features"], zs["labels"]))
            ret = evaluate_retrieval(
                encoder,
                open_eval_dataset(ev.shards),
                batch_size=ev.batch_size,
                max_samples=ev.max_samples,
                num_examples=0,
            )
            keep = ("align", "uniform_image", "uniform_text")
            metrics.update({k: v for k, v in ret["metrics"].items() if "recall@" in k or k in keep})
            metrics.update(compositional(encoder))
        if encoder.can_caption:
            cap = evaluate_captions(
                encoder,
                open_eval_dataset(ev.shards),
                batch_size=ev.batch_size,
                max_samples=ev.max_samples or 256,
                num_examples=0,
            )
            metrics.update({f"caption_{k}": v for k, v in cap["metrics"].items() if k in ("bleu4", "cider_d")})
        return metrics

    return hook


def compositional_metrics(ev: EvalConfig) -> Callable[[Encoder], dict[str, float]]:
    """`encoder -> {compo_<subset>, compo_mean}` accuracies on pairs made from the eval shards.

    `eval.compositional`: auto = only when the first eval sample carries a known attribute vocabulary (the
    built-in shapes), always = required, never = off. Kept cheap: the pairs (at most `eval.compositional_pairs`
    per subset from at most `eval.max_samples` samples, 1000 when 0) are made once, on the first call.
    """
    from mmcl.eval.compositional import CompositionalPairs, evaluate_compositional, generated_pairs
    from mmcl.eval.compositional_shapes import vocabulary_for
    from mmcl.eval.datasets import open_eval_dataset

    made: list[CompositionalPairs | None] = []

    def pairs() -> CompositionalPairs | None:
        if not made:
            if ev.compositional == "auto":
                first = next(iter(open_eval_dataset(ev.shards)), None)
                if first is None or vocabulary_for(first.meta) is None:
                    made.append(None)  # no known attributes in this data: nothing to do, now or later
                    return None
            made.append(generated_pairs(open_eval_dataset(ev.shards), ev.compositional_pairs, ev.max_samples or 1000))
        return made[0]

    def metrics(encoder: Encoder) -> dict[str, float]:
        if ev.compositional == "never" or (p := pairs()) is None:
            return {}
        res = evaluate_compositional(encoder, p, batch_size=ev.batch_size, num_examples=0)
        return {f"compo_{k}": float(v) for k, v in res["metrics"].items() if k != "n_pairs"}

    return metrics
