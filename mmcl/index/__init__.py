"""A retrieval index of image embeddings: faiss search over vectors with thumbnails, built from shards or folders.

    mmcl.index.store    `EmbeddingIndex`: add, search, save (atomic generations), load
    mmcl.index.plan     which faiss structure fits the size and memory budget; search breadth tuned to a recall
    mmcl.index.files    the folder on disk: manifest, checksums, lock, thumbnails
    mmcl.index.model    which model built an index (`check_model`)
    mmcl.index.build    `build_index`: embedding images in chunks, resumable after a kill

Each module imports only those listed above it (build is the top); this package re-exports the public API.
"""

from mmcl.index.build import DEFAULT_CHUNK, build_index, iter_inputs, iter_samples
from mmcl.index.files import MANIFEST, THUMBS, folder_lock, read_manifest, thumbs_dir, verify_index
from mmcl.index.model import check_model, model_fingerprint
from mmcl.index.store import (
    DEFAULT_IVF_THRESHOLD,
    KINDS,
    TUNE_QUERIES,
    EmbeddingIndex,
    EmptyIndexError,
    MetaRows,
)

__all__ = [
    "DEFAULT_CHUNK",
    "DEFAULT_IVF_THRESHOLD",
    "KINDS",
    "MANIFEST",
    "THUMBS",
    "TUNE_QUERIES",
    "EmbeddingIndex",
    "EmptyIndexError",
    "MetaRows",
    "build_index",
    "check_model",
    "folder_lock",
    "iter_inputs",
    "iter_samples",
    "model_fingerprint",
    "read_manifest",
    "thumbs_dir",
    "verify_index",
]
