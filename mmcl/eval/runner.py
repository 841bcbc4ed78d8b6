"""Run encoders or a captioner over an eval dataset in batches, then score.

The `run_*` functions take plain callables so the trainer's eval hook can pass an in-memory model:

    encode_images(list[PIL.Image]) -> (B, D)     (or a (B, 3, H, W) tensor when `transform` is given)
    encode_texts(list[str]) -> (N, D)
    caption(list[PIL.Image]) -> list[str]

The `evaluate_*` functions do the same for an `mmcl.inference.Encoder` (a trained run, an in-memory model
or an open_clip model). Results are dicts with `task`, `metrics` (scalars only, ready for a tracker), task
details, `skipped` (samples and shards the reader skipped, by reason) and `examples` (a few thumbnails with
their predictions) for `mmcl.eval.report.write_report`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from mmcl.data.decode import describe_counts
from mmcl.eval.alignment import alignment_uniformity
from mmcl.eval.caption_metrics import caption_scores
from mmcl.eval.datasets import EvalSample, SkipReport, open_eval_dataset
from mmcl.eval.knn import knn_classify
from mmcl.eval.linear_probe import ProbeSettings, linear_probe
from mmcl.eval.retrieval import retrieval_eval, top_texts
from mmcl.eval.templates import load_templates
from mmcl.eval.zeroshot import build_classifier, zero_shot_eval
from mmcl.utils import UserError

if TYPE_CHECKING:
    from mmcl.inference import Encoder

EncodeImages = Callable[[Any], torch.Tensor]
EncodeTexts = Callable[[list[str]], torch.Tensor]
Transform = Callable[[Image.Image], torch.Tensor]

THUMBNAIL = 160


def iterate_batches(
    dataset: Iterable[EvalSample],
    batch_size: int,
    max_samples: int = 0,
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "eval",
    skipped: dict[str, int] | None = None,
) -> Iterator[list[EvalSample]]:
    """Lists of at most `batch_size` samples, stopping after `max_samples` (0 = all).

    With `num_workers > 0` a torch DataLoader decodes in worker processes (sample order then
    interleaves across workers; `ShardDataset` splits its shards between them).

    Args:
        skipped: filled with the reader's skip counts by reason (bad images, unreadable tars) once the
            batches are exhausted.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if num_workers > 0:
        from torch.utils.data import DataLoader

        source: Iterable[list[EvalSample]] = DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=list,  # type: ignore[arg-type]
        )
    else:
        source = _chunks(dataset, batch_size)
    total = max_samples or (len(dataset) if hasattr(dataset, "__len__") else None)  # type: ignore[arg-type]
    bar = None
    if progress:
        from mmcl.utils import progress_bar

        bar = progress_bar(total, desc, "img")  # plain log lines, not a bar's carriage returns, in a log file
    seen = 0
    worker_skips: dict[str, int] = {}
    try:
        for batch in source:
            for report in (s for s in batch if isinstance(s, SkipReport)):
                for reason, n in report.counts.items():
                    worker_skips[reason] = worker_skips.get(reason, 0) + n
            batch = [s for s in batch if not isinstance(s, SkipReport)]
            if max_samples:
                batch = batch[: max_samples - seen]
            seen += len(batch)
            if bar is not None:
                bar.update(len(batch))
            if batch:
                yield batch
            if max_samples and seen >= max_samples:
                break
    finally:
        if bar is not None:
            bar.close()
        if skipped is not None:
            skipped.update(worker_skips if num_workers > 0 else getattr(dataset, "skipped", {}))


def describe_skips(skipped: dict[str, int]) -> str:
    """'; skipped: 2 unreadable_tar, 1 not_an_image' (empty when nothing was skipped), for messages."""
    return f"; skipped: {describe_counts(skipped)}" if skipped else ""


def _chunks(dataset: Iterable[EvalSample], n: int) -> Iterator[list[EvalSample]]:
    batch: list[EvalSample] = []
    for sample in dataset:
        batch.append(sample)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def _encode(encode_images: EncodeImages, images: list[Image.Image], transform: Transform | None) -> torch.Tensor:
    inputs = torch.stack([transform(im) for im in images]) if transform is not None else images
    feats = encode_images(inputs)
    if feats.shape[0] != len(images):
        raise ValueError(f"encode_images returned {feats.shape[0]} rows for {len(images)} images")
    return feats.detach().float().cpu()


def _thumb(image: Image.Image) -> Image.Image:
    im = image.copy()
    im.thumbnail((THUMBNAIL, THUMBNAIL))
    return im


