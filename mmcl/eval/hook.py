"""The trainer's eval hook: zero-shot + retrieval (contrastive models) and caption metrics (captioners)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from mmcl.config import ExperimentConfig


def make_eval_hook(cfg: ExperimentConfig) -> Callable[[nn.Module, int], dict[str, float]]:
    """A hook `(model, step) -> metrics` evaluating on `cfg.eval.shards` with what the model can do."""
    from mmcl.eval.datasets import open_eval_dataset
    from mmcl.eval.runner import evaluate_captions, evaluate_retrieval, zero_shot_from_config
    from mmcl.inference import Pipeline

    ev = cfg.eval

    def hook(model: nn.Module, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        encoder = Pipeline.from_model(model)
        if encoder.can_encode:
            zs = zero_shot_from_config(ev, encoder.encode_images, encoder.encode_texts)
            metrics.update({f"zeroshot_{k}": v for k, v in zs["metrics"].items() if k in ("top1", "top5")})
            ret = evaluate_retrieval(
                encoder,
                open_eval_dataset(ev.shards),
                batch_size=ev.batch_size,
                max_samples=ev.max_samples,
                num_examples=0,
            )
            metrics.update({k: v for k, v in ret["metrics"].items() if "recall@" in k})
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
