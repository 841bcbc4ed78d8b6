"""Choosing and tuning the faiss structure of a retrieval index, the way autofaiss does.

`plan_index` picks from the collection size and a memory budget:

    n <= exact_threshold         exact (`Flat`; `SQfp16` when float32 does not fit the budget)
    above                        IVF with about 4 sqrt(n) lists (a power of two; an HNSW coarse quantizer
                                 from 8192 lists), lists stored as
                                 float32 / float16 / 8-bit scalar codes, the first that fits the budget;
                                 when none fits, 8-bit codes in memory-mapped lists on disk
    kind='hnsw'                  a graph (`HNSW{m},Flat` or `,SQfp16`): no training, more memory
    storage='pq'                 IVF-PQ (dim/8 bytes per vector): the smallest, the least exact

`tune_search` then sets the search breadth (`nprobe`, or HNSW's `efSearch`) to the smallest value whose
recall@k against exact search reaches the target on a sample of the stored vectors used as queries
(each query's own vector left out of both lists: the sample is held out from what it is scored on).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mmcl.utils import UserError

log = logging.getLogger("mmcl")

STORAGES = ("auto", "fp32", "fp16", "sq8", "pq")
_CODE_BYTES = {"fp32": 4.0, "fp16": 2.0, "sq8": 1.0}
_FACTORY_CODE = {"fp32": "Flat", "fp16": "SQfp16", "sq8": "SQ8"}
_IVF_OVERHEAD = 8  # bytes per vector for its id in the inverted lists
# From this many lists the coarse quantizer is an HNSW graph over the centroids (autofaiss does the same):
# a flat one scans nlist x dim floats per query (32 MiB at 16k x 512) and per added vector.
HNSW_COARSE_FROM = 8192
# Tuning stops when four doublings of the search breadth (16x the work) together add less recall than this.
# 10M x 512 in 8-bit codes creeps from 0.886 (nprobe 4) to 0.889 (16), 0.891 (32), 0.899 (64) and 0.911 (128):
# three doublings can add under 0.005 on a slope that still reaches the target.
PLATEAU = 0.005


@dataclass
class IndexPlan:
    """What to build: a `faiss.index_factory` string and why."""

    structure: str  # 'flat', 'ivf' or 'hnsw'
    factory: str
    storage: str  # 'fp32', 'fp16', 'sq8' or 'pq'
    nlist: int
    on_disk: bool  # inverted lists memory-mapped from the index file instead of loaded
    bytes_estimate: int  # memory the index needs when loaded (lists included unless on disk)
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_budget() -> int:
    """Half the memory available now: room for the app, the model and the page cache beside the index."""
    import psutil

    return int(psutil.virtual_memory().available // 2)


def parse_bytes(text: str | int) -> int:
    """'4G', '512M', '1.5GiB', '2000000000' -> bytes (0 = automatic)."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(s[-1:], 1)
    try:
        value = float(s[:-1] if scale > 1 else s)
    except ValueError:
        raise UserError(f"cannot read '{text}' as a size (e.g. 4G, 512M, 2000000000)") from None
    if not 0 <= value < math.inf:  # NaN and inf too
        raise UserError(f"a memory budget must be a size >= 0, got '{text}'")
    return int(value * scale)


