"""Helpers for the app and index tests: a deterministic fake pipeline, coloured images, tiny shards.

The fake pipeline embeds an image as its L2-normalised histogram over a small colour palette and a text as
a bag of its colour words (other words hash into extra dimensions), so the text "red" really retrieves red
images and zero-shot "red, green, blue" really classifies a red picture as red.
"""

from __future__ import annotations

import io
import socket
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmcl.data.synthetic import BACKGROUNDS
from mmcl.data.synthetic import COLOURS as SYNTHETIC_COLOURS

PALETTE = {**SYNTHETIC_COLOURS, "gray": BACKGROUNDS["gray"]}  # the generator's object colours + its gray
COLOURS = list(PALETTE)
HASH_DIMS = 7
DIM = len(COLOURS) + HASH_DIMS


class FakePipeline:
    """The `mmcl.inference.Encoder` protocol with colour-histogram embeddings (see module docstring)."""

    can_encode = True

    def __init__(self, can_caption: bool = True, logit_scale: float = 100.0, logit_bias: float | None = None) -> None:
        self.can_caption = can_caption
        self.scale_and_bias = (logit_scale, logit_bias)
        self.text_calls = 0
        self.last_gen: dict[str, Any] = {}
        self._palette = np.array(list(PALETTE.values()), dtype=np.float32)  # (C, 3)

    def _histogram(self, image: Image.Image) -> np.ndarray:
        pixels = np.asarray(image.convert("RGB").resize((16, 16)), dtype=np.float32).reshape(-1, 3)  # (256, 3)
        nearest = ((pixels[:, None, :] - self._palette[None]) ** 2).sum(-1).argmin(1)  # (256,)
        hist = np.bincount(nearest, minlength=len(COLOURS)).astype(np.float32)
        return np.concatenate([hist, np.zeros(HASH_DIMS, np.float32)])

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        x = torch.from_numpy(np.stack([self._histogram(im) for im in images]))  # (N, DIM)
        return torch.nn.functional.normalize(x, dim=-1)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        self.text_calls += 1
        out = torch.zeros(len(texts), DIM)
        for i, text in enumerate(texts):
            for word in text.lower().replace(",", " ").replace(".", " ").split():
                if word in PALETTE:
                    out[i, COLOURS.index(word)] += 1.0
                else:
                    out[i, len(COLOURS) + zlib.crc32(word.encode()) % HASH_DIMS] += 0.1
            if not out[i].any():
                out[i, -1] = 1.0
        return torch.nn.functional.normalize(out, dim=-1)

    def logit_scale_and_bias(self) -> tuple[float, float | None]:
        return self.scale_and_bias

    def caption(self, images: list[Image.Image], prefix: list[str] | None = None, **gen: Any) -> list[str]:
        self.last_gen = dict(gen)
        out = []
        for i, im in enumerate(images):
            hist = self._histogram(im)[: len(COLOURS)]
            hist[COLOURS.index("gray")] = 0  # backgrounds are gray
            words = ([prefix[i]] if prefix else ["a"]) + [COLOURS[int(hist.argmax())], "picture"]
            out.append(" ".join(words[: 1 + gen.get("max_new_tokens", 30)]))
        return out


def coloured(colour: str, size: int = 32, seed: int = 0) -> Image.Image:
    """A square of `colour` with a gray border and a little noise."""
    rng = np.random.default_rng(seed)
    arr = np.full((size, size, 3), PALETTE["gray"], dtype=np.float32)
    m = size // 8
    arr[m:-m, m:-m] = PALETTE[colour]
    arr += rng.normal(0, 6, arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels (decoding it would need gigabytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def write_shard(path: Path, items: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A webdataset tar: for each (key, {ext: bytes}) a member `key.ext`."""
    with tarfile.open(path, "w") as tar:
        for key, members in items:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
