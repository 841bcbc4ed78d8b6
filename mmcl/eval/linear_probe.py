"""Linear probe: logistic regression on frozen image features, with CLIP's weight-decay sweep.

Image-side self-supervised methods (SimCLR, BYOL, DINO, ...) are judged by a linear classifier trained on
frozen features rather than by zero-shot accuracy. This follows CLIP_benchmark's `linear_probe` (itself
CLIP's protocol, Radford et al. 2021, appendix A.3, with AdamW in place of L-BFGS):

    W* = argmin_W  mean_i CE(W x_i, y_i)      x_i: (D,) L2-normalised image features, W: (C, D) + bias
         trained with AdamW (lr, weight decay wd), a cosine schedule without warmup, `epochs` passes;

    wd is chosen on a validation split: 7 values on logspace(-6, 2) first, then a binary refinement over
    the 97-point grid (span 8, 4, 2, 1 around the best); the final classifier is trained with that wd on
    train + validation (all of train) or on the k-shot set only (few-shot, so it sees k per class).

Same algorithm, grid and data order as CLIP_benchmark (a parity test runs both on the same features), but
on any device, and without its feature cache files: the features are passed in.

Shapes: train/val/test features (N, D) float, labels (N,) int64 in [0, C).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

WD_GRID = np.logspace(-6, 2, num=97).tolist()  # CLIP / CLIP_benchmark's grid
WD_COARSE = np.logspace(-6, 2, num=7).tolist()


@dataclass
class ProbeSettings:
    """Hyperparameters of the probe (CLIP_benchmark's defaults: lr 0.1, 10 epochs, batch 64)."""

    lr: float = 0.1
    epochs: int = 10
    batch_size: int = 64
    seed: int = 0


def _cosine(step: int, steps: int, base_lr: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * step / steps)) * base_lr


def train_linear(
    feats: torch.Tensor, labels: torch.Tensor, n_classes: int, wd: float, s: ProbeSettings
) -> torch.nn.Linear:
    """One logistic-regression fit: AdamW, cosine lr per step, cross-entropy; deterministic for a seed."""
    torch.manual_seed(s.seed)  # the layer's init and the loader's shuffle order, as CLIP_benchmark
    model = torch.nn.Linear(feats.shape[1], n_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=wd)
    loader = DataLoader(TensorDataset(feats, labels), batch_size=s.batch_size, shuffle=True)
    steps = s.epochs * len(loader)
    step = 0
    for _ in range(s.epochs):
        for x, y in loader:
            for group in opt.param_groups:
                group["lr"] = _cosine(step, steps, s.lr)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
    return model


@torch.no_grad()
def _accuracy(model: torch.nn.Linear, feats: torch.Tensor, labels: torch.Tensor) -> float:
    return (model(feats).argmax(1) == labels).sum().item() / len(labels)  # as CLIP_benchmark's `accuracy`


def sweep_weight_decay(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    n_classes: int,
    s: ProbeSettings,
    grid: list[float] = WD_GRID,
    coarse: list[float] = WD_COARSE,
) -> tuple[float, dict[float, float]]:
    """(best weight decay, {wd: validation top-1}) by CLIP_benchmark's coarse-then-binary search."""
    tried: dict[int, float] = {}

    def peak(idxs: list[int]) -> int:
        # CLIP_benchmark's `find_peak`: each round starts from (index 0, accuracy 0) and keeps the first of
        # equals; a fit is deterministic for a seed, so a wd already tried is not fitted again.
        best, best_acc = 0, 0.0
        for i in idxs:
            if i not in tried:
                tried[i] = _accuracy(train_linear(*train, n_classes, grid[i], s), *val)
            if tried[i] > best_acc:
                best, best_acc = i, tried[i]
        return best

    idx = peak([i for i, wd in enumerate(grid) if wd in coarse])
    span = 8
    while span > 0:
        idx = peak([max(idx - span, 0), idx, min(idx + span, len(grid) - 1)])
        span //= 2
    return grid[idx], {grid[i]: acc for i, acc in sorted(tried.items())}


