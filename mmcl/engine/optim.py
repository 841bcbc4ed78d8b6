"""AdamW with decoupled weight decay on weight matrices only, and a warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from mmcl.config import TrainConfig

# Gains, biases, embeddings-free scalars (temperature, bias) are not decayed: decaying
# them shrinks norms and the learned temperature for no regularisation benefit (CLIP, open_clip).
NO_DECAY_NAMES = (
    "logit_scale",
    "logit_bias",
    "positional_embedding",
    "pos_embed",
    "cls_token",
    "class_embedding",
    "image_pos",
)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(key in name for key in NO_DECAY_NAMES) or "norm" in name.lower() or "bn" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = [g for g in param_groups(module, cfg.weight_decay) if g["params"]]
    if cfg.layer_decay != 1.0:
        from mmcl.engine.layer_decay import split_by_lr_scale

        groups = split_by_lr_scale(module, groups, cfg.layer_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters (are both towers locked?)")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # layer-wise decay (mmcl.engine.layer_decay)