@torch.no_grad()
def encode_all_texts(encode_texts: EncodeTexts, texts: list[str], batch_size: int) -> torch.Tensor:
    """(N, D) float CPU embeddings of `texts`, encoded `batch_size` at a time."""
    return torch.cat(
        [encode_texts(texts[i : i + batch_size]).detach().float().cpu() for i in range(0, len(texts), batch_size)]
    )


def run_zero_shot(
    encode_images: EncodeImages,
    encode_texts: EncodeTexts,
    dataset: Iterable[EvalSample],
    classnames: list[str],
    templates: list[str],
    batch_size: int = 64,
    text_batch_size: int = 256,
    max_samples: int = 0,
    num_workers: int = 0,
    transform: Transform | None = None,
    num_examples: int = 8,
    progress: bool = False,
    keep_features: bool = False,
) -> dict:
    """Zero-shot classification of a labelled dataset.

    With `keep_features`, the result also holds the image `features` (N, D) and `labels` (N,) (for the
    frozen-feature probes of the eval hook; not for a report: pop them before writing one).

    Returns:
        `task`='zeroshot', `metrics` (top1, top5, mean_per_class_recall, n_samples, n_classes), `classnames`,
        `n_templates`, `per_class_recall`, `confusion` ((C, C) LongTensor), `predictions` (per sample: key,
        label, pred, topk, score), `examples` (first `num_examples`: key, image thumbnail, label, pred names).
    """
    classifier = build_classifier(encode_texts, classnames, templates, batch_size=text_batch_size)
    feats, labels, keys, examples = [], [], [], []
    skipped: dict[str, int] = {}
    for batch in iterate_batches(dataset, batch_size, max_samples, num_workers, progress, "zero-shot", skipped):
        for s in batch:
            if s.label is None:
                raise UserError(f"sample {s.key} has no label (need a .cls file or a label in its .json)")
        feats.append(_encode(encode_images, [s.image for s in batch], transform))
        labels.extend(s.label for s in batch)
        keys.extend(s.key for s in batch)
        examples.extend({"key": s.key, "image": _thumb(s.image)} for s in batch[: num_examples - len(examples)])
    if not feats:
        raise UserError(f"the eval dataset yielded no samples{describe_skips(skipped)}")
    features = torch.cat(feats)
    res = zero_shot_eval(features, torch.tensor(labels), classifier)
    pred, topk, scores = res.pop("predictions").tolist(), res.pop("topk").tolist(), res.pop("scores").tolist()
    for i, ex in enumerate(examples):
        ex.update(label=classnames[labels[i]], pred=classnames[pred[i]], correct=labels[i] == pred[i])
    metric_names = ("top1", "top5", "mean_per_class_recall", "n_samples", "n_classes")
    return {
        "task": "zeroshot",
        "metrics": {k: res[k] for k in metric_names if k in res},
        "classnames": list(classnames),
        "n_templates": len(templates),
        "per_class_recall": res["per_class_recall"],
        "confusion": res["confusion"],
        "predictions": [
            {"key": k, "label": y, "pred": p, "topk": t, "score": s}
            for k, y, p, t, s in zip(keys, labels, pred, topk, scores)
        ],
        "skipped": skipped,
        "examples": examples,
        **({"features": features, "labels": torch.tensor(labels)} if keep_features else {}),
    }


def run_retrieval(
    encode_images: EncodeImages,
    encode_texts: EncodeTexts,
    dataset: Iterable[EvalSample],
    batch_size: int = 64,
    text_batch_size: int = 256,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk_size: int = 1024,
    max_samples: int = 0,
    num_workers: int = 0,
    transform: Transform | None = None,
    num_examples: int = 8,
    progress: bool = False,
) -> dict:
    """Image<->text retrieval over a captioned dataset (every caption of an image is a positive).

    Returns:
        `task`='retrieval', `metrics` (see `retrieval_eval`), `examples` (first `num_examples` images with their
        captions and their top-3 retrieved captions).
    """
    feats, texts, text_to_image, examples = [], [], [], []
    n_img = 0
    skipped: dict[str, int] = {}
    for batch in iterate_batches(dataset, batch_size, max_samples, num_workers, progress, "retrieval", skipped):
        batch = [s for s in batch if s.captions]  # an image without captions cannot be a query
        if not batch:
            continue
        feats.append(_encode(encode_images, [s.image for s in batch], transform))
        for s in batch:
            texts.extend(s.captions)
            text_to_image.extend([n_img] * len(s.captions))
            if len(examples) < num_examples:
                examples.append({"key": s.key, "image": _thumb(s.image), "captions": s.captions, "index": n_img})
            n_img += 1
    if not feats:
        raise UserError(f"the eval dataset yielded no captioned samples (need .txt captions){describe_skips(skipped)}")
    image_features = torch.cat(feats)
    text_features = encode_all_texts(encode_texts, texts, text_batch_size)
    t2i = torch.tensor(text_to_image)
    metrics = retrieval_eval(image_features, text_features, t2i, ks=ks, chunk_size=chunk_size)
    metrics.update(alignment_uniformity(image_features, text_features, t2i))
    if examples:
        idx = torch.tensor([ex.pop("index") for ex in examples])
        scores, top = top_texts(image_features[idx], text_features, k=3)
        for ex, i, s, t in zip(examples, idx.tolist(), scores.tolist(), top.tolist()):
            ex["retrieved"] = [{"text": texts[j], "score": sc, "correct": text_to_image[j] == i} for j, sc in zip(t, s)]
    return {"task": "retrieval", "metrics": metrics, "skipped": skipped, "examples": examples}


