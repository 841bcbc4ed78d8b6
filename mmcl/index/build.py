"""Filling an index folder from shards or folders of images: embedding in batches, resumable after a kill.

Embeddings are written in chunks under `OUT/.build/` (`emb.NNNNNN.npy` + `meta.NNNNNN.jsonl`, each written
atomically, then `state.json`, which counts the inputs they cover). A build killed at any point and started
again with the same sources, model and options skips the inputs already embedded (read, never decoded) and
goes on from the last chunk; the finished index is planned for the total size at once
(`EmbeddingIndex.from_chunks`, over the chunks memory-mapped), saved, and `.build/` removed.

A build holds the folder's lock throughout (a second build into it is refused in one line). A build that fails
on bad input (no readable images, vectors of another width: rerunning it would fail the same way) removes
`.build/` and the thumbnails it wrote, leaving the folder as it found it; a crash, a full disk or Ctrl-C keeps
`.build/` for the rerun to resume. The index records its model's fingerprint (`check_model`); appending with
another model is refused before any work.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from mmcl.data import decode
from mmcl.data.decode import MAX_PIXELS, SkipCounter, SkipSample
from mmcl.data.reader import file_sample, list_inputs, read_samples
from mmcl.index.files import MANIFEST, THUMBS, folder_lock
from mmcl.index.model import check_model, model_fingerprint
from mmcl.index.store import DEFAULT_IVF_THRESHOLD, IVF_MIN_TRAIN, TUNE_QUERIES, EmbeddingIndex, as_matrix
from mmcl.utils import UserError, atomic_open, atomic_write_text

if TYPE_CHECKING:
    from mmcl.inference import Encoder

log = logging.getLogger("mmcl")

WORK = ".build"
DEFAULT_CHUNK = 8192  # images per saved chunk: what a kill can cost, and one small file per chunk


def iter_samples(
    sources: Sequence[str], max_pixels: int = MAX_PIXELS, counter: SkipCounter | None = None
) -> Iterator[tuple[dict[str, Any], Image.Image]]:
    """(metadata, RGB image) for every image in `sources`; unreadable images and shards are skipped and counted.

    See `iter_inputs` for the arguments.
    """
    for meta, image in iter_inputs(sources, max_pixels, counter):
        if image is not None:
            yield meta, image


def iter_inputs(
    sources: Sequence[str], max_pixels: int = MAX_PIXELS, counter: SkipCounter | None = None, skip: int = 0
) -> Iterator[tuple[dict[str, Any], Image.Image | None]]:
    """(metadata, RGB image) for every input of `sources`, in order; (metadata, None) for one that was skipped.

    Args:
        sources: shard paths or brace patterns (`data/{000000..000009}.tar`), folders of shards, folders of
            images (captions from sidecar `.txt` files) or single image files (see `mmcl.data.reader.list_inputs`).
        max_pixels: images whose header declares more pixels are skipped without decoding.
        counter: receives the skips by reason (default: a fresh one that only logs).
        skip: inputs to pass over first without decoding (a resumed build); they are not yielded.
    """
    counter = counter or SkipCounter(log)
    position = 0
    for kind, where in list_inputs(sources):
        if kind == "file" and position < skip:
            position += 1
            continue
        raws = read_samples([where], counter) if kind == "shard" else [file_sample(where)]
        for raw in raws:
            position += 1
            if position <= skip:
                continue
            key, source = raw["__key__"], f"{where}#{raw['__key__']}" if kind == "shard" else where
            meta = {"key": key, "caption": _caption(raw), "source": source}
            try:
                yield meta, decode.decode_image(decode.image_bytes(raw), max_pixels)
            except SkipSample as e:
                counter.add(e.reason, source, e.detail)
                yield meta, None


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


class _Progress:
    """The chunks of an interrupted build in `OUT/.build/` and what they cover."""

    def __init__(self, work: Path, identity: dict[str, Any]) -> None:
        self.work, self.identity = work, identity
        self.inputs, self.images, self.chunks, self.skipped = 0, 0, [], {}

    @classmethod
    def open(cls, out: Path, identity: dict[str, Any], overwrite: bool) -> _Progress:
        work = out / WORK
        progress = cls(work, identity)
        state_file = work / "state.json"
        if state_file.is_file():
            state = json.loads(state_file.read_text())
            for stale in work.glob(".*.tmp"):  # a chunk write that was killed: never counted in state.json
                stale.unlink(missing_ok=True)
            if state.get("identity") == identity:
                progress.inputs, progress.images = state["inputs"], state["images"]
                progress.chunks, progress.skipped = state["chunks"], state["skipped"]
                log.info("index: resuming a build: %d inputs (%d images) done", progress.inputs, progress.images)
                return progress
            if not overwrite:
                raise UserError(
                    f"{work} holds an interrupted build of other sources, model or options: "
                    "rerun it as it was, or pass --overwrite to start again"
                )
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        return progress

    def commit(self, vectors: np.ndarray, metas: list[dict[str, Any]], inputs: int, skipped: dict[str, int]) -> None:
        """Save one chunk, then the state that counts it (the order makes a kill in between harmless)."""
        name = f"{len(self.chunks):06d}"
        with atomic_open(self.work / f"emb.{name}.npy", "wb") as f:
            np.save(f, vectors.astype(np.float32))
        with atomic_open(self.work / f"meta.{name}.jsonl", "w") as f:
            f.writelines(json.dumps(m, ensure_ascii=False) + "\n" for m in metas)
        self.chunks.append(name)
        self.inputs, self.images, self.skipped = inputs, self.images + len(metas), dict(skipped)
        state = {
            "identity": self.identity,
            "inputs": self.inputs,
            "images": self.images,
            "chunks": self.chunks,
            "skipped": self.skipped,
        }
        atomic_write_text(self.work / "state.json", json.dumps(state, indent=1))

    def load(self) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
        vectors = [np.load(self.work / f"emb.{c}.npy", mmap_mode="r") for c in self.chunks]
        metas = [json.loads(line) for c in self.chunks for line in (self.work / f"meta.{c}.jsonl").open()]
        return vectors, metas


def build_index(
    encoder: Encoder,
    sources: Sequence[str],
    out_dir: str | Path,
    *,
    batch_size: int = 32,
    kind: str = "auto",
    ivf_threshold: int = DEFAULT_IVF_THRESHOLD,
    storage: str = "auto",
    memory_budget: int = 0,
    target_recall: float = 0.95,
    thumb_size: int = 256,
    max_samples: int = 0,
    max_pixels: int = MAX_PIXELS,
    append: bool = False,
    overwrite: bool = False,
    info: dict[str, Any] | None = None,
    progress: bool = True,
    chunk_size: int = DEFAULT_CHUNK,
) -> EmbeddingIndex:
    """Embed every image of `sources` with `encoder` and save an index (with thumbnails) to `out_dir`.

    A killed build resumes where its last saved chunk ended when started again with the same arguments.

    Args:
        encoder: an `mmcl.inference.Encoder`, e.g. `mmcl.inference.load_pipeline(run)` or `OpenClipEncoder(name)`.
        sources: see `iter_samples`.
        out_dir: the index folder.
        batch_size: images per `encode_images` call.
        kind, ivf_threshold, storage, memory_budget, target_recall: see `EmbeddingIndex`.
        thumb_size: longest side of the stored thumbnails.
        max_samples: stop after this many images (0 = all).
        max_pixels: decompression-bomb limit per image.
        append: add to the index already in `out_dir`.
        overwrite: replace the index already in `out_dir` (and any interrupted build of other inputs).
        info: provenance saved in the manifest (e.g. the model's run folder).
        progress: show a tqdm bar.
        chunk_size: images per saved chunk (the most a kill can cost).
    """
    out = Path(out_dir)
    try:
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        with folder_lock(out, wait=False):
            had_index, had_thumbs = (out / MANIFEST).is_file(), (out / THUMBS).is_dir()
            try:
                return _build_locked(
                    encoder,
                    sources,
                    out,
                    dict(kind=kind, ivf_threshold=ivf_threshold, storage=storage, memory_budget=memory_budget),
                    target_recall=target_recall,
                    batch_size=batch_size,
                    thumb_size=thumb_size,
                    max_samples=max_samples,
                    max_pixels=max_pixels,
                    append=append,
                    overwrite=overwrite,
                    info=info,
                    progress=progress,
                    chunk_size=chunk_size,
                    discard=lambda: _discard_build(out, had_index, had_thumbs, created),
                )
            except (KeyboardInterrupt, Exception) as e:
                if (out / WORK / "state.json").is_file() and _disk_problem(e, out) is None:
                    log.warning("index: build interrupted; run the same command again to resume it")
                raise
    except (OSError, RuntimeError) as e:
        problem = _disk_problem(e, out)
        if problem is None:
            raise
        raise UserError(problem) from None


# write failures another try will not cure until the user acts: said in one line, the chunks kept for the resume
_DISK_ERRNOS = {errno.ENOSPC: "full", errno.EDQUOT: "full", errno.EROFS: "read-only"}


def _disk_problem(e: BaseException, out: Path) -> str | None:
    """The one-line message for a full or read-only disk under `out`, or None for any other error. faiss reports
    a failed write as a RuntimeError ("write error"): counted as full when less space is free than needed."""
    work = out / WORK
    needed = sum(p.stat().st_size for p in work.iterdir() if p.is_file()) if work.is_dir() else 0
    kind = _DISK_ERRNOS.get(getattr(e, "errno", None) or 0) if isinstance(e, OSError) else None
    if isinstance(e, RuntimeError) and "write error" in str(e):
        with contextlib.suppress(OSError):
            kind = "full" if shutil.disk_usage(out if out.exists() else out.parent).free < needed else None
    if kind is None:
        return None
    mount = out.resolve()
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    if kind == "read-only":
        return f"read-only file system at {mount}: cannot write the index in {out}"
    return (
        f"no space left on {mount} (needed ~{max(needed, 2**20) / 1e6:.0f} MB) while writing the index in {out}; "
        "free some space and run the same command again to resume"
    )


def _discard_build(out: Path, had_index: bool, had_thumbs: bool, created: bool) -> None:
    """Remove what a failed build wrote: `.build/`, the thumbnails past the saved index, folders it created."""
    shutil.rmtree(out / WORK, ignore_errors=True)
    keep = 0
    if (out / MANIFEST).is_file():
        try:
            keep = int(json.loads((out / MANIFEST).read_text())["count"])
        except (ValueError, KeyError, TypeError, OSError):
            return  # an unreadable manifest: leave the thumbnails to a build that can tell
    thumbs = out / THUMBS
    for thumb in thumbs.glob("*.jpg") if thumbs.is_dir() else ():
        if thumb.stem.isdigit() and int(thumb.stem) >= keep:
            thumb.unlink(missing_ok=True)
    if not had_thumbs and thumbs.is_dir() and not any(thumbs.iterdir()):
        thumbs.rmdir()
    if created and not had_index and not any(out.iterdir()):
        out.rmdir()


def _build_locked(
    encoder: Encoder,
    sources: Sequence[str],
    out: Path,
    params: dict[str, Any],
    *,
    target_recall: float,
    batch_size: int,
    thumb_size: int,
    max_samples: int,
    max_pixels: int,
    append: bool,
    overwrite: bool,
    info: dict[str, Any] | None,
    progress: bool,
    chunk_size: int,
    discard: Callable[[], None],
) -> EmbeddingIndex:
    """`build_index` inside the folder's lock; `discard` undoes the work once it has begun (on bad input)."""
    exists = (out / MANIFEST).is_file()
    if exists and not (append or overwrite) and not (out / WORK).is_dir():
        raise UserError(f"{out} already holds an index: pass --append to add to it or --overwrite to replace it")
    base = EmbeddingIndex.load(out, mmap=False) if exists and append else None
    fingerprint = model_fingerprint(encoder)
    if base is not None:
        check_model(base, encoder, (info or {}).get("model"))  # before any work: vectors of two models never mix
    params = {**params, "target_recall": target_recall}
    identity = {
        "sources": list(map(str, sources)),
        "model": (info or {}).get("model"),
        "model_fingerprint": fingerprint,
        "append_to": len(base) if base is not None else None,
        **params,
        "max_samples": max_samples,
        "max_pixels": max_pixels,
        "thumb_size": thumb_size,
    }
    state = _Progress.open(out, identity, overwrite)
    (out / THUMBS).mkdir(parents=True, exist_ok=True)
    try:
        index = _embed_and_save(
            encoder,
            sources,
            out,
            state,
            base,
            params,
            batch_size=batch_size,
            thumb_size=thumb_size,
            max_samples=max_samples,
            max_pixels=max_pixels,
            progress=progress,
            chunk_size=chunk_size,
        )
    except UserError:  # bad input (nothing readable, another width): a rerun would fail alike, keep nothing
        discard()
        raise
    index.info.update(base.info if base is not None else {})
    index.info.update(info or {}, skipped=index.info.get("skipped", {}))
    if fingerprint:
        index.info["model_fingerprint"] = fingerprint
    index.info["sources"] = list(dict.fromkeys([*index.info.get("sources", []), *map(str, sources)]))
    index.save_locked(out)
    shutil.rmtree(out / WORK, ignore_errors=True)
    for thumb in (out / THUMBS).glob("*.jpg"):  # left over from a replaced, larger index
        if thumb.stem.isdigit() and int(thumb.stem) >= len(index):
            thumb.unlink(missing_ok=True)
    log.info("index: %d images (%s, dim %d) saved to %s", len(index), index.structure, index.dim, out)
    return index


def _embed_and_save(
    encoder: Encoder,
    sources: Sequence[str],
    out: Path,
    state: _Progress,
    base: EmbeddingIndex | None,
    params: dict[str, Any],
    *,
    batch_size: int,
    thumb_size: int,
    max_samples: int,
    max_pixels: int,
    progress: bool,
    chunk_size: int,
) -> EmbeddingIndex:
    """Embed what `state` has not covered yet (committing chunks), then plan the index over every chunk."""
    from tqdm import tqdm

    first_id = len(base) if base is not None else 0
    skipped = SkipCounter(log)
    skipped.counts.update(state.skipped)
    samples = iter_inputs(sources, max_pixels, skipped, skip=state.inputs)
    inputs = state.inputs
    vectors, rows = [], []
    with tqdm(desc="embedding images", unit="img", initial=state.images, disable=not progress) as bar:
        while not max_samples or state.images + sum(map(len, vectors)) < max_samples:
            room = max_samples - state.images - sum(map(len, vectors)) if max_samples else batch_size
            batch = []
            for meta, image in samples:  # inputs are counted whether or not they decode, for the resume
                inputs += 1
                if image is not None:
                    batch.append((meta, image))
                    if len(batch) == min(batch_size, room):
                        break
            if batch:
                emb = as_matrix(encoder.encode_images([image for _, image in batch]), None)
                for i, (meta, image) in enumerate(batch, start=first_id + state.images + sum(map(len, vectors))):
                    rel = f"{THUMBS}/{i:08d}.jpg"
                    _write_thumb(image, out / rel, thumb_size)
                    rows.append({**meta, "image": rel})
                vectors.append(emb)
                bar.update(len(batch))
            done = len(batch) < min(batch_size, room)
            if rows and (done or len(rows) >= chunk_size):
                state.commit(np.concatenate(vectors), rows, inputs, skipped.counts)
                vectors, rows = [], []
            if done:
                break
    chunks, metas = state.load()
    if base is not None:
        chunks, metas = [base.vectors(), *chunks], [*base.metas, *metas]
    if not metas:
        counts = f" (skipped: {decode.describe_counts(skipped.counts)})" if skipped.counts else ""
        raise UserError(f"no readable images in {', '.join(map(str, sources))}{counts}")
    if skipped.counts:
        log.warning("index: skipped %s", decode.describe_counts(skipped.counts))
    base_params = {k: getattr(base, k) for k in ("nlist", "nprobe", "hnsw_m", "ef_search")} if base else {}
    queries = _caption_queries(encoder, metas)
    index = EmbeddingIndex.from_chunks(chunks[0].shape[1], chunks, metas, queries, **params, **base_params)
    index.info["skipped"] = dict(skipped.counts)
    return index


def _caption_queries(encoder: Encoder, metas: Sequence[dict[str, Any]]) -> np.ndarray | None:
    """Text embeddings of up to TUNE_QUERIES stored captions (first line each), drawn at random: an approximate
    index is tuned on the text queries it will answer (see `EmbeddingIndex._tune`). None without captions
    (too few to tune on) or without a text encoder."""
    if len(metas) < IVF_MIN_TRAIN or not hasattr(encoder, "encode_texts"):
        return None  # exact below this size: nothing to tune
    rng = np.random.default_rng(2)
    captions: list[str] = []
    for i in rng.permutation(len(metas))[: 4 * TUNE_QUERIES]:
        line = (metas[int(i)].get("caption") or "").split("\n")[0].strip()
        if line:
            captions.append(line)
        if len(captions) == TUNE_QUERIES:
            break
    if len(captions) < TUNE_QUERIES // 4:
        return None
    try:
        return as_matrix(encoder.encode_texts(captions), None)
    except NotImplementedError:  # an image-only encoder
        return None
