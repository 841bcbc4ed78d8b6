"""`mmcl shards {synthetic,folder,table,real} ... OUT`: write img2dataset-style WebDataset shards."""

from __future__ import annotations

import argparse
import re

from mmcl.utils import UserError

_EPILOG = """\
Output (img2dataset layout): OUT/00000.tar with KEY.jpg, KEY.txt (caption) and KEY.json
(img2dataset fields + label/attributes), OUT/00000_stats.json per shard, OUT/sizes.json and,
for labelled sources, OUT/classnames.txt. Re-running the same command resumes: finished
shards are kept, the rest is written. Unreadable images are reported and counted, not fatal.

examples:
  mmcl shards synthetic data/demo/train --n 20000 --image-size 32 --maxcount 1000
  mmcl shards folder my_photos/ data/photos --class-from-parent --resize 224 --workers 4
  mmcl shards table captions.parquet data/cc --image-col file --caption-col text --maxsize 500MB
  mmcl shards real digits data/digits --split test
"""


def _bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: '{text}' (e.g. 500000000, 500MB, 1GB)")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2) or "_"))


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="OUT", help="output folder for the shards (created; resumed if it holds some)")
    g = p.add_argument_group("shards")
    g.add_argument("--maxcount", type=int, default=10000, help="inputs per shard (default: %(default)s)")
    g.add_argument("--maxsize", type=_bytes, default=0, help="bytes per shard, e.g. 500MB (default: no limit)")
    g.add_argument(
        "--format", dest="image_format", choices=["jpg", "png", "webp"], default="jpg", help="image encoding"
    )
    g.add_argument("--resize", dest="resize", type=int, default=0, help="resize images to this many pixels (0 = keep)")
    g.add_argument(
        "--resize-mode",
        choices=["shorter", "longer", "center_crop"],
        default="shorter",
        help="which side --resize sets (aspect kept), or center_crop to a square (default: %(default)s)",
    )
    g.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality (default: %(default)s)")
    g.add_argument("--workers", type=int, default=0, help="encoding processes (0 = this process)")
    g.add_argument("--overwrite", action="store_true", help="delete existing shards in OUT instead of resuming")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "shards",
        help="write WebDataset shards from a folder, a table, the synthetic generator or the bundled real images",
        description="Write image-text WebDataset shards in img2dataset's layout.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="source", metavar="SOURCE", required=True)

    s = sub.add_parser(
        "synthetic",
        help="the built-in captioned shapes (40 colour-shape classes)",
        description="Generate N samples of mmcl's synthetic captioned shapes (deterministic by split, seed, index).",
    )
    s.add_argument("--n", type=int, required=True, help="number of samples")
    s.add_argument("--split", choices=["train", "val", "test"], default="train", help="random stream (disjoint)")
    s.add_argument("--seed", type=int, default=0, help="stream seed (default: %(default)s)")
    s.add_argument("--image-size", type=int, default=64, help="rendered image side in pixels (default: %(default)s)")
    s.add_argument(
        "--counterfactuals",
        action="store_true",
        help="also write KEY.cf.<ext>/KEY.cf.txt/KEY.cf.json: the scene with one seeded edit, and its caption",
    )
    _add_common(s)

    f = sub.add_parser(
        "folder",
        help="images with sidecar caption files (a.jpg + a.txt)",
        description="Shard every image under DIR (recursive) with the caption from the .txt file beside it.",
    )
    f.add_argument("dir", metavar="DIR", help="folder of images")
    f.add_argument(
        "--class-from-parent", action="store_true", help="label each image by its class folder (DIR/CLASS/...)"
    )
    f.add_argument("--caption-ext", default="txt", help="caption sidecar extension (default: %(default)s)")
    f.add_argument("--allow-missing-captions", action="store_true", help="write an empty caption instead of failing")
    _add_common(f)

    t = sub.add_parser(
        "table",
        help="a CSV/TSV/Parquet table of image paths and captions",
        description="Shard the images listed in a CSV, TSV or Parquet table; relative paths are from the table's folder.",
    )
    t.add_argument("table", metavar="FILE", help="table file (.csv, .tsv, .parquet)")
    t.add_argument("--image-col", default="path", help="column of image paths (default: %(default)s)")
    t.add_argument("--caption-col", default="caption", help="column of captions (default: %(default)s)")
    t.add_argument("--label-col", default=None, help="optional column of class indices or class names")
    t.add_argument("--extra-cols", nargs="*", default=[], help="more columns to copy into each sample's json")
    _add_common(t)

    r = sub.add_parser(
        "real",
        help="bundled real images: scikit-learn digits or skimage photos",
        description="Shard scikit-learn's handwritten digits (labelled 0-9) or ~20 captioned skimage.data photos.",
    )
    r.add_argument("name", choices=["digits", "photos"], help="which set")
    r.add_argument("--split", choices=["all", "train", "test"], default="all", help="digits: 4/5 train, 1/5 test")
    r.add_argument("--image-size", type=int, default=32, help="digits: upscaled side in pixels (default: %(default)s)")
    _add_common(r)

    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmcl.cli._paths import require_output_folder
    from mmcl.data import sources
    from mmcl.data.writer import write_shards

    require_output_folder(args.out, "OUT")
    if args.source == "synthetic":
        source = sources.SyntheticSource(
            args.n, args.split, args.seed, args.image_size, counterfactuals=args.counterfactuals
        )
    elif args.source == "folder":
        missing = "empty" if args.allow_missing_captions else "error"
        source = sources.FolderSource(args.dir, args.class_from_parent, args.caption_ext, missing)
    elif args.source == "table":
        source = sources.TableSource(args.table, args.image_col, args.caption_col, args.label_col, args.extra_cols)
    elif args.source == "real":
        source = sources.RealSource(args.name, split=args.split, image_size=args.image_size)
    else:  # argparse restricts the choices
        raise UserError(f"unknown source '{args.source}'")
    summary = write_shards(
        source,
        args.out,
        maxcount=args.maxcount,
        maxsize=args.maxsize,
        image_format=args.image_format,
        image_size=args.resize,
        resize_mode=args.resize_mode,
        quality=args.quality,
        num_workers=args.workers,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    kept = f", {len(summary.kept_shards)} kept from an earlier run" if summary.kept_shards else ""
    print(
        f"wrote {summary.samples} samples in {len(summary.shards)} shards to {summary.out_dir}{kept}; "
        f"{summary.failed} inputs failed"
        + (
            f" ({', '.join(f'{r}: {n}' for r, n in sorted(summary.failed_by_reason.items()))})"
            if summary.failed
            else ""
        )
    )
    return 0
