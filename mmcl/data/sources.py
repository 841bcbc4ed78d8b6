"""Inputs for the shard writer: image folders, tables, the synthetic generator, the real sets.

A source is an iterable of `RawSample` with a known length, optional `classnames`
and a `describe()` dict (stored beside the shards so a resumed run can tell that
it is writing the same data). A `RawSample` is cheap to make: files are read and
synthetic images rendered later, inside the writer's worker processes, which also
lets a resumed run skip finished shards without touching their inputs.
"""

from __future__ import annotations

import functools
import io
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from mmcl.utils import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class InputError(Exception):
    """An input that cannot be written: `status` is its img2dataset stats field
    ("failed_to_download" / "failed_to_resize"), `reason` its `status_dict` key, `detail` the message."""

    def __init__(self, status: str, reason: str, detail: str):
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail

    def __reduce__(self):  # travels back from the writer's worker processes
        return InputError, (self.status, self.reason, self.detail)


@dataclass
class RawSample:
    """One input before encoding. The image comes from `image`, `path` or `data`, or the whole
    sample from `loader`, a picklable zero-argument callable run in a worker process.

    Attributes:
        source: where the sample came from (file path, "synthetic/train/0/17"): the json `url`.
        caption: the text that goes into `KEY.txt`.
        meta: extra json fields (`label`, `classname`, `attributes`, ...).
        counterfactual: the sample's counterfactual (image + caption, `meta` its `KEY.cf.json`), written
            beside it as `KEY.cf.<ext>` / `KEY.cf.txt` / `KEY.cf.json` (README, "Counterfactual images").
    """

    source: str
    caption: str = ""
    image: Image.Image | None = None
    path: str | None = None
    data: bytes | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    loader: Callable[[], RawSample] | None = None
    counterfactual: RawSample | None = None

    def resolve(self) -> RawSample:
        """The sample with its content present (runs `loader` if there is one)."""
        return self.loader() if self.loader is not None else self

    def load_image(self, max_pixels: int = 100_000_000) -> Image.Image:
        """The image as RGB (EXIF orientation applied); raises InputError when it cannot be had.

        Files whose header declares more than `max_pixels` pixels are refused before decoding.
        """
        if self.image is not None:
            return _to_rgb(self.image)
        if self.data is None and self.path is None:
            raise InputError("failed_to_download", "no image", "the sample has no image, path or data")
        try:
            fp = io.BytesIO(self.data) if self.data is not None else open(self.path, "rb")  # noqa: SIM115
        except OSError as e:
            raise InputError("failed_to_download", "file not readable", f"{type(e).__name__}: {e.strerror}") from e
        try:
            with fp, warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked against max_pixels below
                image = Image.open(fp)
                if image.width * image.height > max_pixels:
                    detail = f"{image.width}x{image.height} > {max_pixels} pixels"
                    raise InputError("failed_to_resize", "image too large", detail)
                image.load()
                return _to_rgb(ImageOps.exif_transpose(image))
        except InputError:
            raise
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            raise InputError("failed_to_resize", "cannot decode image", f"{type(e).__name__}: {e}") from e


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":  # 16-bit / int / float greyscale: PIL would clip at 255
        import numpy as np

        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":  # no fixed range: stretch what is there
            low, high = float(values.min()), float(values.max())
            values = (values - low) / max(high - low, 1e-12) * 255
        else:
            values = values / 257  # 0..65535 -> 0..255
        return Image.fromarray(np.clip(values, 0, 255).round().astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))  # transparent parts become white, as browsers show them
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


@dataclass(frozen=True)
class FailedInput:
    """A sample's loader that fails with a known reason (picklable: it runs in the writer's workers)."""

    status: str
    reason: str
    detail: str

    def __call__(self) -> RawSample:
        raise InputError(self.status, self.reason, self.detail)


def _unreadable(path: Path) -> tuple[str, str] | None:
    """(reason, detail) when `path`, named like an image, is not a readable file; None when it is one."""
    if path.is_symlink() and not path.exists():
        return "dangling symlink", f"{path} -> {os.readlink(path)} (missing)"
    if path.is_dir():
        return "not a file", f"{path} is a folder"
    if not path.is_file():
        return "not a file", f"{path} is not a regular file"
    return None


