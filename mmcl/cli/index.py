"""`mmcl index build|info|verify|search`: a faiss index of image embeddings for the app's retrieval tab."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from typing import Any

from mmcl.data.decode import MAX_PIXELS


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `low` (argparse names the flag in its one-line error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got '{text}'")
        return value

    return parse


def _recall(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got '{text}'")
    return value


def _size(text: str) -> str:
    from mmcl.index.plan import parse_bytes
    from mmcl.utils import UserError

    try:
        parse_bytes(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", help="run folder or checkpoint folder whose model embeds the images")
    p.add_argument("--open-clip", default="", metavar="NAME", help="use an open_clip model instead, e.g. ViT-B-32")
    p.add_argument(
        "--pretrained", default="", metavar="TAG", help="open_clip pretrained tag (downloads: needs internet)"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "index",
        help="build or query a retrieval index of image embeddings",
        description="Embed images from shards or folders with a trained model into a faiss index (exact for small "
        "collections; past --ivf-threshold IVF with the storage that fits --memory-budget, its search breadth "
        "tuned to --target-recall, lists memory-mapped from disk when they do not fit), with thumbnails the app "
        "can show. A killed build resumes when run again with the same arguments.",
    )
    sub = p.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="embed images into an index folder", description="Embed images into an index.")
    b.add_argument("sources", nargs="+", help="shards (paths or {000..009} patterns), folders of shards or of images")
    b.add_argument("--out", required=True, help="index folder (e.g. runs/NAME/index, which `mmcl app` finds)")
    _model_args(b)
    b.add_argument("--batch-size", type=_int_at_least(1), default=32, help="images per forward pass")
    b.add_argument("--kind", default="auto", choices=["auto", "flat", "ivf", "hnsw"], help="faiss structure")
    b.add_argument(
        "--ivf-threshold", type=_int_at_least(1), default=100_000, help="'auto' uses IVF from this many images on"
    )
    b.add_argument(
        "--storage",
        default="auto",
        choices=["auto", "fp32", "fp16", "sq8", "pq"],
        help="vector codes (auto: the most exact that fits the budget)",
    )
    b.add_argument(
        "--memory-budget", type=_size, default="0", help="memory the index may use, e.g. 4G (0 = half the free RAM)"
    )
    b.add_argument("--target-recall", type=_recall, default=0.95, help="recall@10 the tuned IVF/HNSW search reaches")
    b.add_argument(
        "--chunk-size", type=_int_at_least(1), default=8192, help="images per saved chunk (what a kill can cost)"
    )
    b.add_argument("--thumb-size", type=_int_at_least(1), default=256, help="longest side of the stored thumbnails")
    b.add_argument("--max-samples", type=_int_at_least(0), default=0, help="stop after this many images (0 = all)")
    b.add_argument("--max-pixels", type=_int_at_least(1), default=MAX_PIXELS, help="skip larger images unread")
    mode = b.add_mutually_exclusive_group()
    mode.add_argument("--append", action="store_true", help="add to the index already in --out")
    mode.add_argument("--overwrite", action="store_true", help="replace the index already in --out")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=run_build)

    i = sub.add_parser("info", help="print an index's manifest", description="Print an index's manifest.")
    i.add_argument("index", help="index folder")
    i.set_defaults(func=run_info)

    v = sub.add_parser(
        "verify",
        help="check an index's files against the sizes and SHA-256 in its manifest",
        description="Hash every file of an index and compare with its manifest (a load compares sizes always, "
        "hashes only for small indexes).",
    )
    v.add_argument("index", help="index folder")
    v.set_defaults(func=run_verify)

    s = sub.add_parser("search", help="query an index from the command line", description="Query an index.")
    s.add_argument("index", help="index folder")
    _model_args(s)
    query = s.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="text query")
    query.add_argument("--image", help="image file query")
    s.add_argument("-k", type=_int_at_least(1), default=5, help="results to print")
    s.set_defaults(func=run_search)


def _load_model(args: argparse.Namespace) -> tuple[Any, str]:
    from mmcl.app.models import OpenClipPipeline, load_run
    from mmcl.utils import UserError

    if args.open_clip:
        return OpenClipPipeline(
            args.open_clip, args.pretrained
        ), f"open_clip {args.open_clip} {args.pretrained}".strip()
    if not args.run:
        raise UserError("say which model embeds the images: --run RUN or --open-clip NAME")
    return load_run(args.run), args.run


def run_build(args: argparse.Namespace) -> int:
    from mmcl.extras import require

    require("faiss", "mmcl index build")
    from mmcl.index import build_index
    from mmcl.index.plan import parse_bytes

    budget = parse_bytes(args.memory_budget)
    encoder, model = _load_model(args)
    index = build_index(
        encoder,
        args.sources,
        args.out,
        batch_size=args.batch_size,
        kind=args.kind,
        ivf_threshold=args.ivf_threshold,
        storage=args.storage,
        memory_budget=budget,
        target_recall=args.target_recall,
        chunk_size=args.chunk_size,
        thumb_size=args.thumb_size,
        max_samples=args.max_samples,
        max_pixels=args.max_pixels,
        append=args.append,
        overwrite=args.overwrite,
        info={"model": model},
        progress=not args.quiet,
    )
    tuned = f", {index.tuning['param']}={index.tuning['value']}" if index.tuning.get("param") else ""
    disk = ", lists on disk" if index.on_disk else ""
    print(f"{args.out}: {len(index)} images, {index.dim}-d, {index.structure}{tuned}{disk}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mmcl.index import read_manifest

    print(json.dumps(read_manifest(Path(args.index)), indent=2))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from mmcl.index import read_manifest, verify_index
    from mmcl.utils import UserError

    problem = verify_index(args.index)
    if problem:
        raise UserError(f"{args.index}: {problem}; rebuild it")
    manifest = read_manifest(args.index)
    print(f"{args.index}: {manifest['count']} vectors; every file matches its size and SHA-256 in the manifest")
    return 0


def run_search(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mmcl.extras import require_app

    require_app("mmcl index search")

    from mmcl.app import handlers as H
    from mmcl.index import EmbeddingIndex, check_model

    encoder, model = _load_model(args)
    index = EmbeddingIndex.load(args.index)
    check_model(index, encoder, model)  # another model's embeddings would answer with nonsense
    state = H.AppState(pipeline=encoder, model_name=model, index=index, index_dir=Path(args.index))
    hits = H.search_by_text(state, args.text, args.k) if args.text else H.search_by_image(state, args.image, args.k)
    for h in hits:
        print(f"{h.rank:3d}  {h.score:.4f}  {h.key}  {h.caption}")
    return 0