def run_captioning(
    caption: Callable[[list[Image.Image]], list[str]],
    dataset: Iterable[EvalSample],
    batch_size: int = 16,
    max_samples: int = 0,
    num_workers: int = 0,
    num_examples: int = 8,
    progress: bool = False,
) -> dict:
    """Caption every image and score against its reference captions (BLEU-4, ROUGE-L, CIDEr-D on the whole split).

    Returns:
        `task`='captions', `metrics`, `predictions` (key, prediction, references), `examples`.
    """
    preds, refs, keys, examples = {}, {}, [], []
    skipped: dict[str, int] = {}
    for batch in iterate_batches(dataset, batch_size, max_samples, num_workers, progress, "captions", skipped):
        batch = [s for s in batch if s.captions]
        if not batch:
            continue
        out = caption([s.image for s in batch])
        if len(out) != len(batch):
            raise ValueError(f"caption returned {len(out)} captions for {len(batch)} images")
        for s, c in zip(batch, out):
            i = len(keys)  # sample index as id: keys may repeat across shards
            preds[i], refs[i] = c, s.captions
            keys.append(s.key)
            if len(examples) < num_examples:
                examples.append({"key": s.key, "image": _thumb(s.image), "prediction": c, "captions": s.captions})
    if not preds:
        raise UserError(f"the eval dataset yielded no captioned samples (need .txt captions){describe_skips(skipped)}")
    metrics = caption_scores(preds, refs)
    return {
        "task": "captions",
        "metrics": metrics,
        "predictions": [{"key": keys[i], "prediction": preds[i], "references": refs[i]} for i in preds],
        "skipped": skipped,
        "examples": examples,
    }


