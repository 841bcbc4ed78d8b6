"""`mmcl demo`: the end-to-end demo on built-in data."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="end to end on built-in data: shards -> train a tiny CLIP -> eval -> report -> app index",
        description="Writes synthetic shards, trains a tiny CLIP on CPU, evaluates zero-shot classification and "
        "retrieval on the held-out split, writes REPORT.md and builds the index the app serves. Re-running resumes.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (default runs/demo)")
    p.add_argument("--data", type=Path, default=Path("data/demo"), help="where the shards go (default data/demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 400)")
    p.add_argument("--n-train", type=int, default=None, help="training samples to generate (default 20000)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="optional config overrides, e.g. train.lr=1e-3")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmcl.cli._paths import require_output_folder
    from mmcl.extras import require

    require_output_folder(args.out, "--out")
    require_output_folder(args.data, "--data")

    require("faiss", "mmcl demo (it indexes the held-out images for the app)")
    from mmcl.demo import DemoSettings, run_demo

    s = DemoSettings(out=args.out, data=args.data)
    if args.steps:
        s.steps = args.steps
    if args.n_train:
        s.n_train = args.n_train
    results = run_demo(s, args.overrides)
    zs, ret = results["zeroshot"], results["retrieval"]
    print(
        f"\nzero-shot top-1 {zs['top1']:.1%} (chance {1 / results['n_classes']:.1%}), "
        f"text->image recall@5 {ret['t2i_recall@5']:.1%}"
    )
    print(f"report: {s.out / 'REPORT.md'}")
    print(f"open the app on this model:  mmcl app {s.out}   (then http://127.0.0.1:7860)")
    return 0
