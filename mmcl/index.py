"""A faiss retrieval index over image embeddings, plus the builder that fills it from shards or a folder.

An index folder holds:

    manifest.json          written last: names the current index and metadata files, count, dim, kind
    index.<gen>.faiss      `faiss.serialize_index` bytes
    meta.<gen>.jsonl       one JSON object per vector, in id order: id, key, caption, image, source
    images/<id>.jpg        thumbnails: the only files the app serves

Each save writes a new generation of files under temporary names, renames them, and then replaces the
manifest, so a crash leaves the previous index intact and readers never see half of a new one.

Vectors are compared by inner product (cosine for the L2-normalised embeddings of `mmcl.inference`).
Structure: an exact `IndexFlatIP` for small collections; past `ivf_threshold` vectors an `IndexIVFFlat`
(k-means coarse quantizer, `nprobe` lists searched), re-trained whenever the collection has grown 4x since
the last training; or `IndexHNSWFlat` on request.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from mmcl.data import decode
from mmcl.data.decode import MAX_PIXELS, SkipCounter, SkipSample
from mmcl.data.reader import file_sample, list_inputs, read_samples
from mmcl.utils import UserError, atomic_open, atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from mmcl.inference import Encoder

log = logging.getLogger("mmcl")

KINDS = ("auto", "flat", "ivf", "hnsw")
# Exact search of 100k x 512 takes ~45 ms per query on 2 busy cores; past that IVF (nprobe = nlist/4) is
# 4-8x faster at recall@10 >= 0.96 on embedding-like vectors (bench/results/app.md).
DEFAULT_IVF_THRESHOLD = 100_000
IVF_MIN_TRAIN = 1_000  # kind='ivf' stays exact below this many vectors (k-means needs data)
IVF_RETRAIN_GROWTH = 4  # re-train the coarse quantizer when the collection has grown this much
MANIFEST = "manifest.json"
THUMBS = "images"
FORMAT = "mmcl-index"
PARAMS = ("kind", "ivf_threshold", "nlist", "nprobe", "hnsw_m", "ef_search")  # saved in the manifest


class EmptyIndexError(UserError):
    """A search on an index that holds no vectors."""


def _as_matrix(vectors: Any, dim: int | None) -> np.ndarray:
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
        nprobe: IVF lists searched per query; 0 = nlist / 4 (at least 16); see bench/results/app.md.
        hnsw_m: HNSW graph degree.
        ef_search: HNSW search breadth.
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
    ) -> None:
        if kind not in KINDS:
            raise UserError(f"unknown index kind '{kind}'; choose one of {', '.join(KINDS)}")
        if dim < 1:
            raise UserError(f"index dimension must be >= 1, got {dim}")
        self.dim, self.kind, self.ivf_threshold = dim, kind, ivf_threshold
        self.nlist, self.nprobe, self.hnsw_m, self.ef_search = nlist, nprobe, hnsw_m, ef_search
        self.metas: list[dict[str, Any]] = []
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
        x = _as_matrix(vectors, self.dim)
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
        q = _as_matrix(queries, self.dim)
        k = max(1, min(int(k), len(self.metas)))
        scores, ids = self._index.search(q, k)
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        return scores, [[self.metas[i] if i >= 0 else None for i in row] for row in ids]

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

        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = self.ef_search
            return index
        return faiss.IndexFlatIP(self.dim)

    def _needs_training(self, n: int) -> bool:
        """Whether a collection of `n` vectors should get a (re-)trained IVF structure."""
        threshold = {"auto": self.ivf_threshold, "ivf": IVF_MIN_TRAIN}.get(self.kind)
        if threshold is None or n < threshold:
            return False
        return not self._trained_at or n >= IVF_RETRAIN_GROWTH * self._trained_at

    def _train_ivf(self, x: np.ndarray) -> Any:
        """A new IVF index trained on (a sample of) `x` and holding all of it."""
        import faiss

        n = len(x)
        nlist = self.nlist or max(1, min(int(round(math.sqrt(n))), n // 39))
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        # k-means cost is linear in the training set; 64 points per centroid is plenty for the centroids.
        sample = x if n <= 64 * nlist else x[np.random.default_rng(0).choice(n, 64 * nlist, replace=False)]
        t0 = time.perf_counter()
        index.train(sample)
        index.add(x)
        index.nprobe = min(nlist, self.nprobe or max(16, nlist // 4))
        log.info(
            "index: trained IVF with %d lists on %d vectors in %.1fs", nlist, len(sample), time.perf_counter() - t0
        )
        return index

    def save(self, directory: str | Path) -> Path:
        """Write the index atomically to `directory` (a new generation, then the manifest); returns it."""
        import faiss

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        previous = read_manifest(out) if (out / MANIFEST).is_file() else {}
        gen = int(previous.get("generation", 0)) + 1
        index_file, meta_file = f"index.{gen:06d}.faiss", f"meta.{gen:06d}.jsonl"
        if self._index is not None:
            atomic_write_bytes(out / index_file, faiss.serialize_index(self._index).tobytes())
        with atomic_open(out / meta_file, "w") as f:
            for meta in self.metas:
                f.write(json.dumps(meta, ensure_ascii=False) + "\n")
        manifest = {
            "format": FORMAT,
            "version": 1,
            "generation": gen,
            "index_file": index_file if self._index is not None else None,
            "meta_file": meta_file,
            "count": len(self.metas),
            "dim": self.dim,
            "structure": self.structure,
            "metric": "inner_product",
            **{name: getattr(self, name) for name in PARAMS},
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
    def load(cls, directory: str | Path) -> EmbeddingIndex:
        """Load an index written by `save`.

        Raises:
            UserError: no index there, or its files disagree with the manifest.
        """
        import faiss

        root = Path(directory)
        for attempt in range(2):  # a concurrent save may delete the files of the manifest we just read
            manifest = read_manifest(root)
            try:
                raw_index = (root / manifest["index_file"]).read_bytes() if manifest["index_file"] else None
                lines = (root / manifest["meta_file"]).read_text().splitlines()
                break
            except FileNotFoundError as e:
                if attempt:
                    raise UserError(f"{root}: index file missing ({e.filename})") from None
        index = cls(manifest["dim"], **{name: manifest[name] for name in PARAMS})
        index.info = manifest.get("info", {})
        index._trained_at = manifest.get("trained_at", 0)
        index.metas = [json.loads(line) for line in lines if line.strip()]
        if raw_index is not None:
            try:
                index._index = faiss.deserialize_index(np.frombuffer(raw_index, dtype=np.uint8))
            except RuntimeError as e:
                raise UserError(f"{root / manifest['index_file']}: unreadable faiss index ({e})") from None
        ntotal = index._index.ntotal if index._index is not None else 0
        if not (ntotal == len(index.metas) == manifest["count"]):
            raise UserError(
                f"{root}: the index holds {ntotal} vectors and {len(index.metas)} metadata rows, "
                f"the manifest says {manifest['count']}; rebuild it"
            )
        return index


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest of index folder `root`; a clear error if there is no index."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise UserError(f"{root}: no index here (missing {MANIFEST}); build one with `mmcl index build`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not an mmcl index manifest")
    return manifest


def thumbs_dir(index_dir: str | Path) -> Path:
    """The folder of thumbnails inside an index folder (what the app may serve)."""
    return Path(index_dir) / THUMBS


def iter_samples(
    sources: Sequence[str], max_pixels: int = MAX_PIXELS, counter: SkipCounter | None = None
) -> Iterator[tuple[dict[str, Any], Image.Image]]:
    """(metadata, RGB image) for every image in `sources`; unreadable images and shards are skipped and counted.

    Args:
        sources: shard paths or brace patterns (`data/{000000..000009}.tar`), folders of shards, folders of
            images (captions from sidecar `.txt` files) or single image files (see `mmcl.data.reader.list_inputs`).
        max_pixels: images whose header declares more pixels are skipped without decoding.
        counter: receives the skips by reason (default: a fresh one that only logs).
    """
    counter = counter or SkipCounter(log)
    for kind, where in list_inputs(sources):
        raws = read_samples([where], counter) if kind == "shard" else [file_sample(where)]
        for raw in raws:
            key, source = raw["__key__"], f"{where}#{raw['__key__']}" if kind == "shard" else where
            try:
                image = decode.decode_image(decode.image_bytes(raw), max_pixels)
            except SkipSample as e:
                counter.add(e.reason, source, e.detail)
                continue
            yield {"key": key, "caption": _caption(raw), "source": source}, image


def _caption(raw: dict[str, Any]) -> str:
    """The caption lines of `.txt` (the data layer's rule), else the `.json` 'caption' field; '' if none."""
    for key in ("txt", "caption"):
        try:
            meta = decode.decode_json(raw) if key != "txt" else {}
            return "\n".join(decode.caption_options(raw, meta, key, errors="replace"))
        except SkipSample:
            continue
    return ""


def _write_thumb(image: Image.Image, path: Path, size: int) -> None:
    thumb = image.copy()
    thumb.thumbnail((size, size))
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=88)
    # A plain write: thumbnails are re-creatable and only become reachable through the (atomic) manifest.
    path.write_bytes(buf.getvalue())


