"""Image-text retrieval: recall@k, median and mean rank, chunked so no N x N matrix is built.

Queries are scored against the gallery one (query chunk x gallery chunk) block at a time. For every
query we need only the score of its best positive (any of an image's captions; a caption's one
image) and the number of negatives that score at least as high:

    rank(q) = 1 + #{g not positive for q : s(q, g) >= max_{p positive} s(q, p)}

which is the 1-based rank of the first positive in the sorted list. Then recall@k = mean(rank <= k):
a query is a hit if ANY of its positives is in its top k, the definition CLIP_benchmark uses
(`zeroshot_retrieval.evaluate`: recall > 0) and CLIP's papers report. Counting ranks instead of
merging a running top-k gives every k and the median/mean rank in one pass, with memory
O(chunk^2 + N*D); per block it is one matmul, one comparison and one count. Ties count against
the query (a collapsed model whose embeddings are all equal gets the worst rank, not the best). Median/mean rank follow open_clip's `get_clip_metrics`:
`floor(median(rank0)) + 1` and `mean(rank0) + 1` with 0-based ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch


def _pair_scores(
    image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor
) -> torch.Tensor:
    """(T,) score of each text with its own image, computed once so every chunking compares the same numbers."""
    return (text_features * image_features[text_to_image]).sum(dim=-1)


@torch.no_grad()
def _ranks(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    best_pos: torch.Tensor,
    positives: Callable[[int, int, int, int], tuple[torch.Tensor, torch.Tensor]],
    chunk_size: int,
) -> torch.Tensor:
    """(Q,) 1-based rank of each query's best positive among the gallery.

    `positives(q_lo, q_hi, g_lo, g_hi)` gives the (rows, cols) block-local indices of the positive pairs
    in one block. Each block costs one matmul, one comparison and one count over (q, g); positives are
    then taken out of the count by looking at their own entries of the same score block, so the count
    and the correction compare exactly the same numbers.
    """
    counts = torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device)
    for q_lo in range(0, queries.shape[0], chunk_size):
        q_hi = min(q_lo + chunk_size, queries.shape[0])
        q = queries[q_lo:q_hi]  # (q, D)
        threshold = best_pos[q_lo:q_hi]  # (q,)
        for g_lo in range(0, gallery.shape[0], chunk_size):
            g_hi = min(g_lo + chunk_size, gallery.shape[0])
            scores = q @ gallery[g_lo:g_hi].t()  # (q, g)
            counts[q_lo:q_hi] += (scores >= threshold[:, None]).sum(dim=1, dtype=torch.int32)
            rows, cols = positives(q_lo, q_hi, g_lo, g_hi)
            counted = (scores[rows, cols] >= threshold[rows]).long()
            counts.index_add_(0, rows + q_lo, -counted)
    return counts + 1


def _summarise(ranks: torch.Tensor, prefix: str, ks: tuple[int, ...]) -> dict[str, float]:
    ranks = ranks.cpu()
    out = {f"{prefix}_recall@{k}": (ranks <= k).double().mean().item() for k in ks}
    out[f"{prefix}_median_rank"] = float(math.floor(np.median((ranks - 1).numpy())) + 1)
    out[f"{prefix}_mean_rank"] = (ranks - 1).double().mean().item() + 1
    return out


@torch.no_grad()
def retrieval_eval(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk_size: int = 1024,
    return_ranks: bool = False,
) -> dict:
    """Image->text and text->image retrieval metrics.

    Args:
        image_features: (I, D) L2-normalised image embeddings.
        text_features: (T, D) L2-normalised text embeddings, T >= I when images have several captions.
        text_to_image: (T,) long, the image index of each text; every image needs at least one text.
        ks: recall cut-offs.
        chunk_size: queries and gallery items per block: peak extra memory is chunk_size^2 scores.
        return_ranks: also return the per-query ranks (`i2t_ranks` (I,), `t2i_ranks` (T,)).

    Returns:
        `i2t_recall@k`, `t2i_recall@k`, `{i2t,t2i}_median_rank`, `{i2t,t2i}_mean_rank`, `rsum`
        (sum of all recalls x 100), `n_images`, `n_texts`.
    """
    n_img, n_txt = image_features.shape[0], text_features.shape[0]
    text_to_image = text_to_image.long().to(image_features.device)
    if text_to_image.shape != (n_txt,):
        raise ValueError(f"text_to_image has shape {tuple(text_to_image.shape)}, expected ({n_txt},)")
    if n_img == 0 or n_txt == 0:
        raise ValueError("retrieval_eval needs at least one image and one text")
    if text_to_image.min() < 0 or text_to_image.max() >= n_img:
        raise ValueError(f"text_to_image must lie in [0, {n_img})")
    captions_per_image = torch.bincount(text_to_image, minlength=n_img)
    if (captions_per_image == 0).any():
        missing = int((captions_per_image == 0).nonzero()[0])
        raise ValueError(f"image {missing} has no text: every image needs at least one caption")
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")

    image_features = image_features.float()
    text_features = text_features.float().to(image_features.device)
    pair = _pair_scores(image_features, text_features, text_to_image)  # (T,)
    best_image_pos = torch.full((n_img,), -math.inf, device=pair.device).scatter_reduce(
        0, text_to_image, pair, reduce="amax", include_self=True
    )  # (I,) best caption score of each image

    def image_query_positives(q0: int, q1: int, g0: int, g1: int) -> tuple[torch.Tensor, torch.Tensor]:
        owner = text_to_image[g0:g1]  # the gallery texts of image i are its positives
        cols = ((owner >= q0) & (owner < q1)).nonzero().squeeze(1)
        return owner[cols] - q0, cols

    def text_query_positives(q0: int, q1: int, g0: int, g1: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = text_to_image[q0:q1]  # one positive image per text
        rows = ((image >= g0) & (image < g1)).nonzero().squeeze(1)
        return rows, image[rows] - g0

    i2t = _ranks(image_features, text_features, best_image_pos, image_query_positives, chunk_size)
    t2i = _ranks(text_features, image_features, pair, text_query_positives, chunk_size)
    out: dict = {**_summarise(i2t, "i2t", ks), **_summarise(t2i, "t2i", ks)}
    out["rsum"] = 100 * sum(out[f"{p}_recall@{k}"] for p in ("i2t", "t2i") for k in ks)
    out["n_images"], out["n_texts"] = n_img, n_txt
    if return_ranks:
        out["i2t_ranks"], out["t2i_ranks"] = i2t.cpu(), t2i.cpu()
    return out


@torch.no_grad()
def top_texts(
    image_features: torch.Tensor, text_features: torch.Tensor, k: int = 3, chunk_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k texts of each image, merging per-chunk top-k so memory stays O(I * (k + chunk)).

    Returns:
        (I, k) scores and (I, k) text indices, best first.
    """
    k = min(k, text_features.shape[0])
    best_s = torch.full((image_features.shape[0], 0), -math.inf)
    best_i = torch.zeros((image_features.shape[0], 0), dtype=torch.long)
    for lo in range(0, text_features.shape[0], chunk_size):
        scores = (image_features.float() @ text_features[lo : lo + chunk_size].float().t()).cpu()  # (I, t)
        s, i = scores.topk(min(k, scores.shape[1]), dim=1)
        best_s, order = torch.cat([best_s, s], 1).topk(k, dim=1)
        best_i = torch.cat([best_i, i + lo], 1).gather(1, order)
    return best_s, best_i
