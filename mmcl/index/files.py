"""An index folder on disk: its manifest, the sizes and SHA-256 of its files, its lock, its thumbnails.

    manifest.json          written last: names the current index and metadata files (with the size and
                           SHA-256 of each), count, dim, structure, tuning, and `info` (the model's name and
                           weight fingerprint, the sources, the skip counts)
    index.<gen>.faiss      `faiss.serialize_index` bytes
    meta.<gen>.jsonl       one JSON object per vector, in id order: id, key, caption, image, source
    images/<id>.jpg        thumbnails: the only files the app serves
    .build/                an unfinished build's chunks (`mmcl.index.build`), removed when it finishes

Every load compares the files' sizes with the manifest, and their SHA-256 too when they are small enough to
read at once (`HASH_ON_LOAD_MAX`); `verify_index` (`mmcl index verify`) hashes an index of any size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmcl.utils import UserError

MANIFEST = "manifest.json"
THUMBS = "images"
FORMAT = "mmcl-index"
# Hash the index files at every load up to this total size (about a second); past it only sizes are compared at
# load (hashing a memory-mapped 10M index would read gigabytes before the first query) and `verify_index` hashes.
HASH_ON_LOAD_MAX = 256 * 2**20
# what a killed save leaves: `.index.N.faiss.tmp`, `.meta.N.jsonl.XXXX.tmp` (atomic_open), `.manifest.json.XXXX.tmp`
SAVE_TEMPORARY = re.compile(r"\.(index\.\d+\.faiss|meta\.\d+\.jsonl|manifest\.json)\..*tmp")


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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_files(root: Path, manifest: dict[str, Any], verify: bool | None) -> str | None:
    """What is wrong with the files `manifest` lists (sizes; SHA-256 when `verify`, or when None and the files
    are small), or None. Raises FileNotFoundError for a missing one (a concurrent save: the caller retries).
    Manifests written before checksums existed list no files: nothing to compare."""
    files = manifest.get("files") or {}
    try:
        wanted = {name: (int(f["size"]), str(f["sha256"])) for name, f in files.items()}
    except (KeyError, TypeError, ValueError):
        return "the manifest's file list is unreadable"
    for name, (size, _) in wanted.items():
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(2, "missing", str(path))
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, the manifest says {size}"
    if verify is None:
        verify = sum(size for size, _ in wanted.values()) <= HASH_ON_LOAD_MAX
    for name, (_, sha) in wanted.items() if verify else ():
        if sha256_file(root / name) != sha:
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def verify_index(directory: str | Path) -> str | None:
    """None if every file of the index in `directory` matches its size and SHA-256 in the manifest, else what
    is wrong, in a few words (any size: this reads every byte once)."""
    root = Path(directory)
    manifest = read_manifest(root)
    if not manifest.get("files"):
        return "the manifest lists no checksums (written by an older mmcl); rebuild the index to add them"
    try:
        return check_files(root, manifest, verify=True)
    except FileNotFoundError as e:
        return f"{Path(e.filename).name} is missing"


@contextlib.contextmanager
def folder_lock(folder: Path, wait: bool) -> Iterator[None]:
    """An exclusive lock on an index folder (flock on the folder itself: no lock file to leave behind).

    Saves wait for each other; a build (`wait=False`) refuses to start beside another one. Where flock does
    not exist (Windows) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise UserError(f"{folder}: another index build or save is writing this folder; wait for it") from None
        yield
    finally:
        os.close(fd)  # releases the lock


class MetaRows(Sequence):
    """The metadata rows of a saved index, each parsed from the memory-mapped JSONL file when it is read.

    A list of 10M small dicts takes gigabytes; this holds one end offset per row (8 bytes) and the file's
    pages, which the kernel can drop. Rows are immutable here: an index that grows copies them into a list.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        self._buf = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        self._ends = np.flatnonzero(self._buf == ord("\n"))  # `save` writes one row per line, no blank lines
        if size and self._buf[-1] != ord("\n"):
            raise UserError(f"{path}: metadata file ends in the middle of a row; rebuild the index")

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]  # negative indices and bounds, as a list
        start = int(self._ends[i - 1]) + 1 if i else 0
        return json.loads(self._buf[start : int(self._ends[i])].tobytes())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(other) == len(self) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]  # mutable-looking sequence semantics, like list


def thumbs_dir(index_dir: str | Path) -> Path:
    """The folder of thumbnails inside an index folder (what the app may serve)."""
    return Path(index_dir) / THUMBS


def read_faiss(path: Path, manifest: dict[str, Any], mmap: bool | None) -> Any:
    """The faiss index in `path`, its inverted lists memory-mapped when the index was saved `on_disk`."""
    import faiss

    if not path.is_file():
        raise FileNotFoundError(2, "missing", str(path))
    mapped = manifest.get("on_disk", False) if mmap is None else mmap
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP if mapped else 0)
    except RuntimeError as e:
        raise UserError(f"{path}: unreadable faiss index ({str(e).splitlines()[0]})") from None
