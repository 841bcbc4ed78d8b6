"""`mmcl train CONFIG [key=value ...]`."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a YAML config (CLIP, SigLIP, PrefixLM, joint)",
        description="Train from an experiment YAML (see configs/). Re-running the same command resumes from the "
        "newest checkpoint in train.output_dir. Launch several processes with torchrun or accelerate launch.",
        epilog="example: mmcl train configs/clip/tiny.yaml train.steps=200 data.batch_size=64 train.lr=1e-3",
    )
    p.add_argument("config", help="experiment YAML file ('-' for none: all defaults plus the overrides)")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="optional: any number of dotted overrides, e.g. train.lr=1e-3"
    )
    p.add_argument("--output-dir", help="shortcut for train.output_dir=...")
    p.add_argument("--no-eval", action="store_true", help="skip the zero-shot/caption eval hook")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmcl.cli._paths import require_output_folder
    from mmcl.config import load_experiment
    from mmcl.engine.trainer import train
    from mmcl.eval.hook import default_eval_hook

    overrides = list(args.overrides) + ([f"train.output_dir={args.output_dir}"] if args.output_dir else [])
    cfg = load_experiment(None if args.config == "-" else args.config, overrides)
    require_output_folder(cfg.train.output_dir, "train.output_dir")
    result = train(cfg, eval_hook=None if args.no_eval else default_eval_hook(cfg))
    print(f"trained {result.step} steps; model in {result.final_dir}")
    for k, v in result.eval_metrics.items():
        print(f"  {k}: {v:.4f}")
    return 0
