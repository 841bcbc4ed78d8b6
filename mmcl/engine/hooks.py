"""The eval hook the trainer calls every `train.eval_every` steps and at the end."""

from __future__ import annotations

from mmcl.config import ExperimentConfig
from mmcl.engine.trainer import EvalHook


def default_eval_hook(cfg: ExperimentConfig) -> EvalHook | None:
    """Zero-shot (contrastive models) and captioning metrics (captioning models) on `cfg.eval.shards`."""
    if not cfg.eval.shards:
        return None
    from mmcl.eval.hook import make_eval_hook

    return make_eval_hook(cfg)