class FolderSource:
    """Images under `root` (recursive, sorted) with sidecar captions: `a/b.jpg` + `a/b.txt`.

    Args:
        root: the folder.
        class_from_parent: label each image by the folder under `root` that holds it, as
            torchvision's ImageFolder does (classnames sorted, underscores shown as spaces):
            `root/red_circle/001.jpg` and `root/red_circle/more/002.jpg` -> "red circle".
        caption_ext: extension of the caption sidecar files.
        missing_caption: "error" (UserError naming the first image without one) or "empty".
    """

    def __init__(
        self,
        root: str | Path,
        class_from_parent: bool = False,
        caption_ext: str = "txt",
        missing_caption: str = "error",
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"image folder '{self.root}' does not exist or is not a folder")
        if missing_caption not in ("error", "empty"):
            raise ValueError("missing_caption must be 'error' or 'empty'")
        self.caption_ext = caption_ext.lstrip(".")
        # Everything named like an image, dangling symlinks and folders called x.jpg included: those are
        # counted as failed inputs by the writer (see `_unreadable`), never dropped without a trace.
        self.files = sorted(
            (p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS),
            key=lambda p: p.relative_to(self.root).as_posix(),
        )
        if not self.files:
            raise UserError(f"image folder '{self.root}' holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.missing_caption = missing_caption
        if missing_caption == "error":
            for p in self.files:
                if p.is_file() and not p.with_suffix("." + self.caption_ext).is_file():
                    raise UserError(f"{p}: no caption file {p.with_suffix('.' + self.caption_ext).name} beside it")
        self.classnames: list[str] | None = None
        self._folders: dict[str, int] = {}
        if class_from_parent:
            for p in self.files:
                if p.parent == self.root:
                    raise UserError(f"{p}: not in a class folder (class_from_parent needs root/CLASS/image files)")
            folders = sorted({self._class_folder(p) for p in self.files})
            self._folders = {f: i for i, f in enumerate(folders)}
            self.classnames = [f.replace("_", " ") for f in folders]

    def _class_folder(self, path: Path) -> str:
        return path.relative_to(self.root).parts[0]

    def __len__(self) -> int:
        return len(self.files)

    def describe(self) -> dict[str, Any]:
        return {"type": "folder", "root": str(self.root.resolve()), "n": len(self.files), "classes": self.classnames}

    def __iter__(self) -> Iterator[RawSample]:
        for p in self.files:
            problem = _unreadable(p)
            sidecar = p.with_suffix("." + self.caption_ext)
            try:
                caption = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else ""
            except UnicodeDecodeError as e:
                caption = ""
                problem = problem or ("caption not UTF-8", f"{sidecar.name}: byte {e.start} is not UTF-8")
            except OSError as e:
                caption = ""
                problem = problem or ("caption not readable", f"{sidecar.name}: {type(e).__name__}: {e.strerror}")
            if problem is not None:
                yield RawSample(str(p), loader=FailedInput("failed_to_download", *problem))
                continue
            meta: dict[str, Any] = {}
            if self._folders:
                label = self._folders[self._class_folder(p)]
                meta = {"label": label, "classname": self.classnames[label]}
            yield RawSample(str(p), caption, path=str(p), meta=meta)


class TableSource:
    """A CSV, TSV or Parquet table with an image-path column and a caption column.

    Relative paths are taken from the table's folder. A `label_col` of integers is used
    as is; one of strings becomes class indices into the sorted distinct values (which
    are then the classnames). `extra_cols` are copied into each sample's json.
    """

    def __init__(
        self,
        path: str | Path,
        image_col: str = "path",
        caption_col: str = "caption",
        label_col: str | None = None,
        extra_cols: list[str] | tuple[str, ...] = (),
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"table '{self.path}' not found")
        table = _read_table(self.path)
        for role, col in [("image", image_col), ("caption", caption_col), ("label", label_col)] + [
            ("extra", c) for c in extra_cols
        ]:
            if col is not None and col not in table.columns:
                have = ", ".join(map(str, table.columns))
                raise UserError(f"{self.path}: no {role} column '{col}' (columns: {have})")
        if len(table) == 0:
            raise UserError(f"{self.path}: the table has no rows")
        urls = table[image_col].astype(str).str.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
        if urls.any():
            row = int(urls.to_numpy().nonzero()[0][0])
            raise UserError(
                f"{self.path}: row {row} of '{image_col}' is a URL; download with img2dataset, or list local files"
            )
        self.image_col, self.caption_col, self.label_col = image_col, caption_col, label_col
        self.extra_cols = list(extra_cols)
        self.rows = table[[image_col, caption_col, *([label_col] if label_col else []), *self.extra_cols]]
        self.classnames: list[str] | None = None
        self._label_index: dict[Any, int] | None = None
        if label_col is not None:
            import pandas as pd

            values = self.rows[label_col]
            if values.isna().any():
                row = int(values.isna().to_numpy().nonzero()[0][0])
                raise UserError(f"{self.path}: row {row} has no value in label column '{label_col}'")
            if pd.api.types.is_float_dtype(values) and not (values % 1 == 0).all():
                raise UserError(f"{self.path}: label column '{label_col}' holds non-integer numbers")
            if values.map(lambda v: isinstance(v, str)).all():
                self.classnames = sorted(set(values))
                self._label_index = {c: i for i, c in enumerate(self.classnames)}
            elif not pd.api.types.is_numeric_dtype(values):
                raise UserError(f"{self.path}: label column '{label_col}' holds neither integers nor class names")

    def __len__(self) -> int:
        return len(self.rows)

    def describe(self) -> dict[str, Any]:
        cols = [self.image_col, self.caption_col, self.label_col, *self.extra_cols]
        return {"type": "table", "path": str(self.path.resolve()), "n": len(self.rows), "columns": cols}

    def __iter__(self) -> Iterator[RawSample]:
        base = self.path.parent
        for record in self.rows.itertuples(index=False, name=None):
            image, caption, rest = record[0], record[1], list(record[2:])
            image = "" if _missing(image) else str(image)
            full = image if os.path.isabs(image) else str(base / image)
            meta: dict[str, Any] = {}
            if self.label_col is not None:
                value = rest.pop(0)
                meta["label"] = self._label_index[value] if self._label_index else int(value)
                if self.classnames:
                    meta["classname"] = self.classnames[meta["label"]]
            for col, value in zip(self.extra_cols, rest):
                meta[col] = None if _missing(value) else (value.item() if hasattr(value, "item") else value)
            yield RawSample(full, "" if _missing(caption) else str(caption), path=full, meta=meta)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _read_table(path: Path):
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix in (".csv", ".tsv", ".txt"):
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", keep_default_na=False, na_values=[""])
    except Exception as e:  # a malformed table: name the file, keep the reason
        raise UserError(
            f"{path}: cannot read table ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    raise UserError(f"{path}: unknown table format '{suffix}' (use .csv, .tsv or .parquet)")


def _synthetic_sample(index: int, seed: int, split: str, image_size: int, counterfactuals: bool = False) -> RawSample:
    from mmcl.data.synthetic import generate

    s = generate(index, seed=seed, image_size=image_size, split=split)
    meta = {
        "label": s.label,
        "classname": s.classname,
        "attributes": s.attributes,
        "distractor": s.distractor,
        "distractor_position": s.distractor_position,
        **s.meta,
    }
    cf = _synthetic_counterfactual(index, seed, split, image_size) if counterfactuals else None
    return RawSample(f"synthetic/{split}/{seed}/{index}", s.caption, image=s.image, meta=meta, counterfactual=cf)


def _synthetic_counterfactual(index: int, seed: int, split: str, image_size: int) -> RawSample | None:
    """The sample re-rendered with one edit applicable to it (`mmcl.data.counterfactual.EDITS`), chosen by a
    seeded shuffle of the edits (the first that applies); None when none applies."""
    import random

    from mmcl.data.counterfactual import EDITS, counterfactual

    edits = list(EDITS)
    random.Random(f"mmcl-counterfactual-choice/{split}/{seed}/{index}").shuffle(edits)
    for edit in edits:
        cf = counterfactual(index, edit, seed=seed, image_size=image_size, split=split)
        if cf is not None:
            return RawSample(
                f"synthetic/{split}/{seed}/{index}/{edit}", cf.caption, image=cf.image, meta={"edit": edit}
            )
    return None


class SyntheticSource:
    """`n` samples of the built-in generator (`mmcl.data.synthetic`), rendered in the workers."""

    def __init__(
        self,
        n: int,
        split: str = "train",
        seed: int = 0,
        image_size: int = 64,
        start: int = 0,
        counterfactuals: bool = False,
    ):
        from mmcl.data.synthetic import CLASSNAMES, SPLITS

        if n < 0 or start < 0 or image_size < 8:
            raise UserError(
                f"synthetic source: need n >= 0, start >= 0, image_size >= 8 (got {n}, {start}, {image_size})"
            )
        if split not in SPLITS:
            raise UserError(f"synthetic source: unknown split '{split}' (choose from {', '.join(SPLITS)})")
        self.n, self.split, self.seed, self.image_size, self.start = n, split, seed, image_size, start
        self.counterfactuals = counterfactuals  # each sample also gets one edited scene (`_synthetic_counterfactual`)
        self.classnames = list(CLASSNAMES)

    def __len__(self) -> int:
        return self.n

    def describe(self) -> dict[str, Any]:
        return {
            "type": "synthetic",
            "n": self.n,
            "split": self.split,
            "seed": self.seed,
            "image_size": self.image_size,
            "start": self.start,
            **({"counterfactuals": True} if self.counterfactuals else {}),  # older runs' stats stay comparable
        }

    def __iter__(self) -> Iterator[RawSample]:
        for i in range(self.start, self.start + self.n):
            loader = functools.partial(
                _synthetic_sample, i, self.seed, self.split, self.image_size, self.counterfactuals
            )
            yield RawSample(f"synthetic/{self.split}/{self.seed}/{i}", loader=loader)


class RealSource:
    """One of the bundled real sets: "digits" (scikit-learn) or "photos" (skimage.data)."""

    def __init__(self, name: str, split: str = "all", image_size: int = 32):
        from mmcl.data import real

        if name not in ("digits", "photos"):
            raise UserError(f"unknown real image set '{name}' (choose digits or photos)")
        self.name, self.split, self.image_size = name, split, image_size
        self.classnames = real.DIGIT_CLASSNAMES if name == "digits" else real.PHOTO_CLASSNAMES
        self._samples = list(real.digits(split, image_size) if name == "digits" else real.photos())

    def __len__(self) -> int:
        return len(self._samples)

    def describe(self) -> dict[str, Any]:
        return {"type": "real", "name": self.name, "split": self.split, "image_size": self.image_size, "n": len(self)}

    def __iter__(self) -> Iterator[RawSample]:
        for s in self._samples:
            yield RawSample(s.key, s.caption, image=s.image, meta=dict(s.meta))
