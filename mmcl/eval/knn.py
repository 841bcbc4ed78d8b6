"""Weighted k-nearest-neighbour classifier on frozen features (DINO's protocol, Caron et al. 2021; Wu et al. 2018).

For a test feature q (L2-normalised) and the training bank X (N, D), labels y:

    s_j = q . x_j                      cosine similarity to every training sample
    N_k = the k most similar (k = 20)
    score(c) = sum_{j in N_k, y_j = c} exp(s_j / T)      T = 0.07
    prediction = argmax_c score(c)

Computed in blocks of test queries, so memory is (block, N) and never (N_test, N).
Shapes: bank (N, D), labels (N,) int64, queries (M, D) -> scores (M, C).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def knn_scores(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    n_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    block: int = 1024,
) -> torch.Tensor:
    """(M, C) class votes of each query: the exp(similarity / T) weights of its k nearest bank samples."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    bank = torch.nn.functional.normalize(bank.float(), dim=-1)
    queries = torch.nn.functional.normalize(queries.float(), dim=-1)
    k = min(k, len(bank))
    out = []
    for i in range(0, len(queries), block):
        sim, idx = (queries[i : i + block] @ bank.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(len(sim), n_classes)
        votes.scatter_add_(1, bank_labels[idx].long(), (sim / temperature).exp())
        out.append(votes)
    return torch.cat(out) if out else torch.zeros(0, n_classes)


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> dict:
    """DINO's weighted k-NN evaluation: `metrics` top1, top5, k, temperature, n_train, n_test, n_classes."""
    n_classes = int(max(int(train_labels.max()), int(test_labels.max())) + 1)
    scores = knn_scores(train_feats, train_labels, test_feats, n_classes, k, temperature)
    top5 = scores.topk(min(5, n_classes), dim=1).indices
    labels = test_labels.long()
    metrics = {
        "top1": (top5[:, 0] == labels).float().mean().item(),
        "top5": (top5 == labels[:, None]).any(1).float().mean().item(),
        "k": k,
        "temperature": temperature,
        "n_train": len(train_labels),
        "n_test": len(test_labels),
        "n_classes": n_classes,
    }
    return {"task": "knn", "metrics": metrics}
