"""Compositional evaluation: does the model score an image's caption above a hard negative caption?

A pair is (image, caption, negative caption); it is right when cos(image, caption) > cos(image, negative)
(strictly, as SugarCrepe's `main_eval.py` counts it), so chance is 50%. Accuracy is reported per subset
and as the mean over subsets. Two sources of pairs:

- **SugarCrepe** (Hsieh et al. 2023, github.com/RAIVNLab/sugar-crepe): `DATA_ROOT/<subset>.json` for the
  subsets `replace_obj replace_att replace_rel swap_obj swap_att add_obj add_att`, each
  `{"0": {"filename": "000000565045.jpg", "caption": ..., "negative_caption": ...}, ...}`, with the
  images (COCO val2017) in a folder the user gives;
- **generated** from labelled captions whose json carries known attributes (the built-in shapes:
  `mmcl.eval.compositional_shapes`), read from eval shards or straight from the generator.

    pairs = sugarcrepe_pairs("sugar-crepe/data", "coco/val2017")    # or shard_pairs(open_eval_dataset(...))
    result = evaluate_compositional(load_pipeline("runs/demo"), pairs)
    result["metrics"]   # {'replace_obj': 0.83, ..., 'mean': 0.79, 'n_pairs': 7512}
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from mmcl.data.decode import MAX_PIXELS, SkipCounter, SkipSample, decode_image, load_image
from mmcl.eval.compositional_shapes import VOCABULARIES, vocabulary_for
from mmcl.eval.datasets import EvalSample
from mmcl.eval.runner import EncodeImages, EncodeTexts, describe_skips, encode_all_texts, iterate_batches
from mmcl.utils import UserError

if TYPE_CHECKING:
    from mmcl.inference import Encoder

log = logging.getLogger("mmcl.eval")

SUGARCREPE_SUBSETS = ("replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj", "add_att")
CHANCE = 0.5
THUMBNAIL = 160


@dataclass
class CompositionalPairs:
    """Pairs to score and the images they refer to.

    Attributes:
        images: image id -> a decoded image, or the path of one (read when its batch is encoded).
        pairs: (subset, image id, caption, negative caption), in reading order.
        source: what the pairs were made from, for reports.
        skipped: samples the reader skipped, by reason.
    """

    images: dict[str, Image.Image | Path] = field(default_factory=dict)
    pairs: list[tuple[str, str, str, str]] = field(default_factory=list)
    source: str = ""
    skipped: dict[str, int] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for subset, *_ in self.pairs:
            out[subset] = out.get(subset, 0) + 1
        return out


def sugarcrepe_pairs(
    data_root: str | Path, image_root: str | Path, subsets: Iterable[str] | None = None, max_per_subset: int = 0
) -> CompositionalPairs:
    """Read SugarCrepe's subset files (`DATA_ROOT/<subset>.json`) with their images under `image_root`.

    Args:
        data_root: the folder holding the subset files (SugarCrepe's `data/`).
        image_root: the folder of the images the entries name (COCO val2017 for SugarCrepe itself).
        subsets: which subsets to read (default: every one of `SUGARCREPE_SUBSETS` found in `data_root`).
        max_per_subset: keep only the first this many entries of each subset (0 = all).

    Raises:
        UserError: no subset file, a malformed file or entry, an image that is missing or outside `image_root`.
    """
    root, images_dir = Path(data_root), Path(image_root)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder (give SugarCrepe's data/ folder of <subset>.json files)")
    if not images_dir.is_dir():
        raise UserError(f"{images_dir}: no such image folder")
    names = list(subsets) if subsets is not None else [s for s in SUGARCREPE_SUBSETS if (root / f"{s}.json").is_file()]
    if not names:
        raise UserError(f"{root}: no SugarCrepe subset file ({', '.join(s + '.json' for s in SUGARCREPE_SUBSETS)})")
    out = CompositionalPairs(source=f"SugarCrepe {root} (images {images_dir})")
    base = images_dir.resolve()
    for subset in names:
        path = root / f"{subset}.json"
        if not path.is_file():
            raise UserError(f"{path}: no such subset file")
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not JSON ({e})") from None
        except RecursionError:
            raise UserError(f"{path}: not a SugarCrepe file (JSON nested too deeply to read)") from None
        if not isinstance(entries, dict):
            raise UserError(f"{path}: expected an object of entries keyed by id, as SugarCrepe's files are")
        for n, (key, entry) in enumerate(entries.items()):
            if max_per_subset and n >= max_per_subset:
                break
            fields = ("filename", "caption", "negative_caption")
            if not isinstance(entry, dict) or not all(isinstance(entry.get(f), str) for f in fields):
                raise UserError(f"{path}: entry {key!r} needs the strings {', '.join(fields)}")
            if "\0" in entry["filename"]:  # the OS refuses such a path with a ValueError
                raise UserError(f"{path}: entry {key!r} names an image with a NUL byte: {entry['filename']!r}")
            try:
                image = (base / entry["filename"]).resolve()
                found = image.is_file()
            except (OSError, ValueError) as e:
                raise UserError(
                    f"{path}: entry {key!r}: image {entry['filename']!r} ({type(e).__name__}: {e})"
                ) from None
            if not image.is_relative_to(base):
                raise UserError(f"{path}: entry {key!r} names an image outside {images_dir}: {entry['filename']!r}")
            if not found:
                raise UserError(f"{path}: entry {key!r}: image {entry['filename']} not found in {images_dir}")
            out.images.setdefault(entry["filename"], image)
            out.pairs.append((subset, entry["filename"], entry["caption"], entry["negative_caption"]))
    return out


def _pick_vocabulary(meta: dict[str, Any], vocabulary: str | None) -> str | None:
    if vocabulary is None:
        return vocabulary_for(meta)
    return vocabulary if VOCABULARIES[vocabulary].accepts(meta) else None


def generated_pairs(
    samples: Iterable[EvalSample],
    max_per_subset: int = 0,
    max_samples: int = 0,
    vocabulary: str | None = None,
    source: str = "",
) -> CompositionalPairs:
    """Hard negatives made from each sample's caption and the attributes in its json (`EvalSample.meta`).

    Samples without known attributes (see `mmcl.eval.compositional_shapes.VOCABULARIES`) or without a caption
    are passed over. Each sample's choices are seeded by its key, so a set is the same on every run.

    Args:
        samples: e.g. `open_eval_dataset(shards)` or `synthetic_samples(n)`.
        max_per_subset: stop adding to a subset once it has this many pairs (0 = no limit); reading stops
            when every subset of the vocabularies met so far is full.
        max_samples: read at most this many samples (0 = all).
        vocabulary: a `VOCABULARIES` name; default: detected per sample.

    Raises:
        UserError: no sample carries attributes of a known vocabulary.
    """
    if vocabulary is not None and vocabulary not in VOCABULARIES:
        raise UserError(f"unknown attribute vocabulary '{vocabulary}' (choose from {', '.join(VOCABULARIES)})")
    out = CompositionalPairs(source=source)
    counts: dict[str, int] = {}
    wanted: set[str] = set()  # every subset of the vocabularies seen: reading stops when all are full
    for n, s in enumerate(samples):
        if max_samples and n >= max_samples:
            break
        name = _pick_vocabulary(s.meta, vocabulary)
        if name is None or not s.captions:
            continue
        vocab = VOCABULARIES[name]
        wanted.update(vocab.subsets)
        image_id = s.key if s.key not in out.images else f"{s.key}#{n}"  # keys may repeat across shards
        rng = random.Random(f"mmcl-compositional/{s.key}")
        for subset, negative in vocab.negatives(s.captions[0], s.meta, rng).items():
            if max_per_subset and counts.get(subset, 0) >= max_per_subset:
                continue
            counts[subset] = counts.get(subset, 0) + 1
            out.pairs.append((subset, image_id, s.captions[0], negative))
            out.images[image_id] = s.image
        if max_per_subset and all(counts.get(k, 0) >= max_per_subset for k in wanted):
            break
    order = {k: i for name in VOCABULARIES for i, k in enumerate(VOCABULARIES[name].subsets)}
    out.pairs.sort(key=lambda pair: order.get(pair[0], len(order)))  # subsets in the vocabulary's order
    out.skipped = dict(getattr(samples, "skipped", {}) or {})
    if not out.pairs:
        raise UserError(
            "no compositional pairs: the data carries no known attributes in its .json "
            f"(vocabularies: {', '.join(VOCABULARIES)}; e.g. the built-in shapes){describe_skips(out.skipped)}"
        )
    return out


def synthetic_samples(n: int, split: str = "test", seed: int = 0, image_size: int = 64) -> Iterable[EvalSample]:
    """`n` samples of the built-in generator as `EvalSample`s with the json its shards carry."""
    from mmcl.data.synthetic import iter_synthetic

    for s in iter_synthetic(n, split=split, seed=seed, image_size=image_size):
        meta = {"attributes": s.attributes, "distractor": s.distractor, "distractor_position": s.distractor_position}
        yield EvalSample(
            key=f"synthetic/{split}/{seed}/{s.meta['index']}", image=s.image, captions=[s.caption], meta=meta
        )


def _readable(
    images: dict[str, Image.Image | Path],
    ids: Iterable[str],
    max_pixels: int,
    skips: SkipCounter,
    read: list[str],
) -> Iterator[EvalSample]:
    """The images `ids` as samples, opened one at a time; one that cannot be read or decoded is skipped and
    counted by reason (a SugarCrepe image folder may hold a damaged file), the others appended to `read`."""
    for i in ids:
        image = images[i]
        try:
            opened = image if isinstance(image, Image.Image) else decode_image(Path(image).read_bytes(), max_pixels)
        except SkipSample as e:
            skips.add(e.reason, str(image), e.detail, unit="image")
            continue
        except OSError as e:
            skips.add("unreadable_file", str(image), f"{type(e).__name__}: {e.strerror or e}", unit="image")
            continue
        read.append(i)
        yield EvalSample(key=i, image=opened)


def _open(image: Image.Image | Path, max_pixels: int) -> Image.Image:
    return image if isinstance(image, Image.Image) else load_image(image, max_pixels=max_pixels)


def _thumb(image: Image.Image) -> Image.Image:
    im = image.copy()
    im.thumbnail((THUMBNAIL, THUMBNAIL))
    return im


@torch.no_grad()
def run_compositional(
    encode_images: EncodeImages,
    encode_texts: EncodeTexts,
    pairs: CompositionalPairs,
    batch_size: int = 64,
    text_batch_size: int = 256,
    max_pixels: int = MAX_PIXELS,
    num_examples: int = 8,
    progress: bool = False,
) -> dict:
    """Score every pair: right when cos(image, caption) > cos(image, negative).

    Each image and each distinct text is encoded once, however many pairs share it. An image that cannot be
    read or decoded is skipped with its pairs and counted by reason in `skipped`.

    Returns:
        `task`='compositional', `metrics` (accuracy per subset, `mean` over subsets, `n_pairs`), `subsets`
        (name -> pairs, accuracy), `chance` (0.5), `predictions` (per pair: subset, image, caption, negative,
        both scores, correct), `skipped`, `examples` (one pair per subset: its first wrong one if any).
    """
    if not pairs.pairs:
        raise UserError("no compositional pairs to score")
    skips = SkipCounter(log)
    skips.counts.update(pairs.skipped)
    ids: list[str] = []  # the images that could be read, in reading order
    samples = _readable(pairs.images, dict.fromkeys(image for _, image, _, _ in pairs.pairs), max_pixels, skips, ids)
    feats = []
    for batch in iterate_batches(samples, batch_size, progress=progress, desc="compositional"):
        out = encode_images([s.image for s in batch])
        if out.shape[0] != len(batch):
            raise ValueError(f"encode_images returned {out.shape[0]} rows for {len(batch)} images")
        feats.append(out.detach().float().cpu())
    if not feats:
        raise UserError(f"no image of the compositional pairs could be read{describe_skips(skips.counts)}")
    image_feats = torch.nn.functional.normalize(torch.cat(feats), dim=-1)  # (I, D)
    readable = set(ids)
    pairs = dataclasses.replace(pairs, pairs=[p for p in pairs.pairs if p[1] in readable], skipped=dict(skips.counts))
    texts = list(dict.fromkeys(t for _, _, c, n in pairs.pairs for t in (c, n)))
    text_feats = torch.nn.functional.normalize(encode_all_texts(encode_texts, texts, text_batch_size), dim=-1)
    row, col = {i: k for k, i in enumerate(ids)}, {t: k for k, t in enumerate(texts)}
    img = image_feats[[row[i] for _, i, _, _ in pairs.pairs]]  # (P, D)
    pos = (img * text_feats[[col[c] for _, _, c, _ in pairs.pairs]]).sum(-1)  # (P,)
    neg = (img * text_feats[[col[n] for _, _, _, n in pairs.pairs]]).sum(-1)  # (P,)
    correct = (pos > neg).tolist()

    subsets: dict[str, dict[str, Any]] = {}
    for (subset, *_), ok in zip(pairs.pairs, correct):
        entry = subsets.setdefault(subset, {"pairs": 0, "correct": 0})
        entry["pairs"] += 1
        entry["correct"] += int(ok)
    for entry in subsets.values():
        entry["accuracy"] = entry["correct"] / entry["pairs"]
    metrics: dict[str, Any] = {name: e["accuracy"] for name, e in subsets.items()}
    metrics["mean"] = sum(metrics.values()) / len(subsets)
    metrics["n_pairs"] = len(pairs.pairs)
    predictions = [
        {"subset": s, "image": i, "caption": c, "negative": n, "score": p, "negative_score": q, "correct": ok}
        for (s, i, c, n), p, q, ok in zip(pairs.pairs, pos.tolist(), neg.tolist(), correct)
    ]
    first: dict[str, int] = {}  # per subset its first wrong pair, else its first pair
    for k, pred in enumerate(predictions):
        if pred["subset"] not in first or (predictions[first[pred["subset"]]]["correct"] and not pred["correct"]):
            first[pred["subset"]] = k
    shown = list(first.values())[:num_examples]
    examples = [
        {
            **predictions[k],
            "key": predictions[k]["image"],
            "image": _thumb(_open(pairs.images[predictions[k]["image"]], max_pixels)),
        }
        for k in shown
    ]
    return {
        "task": "compositional",
        "metrics": metrics,
        "subsets": subsets,
        "chance": CHANCE,
        "settings": {"pairs from": pairs.source} if pairs.source else {},
        "predictions": predictions,
        "skipped": pairs.skipped,
        "examples": examples,
    }


def evaluate_compositional(encoder: Encoder, pairs: CompositionalPairs, **kw: Any) -> dict:
    """`run_compositional` with an `mmcl.inference.Encoder`'s `encode_images` / `encode_texts`."""
    if not encoder.can_encode:
        raise UserError("this model cannot encode images and texts (it has no contrastive towers)")
    return run_compositional(encoder.encode_images, encoder.encode_texts, pairs, **kw)


def compare_captions(encoder: Encoder, image: Image.Image, captions: list[str]) -> tuple[list[float], list[float]]:
    """Which of several captions fits an image better (the app's tab): cosines and the model's probabilities.

    Returns:
        cos(image, caption) per caption, and `mmcl.eval.zeroshot.class_probabilities` over the captions with the
        model's own scale (softmax for CLIP, an independent sigmoid per caption for SigLIP).
    """
    from mmcl.eval.zeroshot import class_probabilities

    img = torch.nn.functional.normalize(encoder.encode_images([image]).float(), dim=-1)  # (1, D)
    txt = torch.nn.functional.normalize(encoder.encode_texts(list(captions)).float(), dim=-1)  # (C, D)
    if img.shape[1] != txt.shape[1]:
        raise UserError(f"image and text embeddings differ in size ({img.shape[1]} vs {txt.shape[1]})")
    probs = class_probabilities(img, txt.T, *encoder.logit_scale_and_bias())[0]  # (C,)
    return (txt @ img[0]).tolist(), probs.tolist()