def default_nlist(n: int) -> int:
    """About 4 sqrt(n) lists, a power of two, with at least 39 training points each (faiss's k-means minimum)."""
    nlist = 2 ** round(math.log2(max(4 * math.sqrt(max(n, 1)), 1)))
    return int(max(1, min(nlist, 65536, n // 39)))


def _pq_m(dim: int) -> int:
    """PQ sub-quantizers: dim/8 (64 bytes for 512-d), rounded down to a divisor of dim."""
    m = max(1, dim // 8)
    while dim % m:
        m -= 1
    return m


def plan_index(
    n: int,
    dim: int,
    kind: str = "auto",
    *,
    storage: str = "auto",
    memory_budget: int = 0,
    exact_threshold: int = 100_000,
    nlist: int = 0,
    hnsw_m: int = 32,
    on_disk: bool | None = None,
) -> IndexPlan:
    """The structure for `n` vectors of `dim` under `memory_budget` bytes (0 = half the available memory).

    Args:
        kind: 'auto' (exact up to `exact_threshold`, IVF above), 'flat', 'ivf' or 'hnsw'.
        storage: 'auto' (the most exact that fits), 'fp32', 'fp16', 'sq8' or 'pq' (IVF only).
        on_disk: force (True) or forbid (False) memory-mapped inverted lists; None = when nothing fits.
    """
    if storage not in STORAGES:
        raise UserError(f"unknown index storage '{storage}'; choose one of {', '.join(STORAGES)}")
    budget = memory_budget or default_budget()
    structure = kind if kind in ("flat", "ivf", "hnsw") else ("flat" if n <= exact_threshold else "ivf")
    if structure != "ivf" and storage in ("pq", "sq8"):
        raise UserError(f"storage '{storage}' needs an IVF index (kind ivf or auto above the exact threshold)")

    def fits(code_bytes: float, extra: int = 0) -> bool:
        return n * (dim * code_bytes + extra) <= budget

    if structure in ("flat", "hnsw"):
        graph = hnsw_m * 2 * 4 if structure == "hnsw" else 0  # ~2m neighbour ids per vector on level 0
        chosen = storage if storage != "auto" else ("fp32" if fits(4, graph) else "fp16")
        size = int(n * (dim * _CODE_BYTES[chosen] + graph))
        factory = _FACTORY_CODE[chosen] if structure == "flat" else f"HNSW{hnsw_m},{_FACTORY_CODE[chosen]}"
        reason = f"{n} vectors, {structure}, {chosen} ({size / 2**20:.0f} MiB; budget {budget / 2**20:.0f} MiB)"
        return IndexPlan(structure, factory, chosen, 0, False, size, reason)

    lists = nlist or default_nlist(n)
    centroids = lists * dim * 4
    if storage == "pq":
        chosen, code = "pq", float(_pq_m(dim))
    elif storage != "auto":
        chosen, code = storage, _CODE_BYTES[storage]
    else:
        chosen = next((s for s in ("fp32", "fp16", "sq8") if fits(_CODE_BYTES[s], _IVF_OVERHEAD)), "sq8")
        code = _CODE_BYTES[chosen]
    lists_bytes = int(n * (dim * code if chosen != "pq" else code) + n * _IVF_OVERHEAD)
    disk = on_disk if on_disk is not None else lists_bytes + centroids > budget
    coarse = "_HNSW32" if lists >= HNSW_COARSE_FROM else ""
    factory = f"IVF{lists}{coarse}," + (f"PQ{int(code)}x8" if chosen == "pq" else _FACTORY_CODE[chosen])
    size = centroids + (0 if disk else lists_bytes)
    where = "memory-mapped lists on disk" if disk else "in memory"
    reason = (
        f"{n} vectors, IVF {lists} lists, {chosen} {where} (lists {lists_bytes / 2**20:.0f} MiB; "
        f"budget {budget / 2**20:.0f} MiB)"
    )
    return IndexPlan("ivf", factory, chosen, lists, disk, size, reason)


def exact_topk(queries: np.ndarray, chunks: Iterable[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of `queries` over vectors given in consecutive chunks (one pass, any size).

    Returns:
        scores (Q, k) and ids (Q, k) (ids count across the chunks), best first.
    """
    import torch

    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    best_s = torch.full((len(q), 0), -float("inf"))
    best_i = torch.zeros((len(q), 0), dtype=torch.long)
    start = 0
    for chunk in chunks:
        x = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32))
        s = q @ x.T
        kk = min(k, s.shape[1])
        top_s, top_i = torch.topk(s, kk, dim=1)
        best_s, pick = torch.topk(torch.cat([best_s, top_s], 1), min(k, best_s.shape[1] + kk), dim=1)
        best_i = torch.gather(torch.cat([best_i, top_i + start], 1), 1, pick)
        start += len(chunk)
    return best_s.numpy(), best_i.numpy()


def recall_at_k(found: np.ndarray, truth: np.ndarray, self_ids: np.ndarray | None, k: int) -> float:
    """Mean share of the true k nearest (each query's own id left out of both lists) that were found."""
    hits = 0
    for row, (f, t) in enumerate(zip(found, truth)):
        own = self_ids[row] if self_ids is not None else -2
        t_set = [i for i in t if i != own][:k]
        f_set = {i for i in f if i != own and i >= 0}
        hits += sum(i in f_set for i in t_set) / max(len(t_set), 1)
    return hits / max(len(found), 1)


def set_nprobe(ivf: Any, nprobe: int) -> None:
    """Search `nprobe` lists of an IVF index; an HNSW coarse quantizer is widened to return that many."""
    import faiss

    ivf.nprobe = nprobe
    coarse = faiss.downcast_index(ivf.quantizer)
    if isinstance(coarse, faiss.IndexHNSW):
        coarse.hnsw.efSearch = max(64, 2 * nprobe)


def tune_search(
    index: Any, queries: np.ndarray, truth: np.ndarray, self_ids: np.ndarray | None, target: float, k: int = 10
) -> dict[str, Any]:
    """Set the smallest `nprobe` (IVF) or `efSearch` (HNSW) whose recall@k on `queries` reaches `target` (plus
    two standard errors of the estimate).

    `truth` holds the exact top-(k+1) ids of each query (top-k when `self_ids` is None: queries not stored).
    Returns {'param', 'value', 'recall', 'aim', 'tried'}. When recall levels off below the target (8-bit or PQ codes cap it: a broader search cannot find what the
    codes rank wrongly), the smallest value on the plateau is kept and the ceiling logged, instead of
    scanning every list for nothing.
    """
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        param, values = "nprobe", [v for v in (2**i for i in range(17)) if v < ivf.nlist] + [ivf.nlist]

        def setter(v: int) -> None:
            set_nprobe(ivf, v)
    elif isinstance(index, faiss.IndexHNSW):
        param, values = "efSearch", [16, 32, 64, 128, 256, 512, 1024, 2048]

        def setter(v: int) -> None:
            index.hnsw.efSearch = v
    else:
        return {"param": None, "value": None, "recall": 1.0, "tried": []}
    # Aim above the target by two standard errors of the recall estimate (256 queries x 10: ~0.012 at 0.9), so
    # the target holds on the queries the index will answer, not only on those it was tuned on (tuned to 0.9
    # exactly, 10M vectors gave 0.886 on fresh queries: bench/results/index.md).
    aim = min(1.0, target + 2 * math.sqrt(target * (1 - target) / max(len(queries) * k, 1)))
    tried: list[list[float]] = []
    for value in values:
        setter(value)
        extra = 1 if self_ids is not None else 0  # room for the query's own vector, left out when scored
        _, found = index.search(np.ascontiguousarray(queries, dtype=np.float32), k + extra)
        recall = recall_at_k(found, truth, self_ids, k)
        tried.append([value, round(recall, 4)])
        if recall >= aim:
            break
        if len(tried) >= 5 and recall - tried[-5][1] < PLATEAU:  # four doublings gained (almost) nothing
            value, recall = tried[-5][0], tried[-5][1]
            setter(value)
            log.warning("index: recall@%d levels off at %.3f (%s=%d; target %.2f)", k, recall, param, value, target)
            break
    else:
        log.warning("index: %s=%d reaches recall@%d %.3f only (target %.2f)", param, value, k, recall, target)
    log.info("index: %s=%d gives recall@%d %.3f on %d held-out queries", param, value, k, recall, len(queries))
    return {"param": param, "value": value, "recall": round(recall, 4), "aim": round(aim, 4), "tried": tried}


def apply_tuning(index: Any, tuning: dict[str, Any]) -> None:
    """Set the manifest's search breadth on a loaded faiss index (the manifest, not the faiss file, is the truth:
    a re-tune rewrites only the manifest)."""
    import faiss

    if index is None or not tuning.get("value"):
        return
    ivf = faiss.try_extract_index_ivf(index)
    if tuning.get("param") == "nprobe" and ivf is not None:
        set_nprobe(ivf, int(tuning["value"]))
    elif tuning.get("param") == "efSearch" and isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = int(tuning["value"])
