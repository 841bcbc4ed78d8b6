"""Shared fakes for the eval tests: images that carry their index in their pixels, table encoders, tiny tars."""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image


def index_image(i: int, size: int = 8) -> Image.Image:
    """A flat RGB image whose colour encodes `i` (< 65536); survives PNG / lossless WebP."""
    return Image.new("RGB", (size, size), (i % 256, (i // 256) % 256, 7))


def image_index(img: Image.Image) -> int:
    r, g, _ = img.convert("RGB").getpixel((0, 0))
    return r + 256 * g


def png_bytes(img: Image.Image, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"lossless": True} if fmt == "webp" else {}))
    return buf.getvalue()


class TableImageEncoder:
    """encode_images(list[PIL]) -> rows of a fixed feature table, picked by each image's encoded index."""

    def __init__(self, features: torch.Tensor) -> None:
        self.features = features
        self.calls = 0

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        self.calls += 1
        return self.features[[image_index(im) for im in images]]


def hash_vector(text: str, dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(text.encode()))
    return torch.randn(dim, generator=g)


class HashTextEncoder:
    """encode_texts(list[str]) -> a fixed random unit vector per string, or a table lookup when given."""

    def __init__(self, dim: int, table: dict[str, torch.Tensor] | None = None) -> None:
        self.dim, self.table, self.calls = dim, table or {}, 0

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls += 1
        rows = [self.table[t] if t in self.table else hash_vector(t, self.dim) for t in texts]
        return F.normalize(torch.stack(rows), dim=-1)


def write_tar(path: Path, members: dict[str, bytes | str]) -> Path:
    """A tar with the given member names and contents (in insertion order, as webdataset expects)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            raw = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def labelled_members(indices: list[int], labels: list, how: str = "json") -> dict[str, bytes | str]:
    """mmcl/img2dataset-style members: KEY.png + KEY.json {"label": ...} (or KEY.cls) + KEY.txt."""
    out: dict[str, bytes | str] = {}
    for i, y in zip(indices, labels):
        key = f"{i:09d}"
        out[f"{key}.png"] = png_bytes(index_image(i))
        if how == "json":
            out[f"{key}.json"] = json.dumps({"label": y, "url": f"http://x/{i}.jpg"})
        else:
            out[f"{key}.cls"] = str(y)
        out[f"{key}.txt"] = f"caption of image {i}"
    return out
