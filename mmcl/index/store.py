"""`EmbeddingIndex`: a faiss index over image embeddings with one metadata row per vector, saved atomically.

Vectors are compared by inner product (cosine for the L2-normalised embeddings of `mmcl.inference`).
Structure (`mmcl.index.plan`): exact for small collections (a single query scans one block of rows per
thread with faiss's kernel: about one read of the stored vectors); past `ivf_threshold` vectors IVF with float32,
float16, 8-bit or PQ codes, whichever fits the memory budget, its `nprobe` tuned to `target_recall`, the
inverted lists memory-mapped from the index file (`on_disk`) when they do not fit; or HNSW on request.
Added one batch at a time (the app, `--append`), IVF is re-trained whenever the collection has grown 4x.

Each save writes a new generation of files under temporary names, renames them, and then replaces the
manifest (`mmcl.index.files`), so a crash leaves the previous index intact and readers never see half of a new
one. A save holds the folder's lock, so the temporaries a killed save left behind are removed by the next one.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from mmcl.index.files import (
    FORMAT,
    MANIFEST,
    SAVE_TEMPORARY,
    MetaRows,
    check_files,
    folder_lock,
    read_faiss,
    read_manifest,
    sha256_file,
)
from mmcl.index.plan import apply_tuning, exact_topk, plan_index, set_nprobe, tune_search
from mmcl.utils import UserError, atomic_open, atomic_write_text

log = logging.getLogger("mmcl")

KINDS = ("auto", "flat", "ivf", "hnsw")
# Exact search of 100k x 512 takes ~45 ms per query on 2 busy cores; past that IVF (nprobe = nlist/4) is
# 4-8x faster at recall@10 >= 0.96 on embedding-like vectors (bench/results/app.md).
DEFAULT_IVF_THRESHOLD = 100_000
IVF_MIN_TRAIN = 1_000  # kind='ivf' stays exact below this many vectors (k-means needs data)
IVF_RETRAIN_GROWTH = 4  # re-train the coarse quantizer when the collection has grown this much
# saved in the manifest (with their defaults for manifests written before they existed)
PARAMS = {
    "kind": "auto",
    "ivf_threshold": DEFAULT_IVF_THRESHOLD,
    "nlist": 0,
    "nprobe": 0,
    "hnsw_m": 32,
    "ef_search": 128,
    "storage": "auto",
    "memory_budget": 0,
    "target_recall": 0.95,
}
TUNE_QUERIES = 256  # held-out queries for tuning nprobe / efSearch
# Exact search: from this many queries faiss's batched (BLAS) search is used as is; below it, collections of
# SPLIT_SCAN_MIN vectors or more are scanned by one thread per block of rows (see `_exact_search`).
FEW_QUERIES = 16
SPLIT_SCAN_MIN = 200_000


class EmptyIndexError(UserError):
    """A search on an index that holds no vectors."""


def as_matrix(vectors: Any, dim: int | None) -> np.ndarray:
    """(N, D) contiguous float32 from a torch tensor, numpy array or nested list."""
    if hasattr(vectors, "detach"):
        vectors = vectors.detach().cpu().float().numpy()
    x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        raise UserError(f"expected vectors of shape (N, {dim}), got {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise UserError("vectors contain NaN or inf")
    return x


class EmbeddingIndex:
    """Inner-product search over vectors with one metadata dict per vector.

    Args:
        dim: vector size.
        kind: 'auto' (exact below `ivf_threshold`, IVF above), 'flat' (always exact), 'ivf' (IVF from
            `IVF_MIN_TRAIN` vectors on) or 'hnsw' (graph index, no training).
        ivf_threshold: collection size at which 'auto' switches from exact to IVF.
        nlist: IVF lists; 0 = about sqrt(N) at training time.
        nprobe: IVF lists searched per query; 0 = tuned to `target_recall`.
        hnsw_m: HNSW graph degree.
        ef_search: HNSW search breadth (re-tuned to `target_recall` by `from_chunks`).
        storage: vector codes: 'auto' (the most exact that fits `memory_budget`), 'fp32', 'fp16', 'sq8', 'pq'.
        memory_budget: bytes the index may take in memory; 0 = half the available memory.
        target_recall: recall@10 against exact search the tuned search breadth must reach.
    """

    def __init__(
        self,
        dim: int,
        kind: str = "auto",
        ivf_threshold: int = DEFAULT_IVF_THRESHOLD,
        nlist: int = 0,
        nprobe: int = 0,
        hnsw_m: int = 32,
        ef_search: int = 128,
        storage: str = "auto",
        memory_budget: int = 0,
        target_recall: float = 0.95,
    ) -> None:
        if not 0 < target_recall <= 1:
            raise UserError(f"target recall must be in (0, 1], got {target_recall}")
        if kind not in KINDS:
            raise UserError(f"unknown index kind '{kind}'; choose one of {', '.join(KINDS)}")
        if dim < 1:
            raise UserError(f"index dimension must be >= 1, got {dim}")
        self.dim, self.kind, self.ivf_threshold = dim, kind, ivf_threshold
        self.nlist, self.nprobe, self.hnsw_m, self.ef_search = nlist, nprobe, hnsw_m, ef_search
        self.storage, self.memory_budget, self.target_recall = storage, memory_budget, target_recall
        self.plan: dict[str, Any] = {}  # the IndexPlan the structure came from
        self.tuning: dict[str, Any] = {}  # what tune_search chose
        self.on_disk = False  # save the inverted lists to be memory-mapped on load
        self.metas: Sequence[dict[str, Any]] = []  # a list, or the lazy `MetaRows` of a loaded index
        self.info: dict[str, Any] = {}  # free-form provenance saved in the manifest (model, sources)
        self._index: Any = None
        self._trained_at = 0  # collection size when the IVF quantizer was last trained

    def __len__(self) -> int:
        return len(self.metas)

    @property
    def structure(self) -> str:
        """The faiss structure in use now: 'flat', 'ivf' or 'hnsw' ('flat' while empty)."""
        import faiss

        if isinstance(self._index, faiss.IndexIVF):
            return "ivf"
        if isinstance(self._index, faiss.IndexHNSW):
            return "hnsw"
        return "flat"

    def add(self, vectors: Any, metas: Sequence[dict[str, Any]] | None = None) -> list[int]:
        """Append (N, D) vectors with their metadata; returns the new ids (consecutive)."""
        x = as_matrix(vectors, self.dim)
        metas = list(metas) if metas is not None else [{} for _ in range(len(x))]
        if len(metas) != len(x):
            raise UserError(f"got {len(x)} vectors but {len(metas)} metadata entries")
        start = len(self.metas)
        ids = list(range(start, start + len(x)))
        if self._needs_training(start + len(x)):
            old = self.vectors()
            self._index = self._train_ivf(np.concatenate([old, x]) if len(old) else x)
            self._trained_at = start + len(x)
        else:
            if self._index is None:
                self._index = self._new_exact()
            self._index.add(x)
        if not isinstance(self.metas, list):
            self.metas = list(self.metas)  # a loaded index grows: its rows move into memory
        self.metas.extend({**m, "id": i} for i, m in zip(ids, metas))
        return ids

    def search(self, queries: Any, k: int = 10) -> tuple[np.ndarray, list[list[dict[str, Any] | None]]]:
        """The `k` nearest stored vectors of each query by inner product.

        Returns:
            scores (Q, k') float32 with k' = min(k, len(self)), best first, and the matching metadata;
            where an approximate index finds fewer than k' hits the row is padded with -inf and None.

        Raises:
            EmptyIndexError: the index holds no vectors.
        """
        if not self.metas:
            raise EmptyIndexError("the index is empty: add images with `mmcl index build SOURCES --out DIR`")
        q = as_matrix(queries, self.dim)
        k = max(1, min(int(k), len(self.metas)))
        scores, ids = (
            self._exact_search(q, k) if type(self._index).__name__ == "IndexFlatIP" else self._index.search(q, k)
        )
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        return scores, [[self.metas[i] if i >= 0 else None for i in row] for row in ids]

    def _exact_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact search over the stored float32 vectors, as fast as one read of them.

        A batch of queries goes to faiss's own search (a BLAS product, threaded over queries). A few queries
        would leave all but one core idle (faiss threads over queries) and torch's matrix-vector product
        reads the vectors at a fraction of memory bandwidth (bench/results/index.md), so instead the rows
        are cut into one contiguous block per thread, each block searched by faiss's single-threaded
        kernel in a thread of our own (faiss releases the GIL), and the per-block top-k merged.
        """
        import faiss

        n, threads = self._index.ntotal, faiss.omp_get_max_threads()
        if len(q) >= FEW_QUERIES or threads == 1 or n < SPLIT_SCAN_MIN:
            return self._index.search(q, k)
        stored = faiss.rev_swig_ptr(self._index.get_xb(), n * self.dim).reshape(n, self.dim)
        bounds = np.linspace(0, n, threads + 1, dtype=np.int64)

        def block(i: int) -> tuple[np.ndarray, np.ndarray]:
            faiss.omp_set_num_threads(1)  # per OS thread (an OpenMP ICV): the caller's setting is untouched
            lo, hi = int(bounds[i]), int(bounds[i + 1])
            scores, ids = faiss.knn(q, stored[lo:hi], min(k, hi - lo), faiss.METRIC_INNER_PRODUCT)
            return scores, np.where(ids >= 0, ids + lo, -1)

        parts = list(_scan_pool(threads).map(block, range(threads)))
        scores = np.concatenate([p[0] for p in parts], axis=1)
        ids = np.concatenate([p[1] for p in parts], axis=1)
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, best, 1), np.take_along_axis(ids, best, 1)

    def vectors(self) -> np.ndarray:
        """All stored vectors, (N, D), in id order."""
        import faiss

        if not self.metas:
            return np.zeros((0, self.dim), np.float32)
        if isinstance(self._index, faiss.IndexIVF):
            self._index.make_direct_map()
        return self._index.reconstruct_n(0, len(self.metas))

    def _new_exact(self) -> Any:
        import faiss

        code = {"fp16": "SQfp16"}.get(self.storage, "Flat")
        if self.kind == "hnsw":
            index = faiss.index_factory(self.dim, f"HNSW{self.hnsw_m},{code}", faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = self.ef_search
            return index
        if code == "Flat":
            return faiss.IndexFlatIP(self.dim)
        return faiss.index_factory(self.dim, code, faiss.METRIC_INNER_PRODUCT)  # fp16 codes need no training

    def _needs_training(self, n: int) -> bool:
        """Whether a collection of `n` vectors should get a (re-)trained IVF structure."""
        threshold = {"auto": self.ivf_threshold, "ivf": IVF_MIN_TRAIN}.get(self.kind)
        if threshold is None or n < threshold:
            return False
        return not self._trained_at or n >= IVF_RETRAIN_GROWTH * self._trained_at

    def _train_ivf(self, x: np.ndarray) -> Any:
        """A new IVF index trained on (a sample of) `x` and holding all of it, its nprobe tuned."""
        index = self._trained([x], len(x), "ivf")
        index.add(x)
        self._tune(index, [x])
        return index

    def _trained(self, chunks: Sequence[np.ndarray], n: int, kind: str) -> Any:
        """An empty index of the planned structure for `n` vectors, trained on a sample drawn over `chunks`."""
        import faiss

        plan = plan_index(
            n,
            self.dim,
            kind,
            storage=self.storage,
            memory_budget=self.memory_budget,
            exact_threshold=self.ivf_threshold,
            nlist=self.nlist,
            hnsw_m=self.hnsw_m,
        )
        self.plan, self.on_disk = plan.to_dict(), plan.on_disk
        index = faiss.index_factory(self.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            # k-means cost is linear in the training set: 64 points per list, at most 256k, are plenty.
            want = min(n, max(64 * max(plan.nlist, 1), 10_000), 262_144)
            t0 = time.perf_counter()
            index.train(_sample_rows(chunks, want, np.random.default_rng(0)))
            log.info("index: trained %s on %d vectors in %.1fs", plan.factory, want, time.perf_counter() - t0)
        log.info("index: %s (%s)", plan.factory, plan.reason)
        if isinstance(index, faiss.IndexHNSW):
            index.hnsw.efSearch = self.ef_search
        return index

    def tune(
        self, chunks: Sequence[np.ndarray], target_recall: float | None = None, queries: np.ndarray | None = None
    ) -> dict[str, Any]:
        """Re-tune the search breadth of this index over its vectors `chunks` (e.g. to another target recall,
        or on queries of the kind it will answer: see `_tune`).

        Returns the tuning record, which `save` writes to the manifest (`load` applies it).
        """
        if target_recall is not None:
            self.target_recall = target_recall
        self._tune(self._index, chunks, queries)
        return self.tuning

    def save_tuning(self, directory: str | Path) -> None:
        """Write only the search breadth to the manifest of the saved index in `directory` (after `tune` on a
        loaded index: rewriting a memory-mapped 10M index to change one number would copy gigabytes)."""
        root = Path(directory)
        with folder_lock(root, wait=True):  # a save in between would have its manifest overwritten
            manifest = read_manifest(root)
            if manifest["count"] != len(self):
                raise UserError(f"{root}: holds {manifest['count']} vectors, this index {len(self)}; save it instead")
            manifest.update(tuning=self.tuning, target_recall=self.target_recall)  # the file checksums stay valid
            atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=2) + "\n")

    def _tune(self, index: Any, chunks: Sequence[np.ndarray], queries: np.ndarray | None = None) -> None:
        """Tune nprobe / efSearch to `target_recall` (unless nprobe is fixed) on `queries`, else on held-out
        stored vectors. Text queries of an image index sit apart from every image (the modality gap): tuned on
        images, a demo index reached recall@10 0.95 on image queries but 0.79 on caption queries
        (bench/results/index.md), so `build_index` tunes on caption embeddings when it has them."""
        import faiss

        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and self.nprobe:
            set_nprobe(ivf, min(self.nprobe, ivf.nlist))
            self.tuning = {"param": "nprobe", "value": ivf.nprobe, "fixed": True}
            return
        if queries is not None and len(queries):
            queries = as_matrix(queries, self.dim)
            _, truth = exact_topk(queries, chunks, 10)
            self.tuning = tune_search(index, queries, truth, None, self.target_recall, k=10)
            self.tuning["on"] = f"{len(queries)} given queries"
            return
        n = sum(len(c) for c in chunks)
        rng = np.random.default_rng(1)
        ids = np.sort(rng.choice(n, min(TUNE_QUERIES, n), replace=False))
        queries = _rows(chunks, ids)
        _, truth = exact_topk(queries, chunks, 11)
        self.tuning = tune_search(index, queries, truth, ids, self.target_recall, k=10)
        self.tuning["on"] = f"{len(ids)} held-out stored vectors"

    @classmethod
    def from_chunks(
        cls,
        dim: int,
        chunks: Sequence[np.ndarray],
        metas: Sequence[dict[str, Any]],
        tune_queries: np.ndarray | None = None,
        **params: Any,
    ) -> EmbeddingIndex:
        """An index of all `chunks` (e.g. memory-mapped .npy files), planned for their total size at once.

        The structure comes from `plan_index` (size + memory budget); IVF is trained on a sample drawn over
        the chunks and filled one chunk at a time, so the vectors never need to fit in memory together.
        """
        index = cls(dim, **params)
        n = sum(len(c) for c in chunks)
        if n != len(metas):
            raise UserError(f"got {n} vectors but {len(metas)} metadata entries")
        kind = index.kind if index.kind != "auto" else ("flat" if n < index.ivf_threshold else "ivf")
        if kind == "ivf" and n < IVF_MIN_TRAIN:
            kind = "flat"
        faiss_index = index._new_exact() if kind == "flat" else index._trained(chunks, n, kind)
        for chunk in chunks:
            faiss_index.add(as_matrix(chunk, dim))
        if kind != "flat":
            index._tune(faiss_index, chunks, tune_queries)
        index._index, index._trained_at = faiss_index, (n if kind == "ivf" else 0)
        index.metas = [{**m, "id": i} for i, m in enumerate(metas)]
        return index

    def save(self, directory: str | Path) -> Path:
        """Write the index atomically to `directory` (a new generation, then the manifest); returns it.

        Waits for another save into the same folder to finish (see `folder_lock`)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        with folder_lock(out, wait=True):
            return self.save_locked(out)

    def save_locked(self, out: Path) -> Path:
        """`save` for a caller that holds `folder_lock(out)` (a build holds it from start to end)."""
        import faiss

        for stale in out.iterdir():  # a killed save's: no live writer can own them while we hold the lock
            if SAVE_TEMPORARY.fullmatch(stale.name):
                stale.unlink(missing_ok=True)
        previous = read_manifest(out) if (out / MANIFEST).is_file() else {}
        gen = int(previous.get("generation", 0)) + 1
        index_file, meta_file = f"index.{gen:06d}.faiss", f"meta.{gen:06d}.jsonl"
        if self._index is not None:
            tmp = out / f".{index_file}.tmp"
            try:
                faiss.write_index(self._index, str(tmp))  # straight to disk: no second copy in memory
                tmp.replace(out / index_file)
            finally:
                tmp.unlink(missing_ok=True)
        with atomic_open(out / meta_file, "w") as f:
            for meta in self.metas:
                f.write(json.dumps(meta, ensure_ascii=False) + "\n")
        written = [index_file, meta_file] if self._index is not None else [meta_file]
        manifest = {
            "format": FORMAT,
            "version": 1,
            "generation": gen,
            "index_file": index_file if self._index is not None else None,
            "meta_file": meta_file,
            "files": {
                name: {"size": (out / name).stat().st_size, "sha256": sha256_file(out / name)} for name in written
            },
            "count": len(self.metas),
            "dim": self.dim,
            "structure": self.structure,
            "metric": "inner_product",
            **{name: getattr(self, name) for name in PARAMS},
            "on_disk": self.on_disk,
            "plan": self.plan,
            "tuning": self.tuning,
            "trained_at": self._trained_at,
            "info": self.info,
            "saved": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        for old in out.iterdir():  # older generations are unreachable now
            if re.fullmatch(r"(index\.\d+\.faiss|meta\.\d+\.jsonl)", old.name) and old.name not in manifest.values():
                old.unlink(missing_ok=True)
        return out

    @classmethod
    def load(cls, directory: str | Path, mmap: bool | None = None, verify: bool | None = None) -> EmbeddingIndex:
        """Load an index written by `save`; `mmap` (default: as saved) maps the inverted lists from disk.

        Args:
            directory: the index folder.
            mmap: memory-map the inverted lists (default: as saved).
            verify: compare the files' SHA-256 with the manifest (default: when they total at most
                `HASH_ON_LOAD_MAX` bytes); their sizes are always compared.

        Raises:
            UserError: no index there, or its files disagree with the manifest.
        """

        root = Path(directory)
        for attempt in range(2):  # a concurrent save may delete the files of the manifest we just read
            manifest = read_manifest(root)
            try:
                problem = check_files(root, manifest, verify)
                if problem:
                    raise UserError(f"{root}: {problem}; rebuild it (`mmcl index verify` checks an index)")
                metas = MetaRows(root / manifest["meta_file"])
                raw_index = (
                    read_faiss(root / manifest["index_file"], manifest, mmap) if manifest["index_file"] else None
                )
                break
            except FileNotFoundError as e:
                if attempt:
                    raise UserError(f"{root}: index file missing ({e.filename})") from None
        index = cls(manifest["dim"], **{name: manifest.get(name, default) for name, default in PARAMS.items()})
        index.info = manifest.get("info", {})
        index.plan, index.tuning = manifest.get("plan", {}), manifest.get("tuning", {})
        index.on_disk = bool(manifest.get("on_disk", False))
        index._trained_at = manifest.get("trained_at", 0)
        index.metas = metas
        index._index = raw_index
        apply_tuning(raw_index, index.tuning)
        ntotal = index._index.ntotal if index._index is not None else 0
        if not (ntotal == len(index.metas) == manifest["count"]):
            raise UserError(
                f"{root}: the index holds {ntotal} vectors and {len(index.metas)} metadata rows, "
                f"the manifest says {manifest['count']}; rebuild it"
            )
        return index


@functools.cache
def _scan_pool(threads: int) -> ThreadPoolExecutor:
    """Threads that scan blocks of an exact index (kept: starting threads per query costs more than a scan)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="mmcl-scan")


def _sample_rows(chunks: Sequence[np.ndarray], want: int, rng: np.random.Generator) -> np.ndarray:
    """`want` rows drawn without replacement over consecutive `chunks`, in order, as one float32 matrix."""
    n = sum(len(c) for c in chunks)
    return _rows(chunks, np.sort(rng.choice(n, min(want, n), replace=False)))


def _rows(chunks: Sequence[np.ndarray], ids: np.ndarray) -> np.ndarray:
    """Rows `ids` (sorted, counted across the chunks) of consecutive `chunks`."""
    out, start = [], 0
    for chunk in chunks:
        mine = ids[(ids >= start) & (ids < start + len(chunk))] - start
        if len(mine):
            out.append(np.asarray(chunk[mine], dtype=np.float32))
        start += len(chunk)
    return np.ascontiguousarray(np.concatenate(out)) if out else np.zeros((0, chunks[0].shape[1]), np.float32)
