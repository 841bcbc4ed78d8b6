"""`mmcl finetune START SHARDS... [key=value ...] --out DIR [--wise-alphas 0,0.5,1 --target T --reference R]`."""

from __future__ import annotations

import argparse

from mmcl.utils import UserError


def _alphas(text: str) -> list[float]:
    try:
        return [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of numbers") from None


def register(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained CLIP/SigLIP on your pairs (FLYP, LiT locking, layer-wise lr decay, WiSE-FT)",
        description="Contrastive fine-tuning from pretrained weights with the start model's own loss (FLYP). "
        "START: an mmcl run, an open_clip folder (open_clip_config.json + weights) or a transformers CLIPModel/"
        "SiglipModel folder. A labelled training set (classnames.txt beside the shards) is captioned with its "
        "class names in --templates. With --wise-alphas each interpolation of start and fine-tuned weights is "
        "evaluated on --target and --reference, written to OUT/wise_ft.{json,md,png}.",
        epilog="example: mmcl finetune runs/clip-tiny data/digits-train --out runs/ft --target data/digits-test "
        "--reference builtin:shapes/val --wise-alphas 0,0.25,0.5,0.75,1 --steps 200 --lr 1e-3",
    )
    p.add_argument("start", help="pretrained weights: mmcl run, open_clip folder or transformers folder")
    p.add_argument("shards", nargs="+", metavar="SHARDS [KEY=VALUE]",
                   help="training shards (folders, globs, brace patterns), then experiment overrides "
                        "(e.g. train.precision=bf16)")  # fmt: skip
    p.add_argument("--out", required=True, help="output run folder (re-running resumes there)")
    p.add_argument("--captions", choices=["auto", "pairs", "classes"], default="auto",
                   help="'classes': class names in templates (FLYP); 'pairs': the shards' captions; "
                        "auto: classes when class names are found (default)")  # fmt: skip
    p.add_argument("--classnames", default="", help="class names file of the training set (default: beside it)")
    p.add_argument("--templates", default="openai", help="templates for class-name captions (openai, short, FILE)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--layer-decay", type=float, default=1.0, help="layer-wise lr decay factor (1 = off)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lock-image", action="store_true", help="LiT: freeze the image tower")
    p.add_argument("--lock-text", action="store_true", help="freeze the text tower")
    p.add_argument("--unlocked-layers", type=int, default=0, help="with a lock: its last N blocks still train")
    p.add_argument("--target", nargs="+", default=[], help="labelled eval shards of the task fine-tuned for")
    p.add_argument("--target-classnames", default="")
    p.add_argument("--reference", nargs="+", default=[], help="labelled eval shards of what the start did well")
    p.add_argument("--reference-classnames", default="")
    p.add_argument("--eval-templates", default="openai", help="zero-shot templates for --target/--reference")
    p.add_argument("--eval-max-samples", type=int, default=0, help="cap per eval set (0 = all)")
    p.add_argument("--wise-alphas", type=_alphas, default=[], help="e.g. 0,0.25,0.5,0.75,1")
    p.set_defaults(overrides=[])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmcl.cli._paths import require_output_folder
    from mmcl.config import EvalConfig
    from mmcl.finetune import FinetuneSpec, finetune

    def eval_set(shards: list[str], classnames: str) -> EvalConfig | None:
        if not shards:
            return None
        return EvalConfig(shards=shards, classnames=classnames, templates=args.eval_templates,
                          max_samples=args.eval_max_samples)  # fmt: skip

    from pathlib import Path

    # one positional list: the shards, then KEY=VALUE overrides (main() also appends stragglers)
    overrides = [*[s for s in args.shards if "=" in s and not Path(s).exists()], *args.overrides]
    shards = [s for s in args.shards if s not in overrides]
    require_output_folder(args.out, "--out")
    if args.reference and not args.target:
        raise UserError("--reference needs --target (the curve plots one against the other)")
    spec = FinetuneSpec(
        start=args.start, train_shards=shards, out_dir=args.out, captions=args.captions,
        classnames=args.classnames, templates=args.templates, steps=args.steps, lr=args.lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, layer_decay=args.layer_decay,
        batch_size=args.batch_size, num_workers=args.workers, lock_image=args.lock_image,
        lock_text=args.lock_text, unlocked_layers=args.unlocked_layers,
        target=eval_set(args.target, args.target_classnames),
        reference=eval_set(args.reference, args.reference_classnames),
        wise_alphas=args.wise_alphas, overrides=overrides,
    )  # fmt: skip
    result = finetune(spec)
    print(f"fine-tuned model in {result.final_dir}")
    for k, v in result.eval_metrics.items():
        print(f"  {k}: {v:.4f}")
    if result.wise:
        print(f"WiSE-FT curve: {args.out}/wise_ft.png (table: wise_ft.md)")
        for row in result.wise:
            print("  " + ", ".join(f"{k}={v:.3f}" if k != "alpha" else f"alpha={v:g}" for k, v in row.items()))
    return 0
