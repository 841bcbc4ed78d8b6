"""Zero-shot classification (CLIP, Radford et al. 2021, sec. 3.1.4).

Each class is embedded as the mean of its L2-normalised prompt embeddings (one prompt per
template), renormalised; an image is assigned the class of highest cosine similarity.
Metric definitions follow CLIP_benchmark (`clip_benchmark.metrics.zeroshot_classification`):

- `top1` / `top5`: fraction of images whose label is among the k highest-scoring classes
  (`acc1` / `acc5` there; `top5` only when there are at least 5 classes);
- `mean_per_class_recall`: recall averaged over the classes that occur in the labels
  (sklearn's `balanced_accuracy_score`, which CLIP_benchmark calls).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mmcl.eval.templates import format_prompts

EncodeTexts = Callable[[list[str]], torch.Tensor]


@torch.no_grad()
def build_classifier(
    encode_texts: EncodeTexts, classnames: list[str], templates: list[str], batch_size: int = 256
) -> torch.Tensor:
    """Zero-shot classifier weights.

    Args:
        encode_texts: texts -> (N, D) embeddings (normalised or not: each is normalised here).
        classnames: C class names, in label order.
        templates: T templates holding `{}`.
        batch_size: prompts per `encode_texts` call (prompts of several classes share a call).

    Returns:
        (D, C) float32 on CPU: column c = normalise(mean_t normalise(encode(template_t(class_c)))).
    """
    if not classnames or not templates:
        raise ValueError("build_classifier needs at least one class name and one template")
    prompts = [p for name in classnames for p in format_prompts(name, templates)]  # C*T, class-major
    chunks = [encode_texts(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    emb = torch.cat([c.detach().float().cpu() for c in chunks])  # (C*T, D)
    if emb.shape[0] != len(prompts):
        raise ValueError(f"encode_texts returned {emb.shape[0]} rows for {len(prompts)} prompts")
    emb = F.normalize(emb, dim=-1).view(len(classnames), len(templates), -1).mean(dim=1)  # (C, D)
    return F.normalize(emb, dim=-1).t().contiguous()  # (D, C)


@torch.no_grad()
def class_probabilities(
    image_features: torch.Tensor, classifier: torch.Tensor, logit_scale: float, logit_bias: float | None = None
) -> torch.Tensor:
    """Class probabilities as the model was trained to score them.

    Args:
        image_features: (N, D) L2-normalised image embeddings.
        classifier: (D, C) from `build_classifier`.
        logit_scale: exp of the model's learned temperature (within the model's own maximum).
        logit_bias: the SigLIP bias, or None for a CLIP (softmax) model.

    Returns:
        (N, C) float32: softmax(scale * cos) over the classes (CLIP), or sigmoid(scale * cos + bias) for each
        class independently (SigLIP, Zhai et al. 2023).
    """
    logits = logit_scale * (image_features.float().cpu() @ classifier.float().cpu())  # (N, C)
    return torch.sigmoid(logits + logit_bias) if logit_bias is not None else logits.softmax(dim=-1)


def per_class_recall(confusion: torch.Tensor) -> torch.Tensor:
    """(C,) recall of each class from a (C, C) confusion matrix (rows true); NaN for absent classes."""
    support = confusion.sum(dim=1).double()
    return torch.where(support > 0, confusion.diag().double() / support.clamp_min(1), torch.nan)


@torch.no_grad()
def zero_shot_eval(image_features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor, topk: int = 5) -> dict:
    """Classify image embeddings with a zero-shot classifier and score the predictions.

    Args:
        image_features: (N, D) image embeddings (L2-normalised; the ranking does not depend on it).
        labels: (N,) class indices in [0, C).
        classifier: (D, C) from `build_classifier`.
        topk: how many top classes to return per sample.

    Returns:
        `top1`, `top5` (if C >= 5), `mean_per_class_recall`, `n_samples`, `n_classes` (scalars),
        `per_class_recall` (C floats, NaN where a class has no sample), `confusion` ((C, C) LongTensor,
        rows = true class, columns = predicted class), `predictions` ((N,) top-1 class), `topk`
        ((N, min(topk, C)) classes by decreasing score), `scores` ((N,) top-1 cosine similarity).
    """
    labels = labels.long().cpu()
    n, c = image_features.shape[0], classifier.shape[1]
    if labels.shape != (n,):
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected ({n},)")
    if n == 0:
        raise ValueError("zero_shot_eval got no samples")
    if labels.min() < 0 or labels.max() >= c:
        raise ValueError(f"labels must lie in [0, {c}); got [{int(labels.min())}, {int(labels.max())}]")
    logits = image_features.float().cpu() @ classifier.float().cpu()  # (N, C)
    k = min(max(topk, 5 if c >= 5 else 1), c)
    top_scores, top_idx = logits.topk(k, dim=1)  # (N, k), decreasing
    hits = top_idx == labels[:, None]  # (N, k)
    pred = top_idx[:, 0]
    confusion = torch.bincount(labels * c + pred, minlength=c * c).view(c, c)
    recall = per_class_recall(confusion)
    out = {
        "top1": hits[:, :1].any(dim=1).double().mean().item(),
        "mean_per_class_recall": recall[~recall.isnan()].mean().item(),
        "n_samples": n,
        "n_classes": c,
    }
    if c >= 5:
        out["top5"] = hits[:, :5].any(dim=1).double().mean().item()
    out.update(
        per_class_recall=recall.tolist(),
        confusion=confusion,
        predictions=pred,
        topk=top_idx[:, : min(topk, c)],
        scores=top_scores[:, 0],
    )
    return out
