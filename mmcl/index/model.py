"""Which model built an index: a fingerprint of its weights, recorded at build and checked before a search.

Two models of the same embedding width make vectors of the same shape that mean different things; only the
weights tell them apart.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmcl.index.files import read_manifest
from mmcl.utils import UserError

if TYPE_CHECKING:
    from mmcl.index.store import EmbeddingIndex


def model_fingerprint(encoder: Any) -> str | None:
    """SHA-256 over an encoder's weights (its `model`'s state dict: names, shapes, values rounded to float16, so
    the same weights loaded in float32 or float16, on any device, agree); None without a torch `model`."""
    model = getattr(encoder, "model", None)
    if model is None or not hasattr(model, "state_dict"):
        return None
    import torch

    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu")
        t = t.to(torch.float16) if t.is_floating_point() else t
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def check_model(index: EmbeddingIndex | str | Path, encoder: Any, name: str | None = None) -> bool:
    """Whether `encoder` is the model that built `index` (compared by `model_fingerprint`, not only width).

    Args:
        index: a loaded index, or an index folder (only its manifest is read).
        encoder: an `mmcl.inference.Encoder` (anything with a torch `model`), or a run / checkpoint folder,
            which is loaded.
        name: what to call the encoder in the error (default: the folder given, else 'this model').

    Returns:
        True when the fingerprints match; False when it cannot be told (the index records no fingerprint,
        being older, or the encoder has no weights to hash).

    Raises:
        UserError: the index was built by another model, in one line naming both.
    """
    where = str(index) if isinstance(index, (str, Path)) else "the index"
    info = read_manifest(index).get("info", {}) if isinstance(index, (str, Path)) else index.info
    if isinstance(encoder, (str, Path)):
        from mmcl.inference import load_pipeline

        name, encoder = name or str(encoder), load_pipeline(encoder)
    want, got = info.get("model_fingerprint"), model_fingerprint(encoder)
    if not want or not got:
        return False
    if want != got:
        raise UserError(
            f"{where}: this index was built by another model ({info.get('model') or 'unnamed'}, weights "
            f"{want[:12]}) than {name or 'this model'} (weights {got[:12]}): its embeddings would not match the "
            f"queries; rebuild it with this model (`mmcl index build ... --overwrite`)"
        )
    return True