def build_index(
    encoder: Encoder,
    sources: Sequence[str],
    out_dir: str | Path,
    *,
    batch_size: int = 32,
    kind: str = "auto",
    ivf_threshold: int = DEFAULT_IVF_THRESHOLD,
    thumb_size: int = 256,
    max_samples: int = 0,
    max_pixels: int = MAX_PIXELS,
    append: bool = False,
    overwrite: bool = False,
    info: dict[str, Any] | None = None,
    progress: bool = True,
) -> EmbeddingIndex:
    """Embed every image of `sources` with `encoder` and save an index (with thumbnails) to `out_dir`.

    Args:
        encoder: an `mmcl.inference.Encoder`, e.g. `mmcl.inference.load_pipeline(run)` or `OpenClipEncoder(name)`.
        sources: see `iter_samples`.
        out_dir: the index folder.
        batch_size: images per `encode_images` call.
        kind, ivf_threshold: see `EmbeddingIndex`.
        thumb_size: longest side of the stored thumbnails.
        max_samples: stop after this many images (0 = all).
        max_pixels: decompression-bomb limit per image.
        append: add to the index already in `out_dir`.
        overwrite: replace the index already in `out_dir`.
        info: provenance saved in the manifest (e.g. the model's run folder).
        progress: show a tqdm bar.
    """
    import itertools

    from tqdm import tqdm

    out = Path(out_dir)
    exists = (out / MANIFEST).is_file()
    if exists and not (append or overwrite):
        raise UserError(f"{out} already holds an index: pass --append to add to it or --overwrite to replace it")
    index = EmbeddingIndex.load(out) if exists and append else None
    (out / THUMBS).mkdir(parents=True, exist_ok=True)
    skipped = SkipCounter(log)
    samples: Iterator = iter_samples(sources, max_pixels, skipped)
    if max_samples:
        samples = itertools.islice(samples, max_samples)
    with tqdm(desc="embedding images", unit="img", disable=not progress) as bar:
        while batch := list(itertools.islice(samples, batch_size)):
            vectors = _as_matrix(encoder.encode_images([image for _, image in batch]), None)
            if index is None:
                index = EmbeddingIndex(vectors.shape[1], kind, ivf_threshold)
            rows = []
            for i, (meta, image) in enumerate(batch, start=len(index)):
                rel = f"{THUMBS}/{i:08d}.jpg"
                _write_thumb(image, out / rel, thumb_size)
                rows.append({**meta, "image": rel})
            index.add(vectors, rows)
            bar.update(len(batch))
    if index is None:
        counts = f" (skipped: {decode.describe_counts(skipped.counts)})" if skipped.counts else ""
        raise UserError(f"no readable images in {', '.join(map(str, sources))}{counts}")
    if skipped.counts:
        log.warning("index: skipped %s", decode.describe_counts(skipped.counts))
    index.info.update(info or {}, skipped=dict(skipped.counts))
    index.info["sources"] = list(dict.fromkeys([*index.info.get("sources", []), *map(str, sources)]))
    index.save(out)
    for thumb in (out / THUMBS).glob("*.jpg"):  # left over from a replaced, larger index
        if thumb.stem.isdigit() and int(thumb.stem) >= len(index):
            thumb.unlink(missing_ok=True)
    log.info("index: %d images (%s, dim %d) saved to %s", len(index), index.structure, index.dim, out)
    return index
