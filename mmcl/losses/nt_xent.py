"""InfoNCE between two views (van den Oord et al. 2018) and SimCLR's NT-Xent (Chen et al. 2020).

Both take two (n, D) views of the same n samples, gather them across processes (with gradients) so
the negatives are the global batch, and compute the rows of this process's samples (labels offset
by rank * n), so the DDP-averaged gradient equals the full-batch one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmcl.losses.distributed import all_gather_cat, world_info


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float, symmetric: bool = True) -> dict[str, torch.Tensor]:
    """Two-view InfoNCE: a_i's positive is b_i, its negatives every other b_j of the global batch.

        L = -1/n sum_i log softmax_j(<a_i, b_j> / t)[i]     (averaged with the b -> a direction if symmetric)

    Shapes: a, b (n, D), L2-normalised. Returns {'loss', 'acc'} (share of rows whose best match is the pair).
    """
    rank, _ = world_info()
    n = a.shape[0]
    labels = torch.arange(n, device=a.device) + rank * n
    logits_ab = a @ all_gather_cat(b).T / temperature  # (n, P*n)
    loss = F.cross_entropy(logits_ab, labels)
    if symmetric:
        loss = (loss + F.cross_entropy(b @ all_gather_cat(a).T / temperature, labels)) / 2
    with torch.no_grad():
        acc = (logits_ab.argmax(1) == labels).float().mean()
    return {"loss": loss, "acc": acc}


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> dict[str, torch.Tensor]:
    """SimCLR's normalised temperature-scaled cross-entropy over the 2N views of N samples.

    With z = [a; b] (2N, D) normalised, each view's positive is the other view of its sample and its
    negatives the 2N - 2 other views (itself excluded):

        L = -1/(2N) sum_k log  exp(<z_k, z_pos(k)> / t) / sum_{j != k} exp(<z_k, z_j> / t)

    Shapes: a, b (n, D) L2-normalised (this process's rows). Returns {'loss', 'acc'}.
    """
    rank, world = world_info()
    n = a.shape[0]
    all_a, all_b = all_gather_cat(a), all_gather_cat(b)  # (P*n, D)
    keys = torch.cat([all_a, all_b])  # (2Pn, D): every view of the global batch
    queries = torch.cat([a, b])  # (2n, D): this process's views
    own = torch.arange(n, device=a.device) + rank * n
    self_idx = torch.cat([own, own + world * n])  # each query's own column (masked out)
    pos_idx = torch.cat([own + world * n, own])  # the other view of the same sample
    logits = queries @ keys.T / temperature  # (2n, 2Pn)
    logits = logits.masked_fill(F.one_hot(self_idx, keys.shape[0]).bool(), float("-inf"))
    loss = F.cross_entropy(logits, pos_idx)
    with torch.no_grad():
        acc = (logits.argmax(1) == pos_idx).float().mean()
    return {"loss": loss, "acc": acc}
