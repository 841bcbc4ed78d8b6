"""Evaluation dataset readers: labelled or captioned shards, image-folder trees, CLIP_benchmark's layout.

Every reader yields `EvalSample(key, image, label, captions)` with a decoded RGB PIL image. Three sources:

- **shards** (mmcl / img2dataset layout, `KEY.jpg KEY.txt KEY.json` in tars): the label is a `.cls`
  file (an integer) or `json[label_key]` (an integer index, or a class name looked up in the class
  names); captions are the lines of `.txt`. Class names come from the caller or from a
  `classnames.txt` beside the shards (or one folder up).
- **image folder**: `ROOT/<class>/<image>`; classes are the sorted folder names with `_` -> space.
- **CLIP_benchmark webdataset** (`clip_benchmark_export_wds`): `ROOT/classnames.txt`,
  `ROOT/zeroshot_classification_templates.txt`, `ROOT/dataset_type.txt`, `ROOT/<split>/nshards.txt`,
  `ROOT/<split>/{0..n-1}.tar` holding `.webp/.png/.jpg` + `.cls` or multi-line `.txt` captions.

Shards are listed and read, images decoded and captions split by the training data layer (`mmcl.data.reader`,
`mmcl.data.decode`): only image, `.txt`, `.json` and `.cls` members are read (webdataset's default decoders
would unpickle `.pyd` and `torch.load` `.pth`); images whose header declares more than `max_pixels` pixels
are skipped before decoding, as are undecodable ones and unreadable (0-byte, truncated) tars: counted by
reason in `ShardDataset.skipped` (and reported by `mmcl.eval.runner`) and logged. Unlike training, a label
that cannot be read or is out of range is a `UserError`: it means the data and the class names disagree.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from mmcl.data.decode import (
    IMAGE_EXTS,
    MAX_PIXELS,
    SkipCounter,
    SkipSample,
    caption_options,
    decode_image,
    decode_json,
    decode_label,
    image_bytes,
)
from mmcl.data.reader import is_remote, list_shards, read_samples
from mmcl.eval.templates import check_classnames, load_classnames, parse_templates
from mmcl.utils import UserError

log = logging.getLogger("mmcl.eval")

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"


@dataclass
class EvalSample:
    key: str
    image: Image.Image
    label: int | None = None
    captions: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # the shard's .json (e.g. the built-in shapes' attributes)


@dataclass
class SkipReport:
    """A loader worker's skip counts by reason: the last item of its stream (see `mmcl.eval.runner.iterate_batches`)."""

    counts: dict[str, int]


def _reason(e: SkipSample) -> str:
    """'not_an_image' -> 'not an image': the data layer's skip reason as words for eval logs and errors."""
    return e.reason.replace("_", " ")


def _read_sidecar(dirs: list[Path], name: str) -> Path | None:
    for d in dirs:
        if (d / name).is_file():
            return d / name
    return None


class ShardDataset(IterableDataset):
    """Samples of labelled and/or captioned tar shards (read with webdataset; split across loader workers).

    Attributes:
        classnames: class names (label order) or None for caption-only data.
        templates: templates shipped with the data (CLIP_benchmark) or None.
    """

    def __init__(
        self,
        shards: str | list[str],
        classnames: list[str] | str | Path | None = None,
        label_key: str = "label",
        split: str = "test",
        max_pixels: int = MAX_PIXELS,
    ) -> None:
        super().__init__()
        self.urls = list_shards(shards, split=split)
        self.label_key = label_key
        self.max_pixels = max_pixels
        first = Path(self.urls[0])
        sidecar_dirs = [first.parent, first.parent.parent] if not is_remote(self.urls[0]) else []
        if isinstance(classnames, (str, Path)):
            classnames = load_classnames(classnames)
        elif classnames is None and (found := _read_sidecar(sidecar_dirs, CLASSNAMES_FILE)):
            classnames = load_classnames(found)
        elif classnames is not None:
            check_classnames(classnames)
        self.classnames: list[str] | None = list(classnames) if classnames is not None else None
        self._index = {n: i for i, n in reversed(list(enumerate(self.classnames or [])))}
        templates = _read_sidecar(sidecar_dirs, TEMPLATES_FILE)
        self.templates = parse_templates(templates.read_text().splitlines(), str(templates)) if templates else None
        self.skipped: dict[str, int] = {}  # of the last in-process iteration

    def _label(self, raw: dict, where: str) -> int | None:
        """The `.cls` integer, else `json[label_key]` as an index or a class name; None when there is neither."""
        try:
            if "cls" in raw:  # a .cls wins over the json, as in training
                label = decode_label(raw, {}, self.label_key)
            else:
                label = decode_json(raw).get(self.label_key)
        except SkipSample as e:
            raise UserError(f"{where}: {_reason(e)} ({e.detail})") from None
        if label is None:
            return None
        if isinstance(label, str):
            if label not in self._index:
                raise UserError(f"{where}: label {label!r} is not in the class names")
            label = self._index[label]
        elif not isinstance(label, int) or isinstance(label, bool):
            raise UserError(f"{where}: json['{self.label_key}'] = {label!r} is not a class index or name")
        if self.classnames is not None and not 0 <= label < len(self.classnames):
            raise UserError(f"{where}: label {label} is outside the {len(self.classnames)} class names")
        return label

    def __iter__(self) -> Iterator[EvalSample | SkipReport]:
        """The samples of this process's share of the shards; a loader worker ends with its `SkipReport`."""
        info = get_worker_info()
        urls = self.urls[info.id :: info.num_workers] if info else self.urls
        skips = SkipCounter(log)
        self.skipped = skips.counts
        for raw in read_samples(urls, skips):
            key = raw["__key__"]
            where = f"{raw.get('__url__', '?')}:{key}"
            try:
                image = decode_image(image_bytes(raw), self.max_pixels)
            except SkipSample as e:
                skips.add(e.reason, where, e.detail)
                continue
            try:  # every line of .txt is a reference caption (retrieval, captioning), none is dropped
                captions = caption_options(raw, {}, "txt", errors="replace")
            except SkipSample:  # no .txt or only blank lines: still an image for zero-shot
                captions = []
            label = self._label(raw, where)
            try:
                meta = decode_json(raw)
            except SkipSample:  # a bad .json without a label in it only loses its extra fields
                meta = {}
            yield EvalSample(key=key, image=image, label=label, captions=captions, meta=meta)
        if info is not None:  # counts made in a worker process reach the caller only through the stream
            yield SkipReport(dict(skips.counts))