def fewshot_indices(labels: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Indices of the first k samples of each class in a seeded random order (all samples when k < 0)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g)
    if k < 0:
        return perm
    counts: dict[int, int] = {}
    keep = []
    for i in perm.tolist():
        c = int(labels[i])
        if counts.get(c, 0) < k:
            counts[c] = counts.get(c, 0) + 1
            keep.append(i)
    short = {c: n for c, n in counts.items() if n < k}
    if short:
        raise ValueError(f"few-shot k={k}: {len(short)} class(es) have fewer samples (e.g. class {min(short)})")
    return torch.tensor(keep)


def split_validation(labels: torch.Tensor, proportion: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices): a seeded random `proportion` of the samples held out."""
    if not 0 < proportion < 1:
        raise ValueError(f"validation proportion must be in (0, 1), got {proportion}")
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(proportion * len(labels))))
    return perm[n_val:], perm[:n_val]


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    val_feats: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
    val_proportion: float = 0.2,
    fewshot_k: int = -1,
    settings: ProbeSettings | None = None,
    normalize: bool = True,
) -> dict:
    """Fit a linear classifier on frozen features and score it on the test split.

    Args:
        val_feats, val_labels: the validation split of the wd sweep; without one, `val_proportion` of the
            training samples are held out for it (CLIP_benchmark's `--val_proportion`). 0 skips the sweep (wd 0).
        fewshot_k: k training samples per class (-1: all).
        normalize: L2-normalise the features first (CLIP_benchmark's default).

    Returns:
        `metrics` (top1, top5, mean_per_class_recall, weight_decay, n_train, n_test, n_classes) and `sweep`
        ({wd: validation top-1}).
    """
    s = settings or ProbeSettings()
    norm = (lambda x: torch.nn.functional.normalize(x.float(), dim=-1)) if normalize else (lambda x: x.float())
    train_feats, test_feats = norm(train_feats), norm(test_feats)
    train_labels, test_labels = train_labels.long(), test_labels.long()
    if val_feats is None and val_proportion > 0:
        tr, va = split_validation(train_labels, val_proportion, s.seed)
        val_feats, val_labels = train_feats[va], train_labels[va]
        train_feats, train_labels = train_feats[tr], train_labels[tr]
    elif val_feats is not None:
        val_feats, val_labels = norm(val_feats), val_labels.long()
    labels_all = [train_labels, test_labels] + ([val_labels] if val_labels is not None else [])
    n_classes = int(max(int(t.max()) for t in labels_all if len(t)) + 1)
    shot = fewshot_indices(train_labels, fewshot_k, s.seed)
    train = (train_feats[shot], train_labels[shot])
    sweep: dict[float, float] = {}
    wd = 0.0
    if val_feats is not None:
        wd, sweep = sweep_weight_decay(train, (val_feats, val_labels), n_classes, s)
        if fewshot_k < 0:  # full training: fit the final classifier on train + validation, as CLIP_benchmark
            train = (torch.cat([train[0], val_feats]), torch.cat([train[1], val_labels]))
    model = train_linear(*train, n_classes, wd, s)
    with torch.no_grad():
        logits = model(test_feats)
    top5 = logits.topk(min(5, n_classes), dim=1).indices
    pred = top5[:, 0]
    present = test_labels.unique()
    recall = torch.stack([(pred[test_labels == c] == c).float().mean() for c in present])
    metrics = {
        "top1": (pred == test_labels).float().mean().item(),
        "top5": (top5 == test_labels[:, None]).any(1).float().mean().item(),
        "mean_per_class_recall": recall.mean().item(),
        "weight_decay": wd,
        "n_train": len(train[1]),
        "n_test": len(test_labels),
        "n_classes": n_classes,
    }
    return {"task": "linear_probe", "metrics": metrics, "sweep": sweep}