def run_features(
    encode_images: EncodeImages,
    dataset: Iterable[EvalSample],
    batch_size: int = 64,
    max_samples: int = 0,
    num_workers: int = 0,
    transform: Transform | None = None,
    progress: bool = False,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """(features (N, D) float CPU, labels (N,) int64, skip counts) of a labelled dataset, for probes."""
    feats, labels = [], []
    skipped: dict[str, int] = {}
    for batch in iterate_batches(dataset, batch_size, max_samples, num_workers, progress, desc, skipped):
        for s in batch:
            if s.label is None:
                raise UserError(f"sample {s.key} has no label (need a .cls file or a label in its .json)")
        feats.append(_encode(encode_images, [s.image for s in batch], transform))
        labels.extend(s.label for s in batch)
    if not feats:
        raise UserError(f"the {desc} dataset yielded no samples{describe_skips(skipped)}")
    return torch.cat(feats), torch.tensor(labels, dtype=torch.long), skipped


def run_probe(
    method: str,
    encode_images: EncodeImages,
    train: Iterable[EvalSample],
    test: Iterable[EvalSample],
    classnames: list[str] | None = None,
    settings: ProbeSettings | None = None,
    fewshot_k: int = -1,
    val_proportion: float = 0.2,
    k: int = 20,
    temperature: float = 0.07,
    **kw: Any,
) -> dict:
    """Frozen-feature evaluation: `method` 'linear_probe' (CLIP_benchmark's protocol) or 'knn' (DINO's).

    Image features of the labelled `train` and `test` datasets are computed once; `kw` goes to `run_features`
    (batch_size, max_samples, num_workers, transform, progress). Returns the probe's result dict with the
    reader's skip counts of both splits (`skipped`) and per-split sizes.
    """
    train_x, train_y, skip_train = run_features(encode_images, train, desc="train features", **kw)
    test_x, test_y, skip_test = run_features(encode_images, test, desc="test features", **kw)
    if method == "linear_probe":
        res = linear_probe(
            train_x, train_y, test_x, test_y, val_proportion=val_proportion, fewshot_k=fewshot_k, settings=settings
        )
    elif method == "knn":
        res = knn_classify(train_x, train_y, test_x, test_y, k=k, temperature=temperature)
    else:
        raise ValueError(f"unknown probe {method!r}: linear_probe or knn")
    skipped = {r: skip_train.get(r, 0) + skip_test.get(r, 0) for r in {*skip_train, *skip_test}}
    return {**res, "classnames": list(classnames or []), "skipped": skipped}


def probe_metrics(features: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """`knn_top1` and `linear_probe_top1` of features split in two seeded halves (fit on one, score the other).

    For the trainer's eval hook, where only one labelled split is at hand: cheap (a few hundred samples,
    the coarse wd sweep), so the numbers are comparable along a run, not with a full protocol's.
    """
    if len(labels) < 8 or labels.unique().numel() < 2:
        return {}
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    fit, score = perm[: len(perm) // 2], perm[len(perm) // 2 :]
    knn = knn_classify(features[fit], labels[fit], features[score], labels[score])
    lp = linear_probe(features[fit], labels[fit], features[score], labels[score], settings=ProbeSettings(seed=seed))
    return {"knn_top1": knn["metrics"]["top1"], "linear_probe_top1": lp["metrics"]["top1"]}


def _require(encoder: Encoder, can: bool, what: str) -> None:
    if not can:
        raise UserError(
            f"this model cannot {what} (it has no {'decoder' if 'caption' in what else 'contrastive towers'})"
        )


def evaluate_zero_shot(
    encoder: Encoder, dataset: Iterable[EvalSample], classnames: list[str], templates: list[str], **kw: Any
) -> dict:
    """`run_zero_shot` with an `mmcl.inference.Encoder`'s `encode_images` / `encode_texts`."""
    _require(encoder, encoder.can_encode, "encode images and texts")
    return run_zero_shot(encoder.encode_images, encoder.encode_texts, dataset, classnames, templates, **kw)


def evaluate_probe(
    method: str, encoder: Encoder, train: Iterable[EvalSample], test: Iterable[EvalSample], **kw: Any
) -> dict:
    """`run_probe` with an `mmcl.inference.Encoder`'s image tower."""
    _require(encoder, encoder.can_encode, "encode images and texts")
    return run_probe(method, encoder.encode_images, train, test, **kw)


def evaluate_retrieval(encoder: Encoder, dataset: Iterable[EvalSample], **kw: Any) -> dict:
    """`run_retrieval` with an `mmcl.inference.Encoder`."""
    _require(encoder, encoder.can_encode, "encode images and texts")
    return run_retrieval(encoder.encode_images, encoder.encode_texts, dataset, **kw)


def evaluate_captions(
    encoder: Encoder, dataset: Iterable[EvalSample], generate_kwargs: dict | None = None, **kw: Any
) -> dict:
    """`run_captioning` with an `mmcl.inference.Encoder`'s `caption(images, **generate_kwargs)`."""
    _require(encoder, encoder.can_caption, "write captions")
    gen = generate_kwargs or {}
    return run_captioning(lambda images: encoder.caption(images, **gen), dataset, **kw)


def zero_shot_from_config(
    cfg: Any,
    encode_images: EncodeImages,
    encode_texts: EncodeTexts,
    transform: Transform | None = None,
    progress: bool = False,
    keep_features: bool = False,
) -> dict:
    """Zero-shot eval as described by an `EvalConfig` (shards, classnames, templates, max_samples, batch_size).

    Class names from `cfg.classnames` or from the data; templates from `cfg.templates`.
    """
    if not cfg.shards:
        raise UserError("eval.shards is empty: nothing to evaluate")
    dataset = open_eval_dataset(cfg.shards, classnames=cfg.classnames or None)
    if not dataset.classnames:
        raise UserError("eval.classnames is not set and no classnames.txt lies beside the eval shards")
    return run_zero_shot(
        encode_images,
        encode_texts,
        dataset,
        dataset.classnames,
        load_templates(cfg.templates),
        batch_size=cfg.batch_size,
        max_samples=cfg.max_samples,
        transform=transform,
        progress=progress,
        keep_features=keep_features,
    )