class ImageFolderDataset(Dataset):
    """`ROOT/<class folder>/<image>`: label = index of the folder in sorted order."""

    def __init__(self, root: str | Path, max_pixels: int = MAX_PIXELS) -> None:
        self.skipped: dict[str, int] = {}  # always empty: a bad image in a folder is an error, not a skip
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"image folder {self.root} does not exist")
        folders = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.classnames = [p.name.replace("_", " ") for p in folders]
        self.templates = None
        self.max_pixels = max_pixels
        self.items = [
            (f, label)
            for label, folder in enumerate(folders)
            for f in sorted(folder.rglob("*"))
            if f.is_file() and f.suffix.lower().lstrip(".") in IMAGE_EXTS
        ]
        if not self.items:
            raise UserError(f"image folder {self.root} holds no class folders with images ({', '.join(IMAGE_EXTS)})")
        check_classnames(self.classnames, str(self.root))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> EvalSample:
        path, label = self.items[i]
        try:
            image = decode_image(path.read_bytes(), self.max_pixels)
        except SkipSample as e:
            raise UserError(f"{path}: {_reason(e)} ({e.detail})") from None
        return EvalSample(key=str(path.relative_to(self.root)), image=image, label=label)

    def __iter__(self) -> Iterator[EvalSample]:
        return (self[i] for i in range(len(self)))


def _is_image_folder(path: Path) -> bool:
    if not path.is_dir() or any(path.glob("*.tar")) or (path / "dataset_type.txt").is_file():
        return False
    return any(f.suffix.lower().lstrip(".") in IMAGE_EXTS for d in path.iterdir() if d.is_dir() for f in d.iterdir())


def open_eval_dataset(
    source: str | list[str],
    classnames: list[str] | str | Path | None = None,
    label_key: str = "label",
    split: str = "test",
    max_pixels: int = MAX_PIXELS,
) -> ShardDataset | ImageFolderDataset:
    """Open a dataset from shard paths/patterns, an image-folder root, or a CLIP_benchmark root.

    Args:
        source: one spec or several; a single folder holding class sub-folders of images is an image folder.
        classnames: names (or a file) overriding those found with the data.
        label_key: key of the label in `.json` when there is no `.cls`.
        split: CLIP_benchmark split folder.
        max_pixels: larger images are skipped unread.
    """
    from mmcl.data.builtin import ensure_builtin, is_builtin

    specs = [source] if isinstance(source, str) else list(source)
    specs = [str(ensure_builtin(s)) if is_builtin(s) else s for s in specs]
    if len(specs) == 1 and _is_image_folder(Path(specs[0])):
        ds = ImageFolderDataset(specs[0], max_pixels=max_pixels)
        if classnames is not None:
            names = load_classnames(classnames) if isinstance(classnames, (str, Path)) else list(classnames)
            if len(names) != len(ds.classnames):
                raise UserError(f"{len(names)} class names given for {len(ds.classnames)} folders in {specs[0]}")
            ds.classnames = names
        return ds
    return ShardDataset(specs, classnames=classnames, label_key=label_key, split=split, max_pixels=max_pixels)
