"""The trainer's eval hook: zero-shot + retrieval (contrastive models) and caption metrics (captioners)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mmcl.config import ExperimentConfig
from mmcl.data.transforms import transform_from_model


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def model_encoders(model: nn.Module) -> tuple[Callable, Callable]:
    """(encode_images(tensor), encode_texts(list[str])) over an in-memory contrastive model."""
    device = _device(model)

    @torch.no_grad()
    def encode_images(images: torch.Tensor) -> torch.Tensor:
        return model.encode_image(images.to(device), normalize=True).float()

    @torch.no_grad()
    def encode_texts(texts: list[str]) -> torch.Tensor:
        ids, mask = model.tokenizer(texts)
        return model.encode_text(ids.to(device), mask.to(device), normalize=True).float()

    return encode_images, encode_texts


def make_eval_hook(cfg: ExperimentConfig) -> Callable[[nn.Module, int], dict[str, float]]:
    """A hook `(model, step) -> metrics` evaluating on `cfg.eval.shards` with what the model can do."""
    from mmcl.eval.datasets import open_eval_dataset
    from mmcl.eval.runner import run_captioning, run_retrieval, zero_shot_from_config

    ev = cfg.eval

    def hook(model: nn.Module, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        transform = transform_from_model(model, train=False)
        if hasattr(model, "encode_image"):
            encode_images, encode_texts = model_encoders(model)
            zs = zero_shot_from_config(ev, encode_images, encode_texts, transform=transform)
            metrics.update({f"zeroshot_{k}": v for k, v in zs["metrics"].items() if k in ("top1", "top5")})
            ret = run_retrieval(
                encode_images,
                encode_texts,
                open_eval_dataset(ev.shards),
                batch_size=ev.batch_size,
                max_samples=ev.max_samples,
                transform=transform,
                num_examples=0,
            )
            metrics.update({k: v for k, v in ret["metrics"].items() if "recall@" in k})
        if hasattr(model, "caption"):
            device = _device(model)

            def caption(images):
                return model.caption(torch.stack([transform(im.convert("RGB")) for im in images]).to(device))

            cap = run_captioning(
                caption,
                open_eval_dataset(ev.shards),
                batch_size=ev.batch_size,
                max_samples=ev.max_samples or 256,
                num_examples=0,
            )
            metrics.update({f"caption_{k}": v for k, v in cap["metrics"].items() if k in ("bleu4", "cider_d")})
        return metrics

    return hook
