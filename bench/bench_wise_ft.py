"""WiSE-FT on built-in data: pretrain a small CLIP on shapes, fine-tune it on digits, interpolate back.

    python -m bench.bench_wise_ft            # a few minutes on 2 CPU cores; bench/results/wise_ft.{json,md,png}
    python -m bench.bench_wise_ft --tiny     # seconds-long check of the script (temp folder)

1. Pretrain `clip-tiny-nfnet` (timm's normalizer-free test_nfnet image tower at 32 px: a tiny ViT cannot
   learn shape on this budget, see recipe.md) on the built-in synthetic shapes (40 colour-shape classes).
2. `mmcl.finetune.finetune` on scikit-learn's digits (the 4 in 5 train split): FLYP captions, i.e. the ten
   class names in the 'short' templates, with the start model's CLIP loss.
3. WiSE-FT: for alpha in 0..1, the weights (1 - alpha) * start + alpha * fine-tuned, zero-shot top-1 on
   the digits test split (target, 360 images) and the held-out shapes (reference).
Fixed optimizer steps: the accuracies do not depend on machine load, the wall times do.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import DATA, RESULTS, machine_info, reproduce_command, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pre-steps", type=int, default=300)
    parser.add_argument("--ft-steps", type=int, default=100)
    parser.add_argument("--ft-lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on shared cores)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-shapes", type=int, default=8000)
    parser.add_argument("--alphas", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long check (temp folder, no results)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    if args.tiny:
        args.pre_steps, args.ft_steps, args.n_shapes, args.batch_size = 4, 4, 256, 16
    tmp = Path(tempfile.mkdtemp()) if args.tiny else None
    root = tmp or DATA / "wise_ft"
    out = tmp or RESULTS
    try:
        run(args, root, out)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp)


def run(args: argparse.Namespace, root: Path, out: Path) -> None:
    from mmcl.config import EvalConfig, load_experiment
    from mmcl.data.writer import make_demo_data, write_real_shards
    from mmcl.engine.trainer import train
    from mmcl.finetune import FinetuneSpec, finetune, write_wise_ft

    info = machine_info()
    t0 = time.perf_counter()
    shapes = make_demo_data(root / f"shapes-{args.n_shapes}", n_train=args.n_shapes, n_val=500, image_size=32)
    digits_train = root / "digits-train"
    digits_test = root / "digits-test"
    write_real_shards(digits_train, "digits", split="train", image_size=32, progress=False)
    write_real_shards(digits_test, "digits", split="test", image_size=32, progress=False)
    t_data = time.perf_counter() - t0
    pre_dir = root / f"pre-{args.pre_steps}-{args.n_shapes}"
    common = ["train.trackers=[none]", "train.progress=false", "data.num_workers=1"]
    pre = load_experiment(
        None,
        ["model.preset=clip-tiny-nfnet", f"data.train_shards=[{shapes / 'train'}]",
         f"data.batch_size={args.batch_size}", f"train.steps={args.pre_steps}", "train.lr=2e-3",
         "train.warmup_steps=30", f"train.ckpt_every={args.pre_steps}", f"train.output_dir={pre_dir}", *common],
    )  # fmt: skip
    t0 = time.perf_counter()
    train(pre)
    t_pre = time.perf_counter() - t0
    target = EvalConfig(shards=[str(digits_test)], templates="short")
    reference = EvalConfig(shards=[str(shapes / "val")], templates="short")
    ft_dir = root / f"ft-{args.pre_steps}-{args.ft_steps}-{args.ft_lr:g}-{args.batch_size}"
    shutil.rmtree(ft_dir, ignore_errors=True)  # fine-tuning always reruns (it is the measurement)
    spec = FinetuneSpec(
        start=str(pre_dir), train_shards=[str(digits_train)], out_dir=str(ft_dir), templates="short",
        steps=args.ft_steps, lr=args.ft_lr, warmup_steps=max(1, args.ft_steps // 10), batch_size=args.batch_size,
        num_workers=1, target=target, reference=reference,
        wise_alphas=[float(a) for a in args.alphas.split(",")], overrides=common,
    )  # fmt: skip
    t0 = time.perf_counter()
    result = finetune(spec, progress=False)
    t_ft = time.perf_counter() - t0
    rows = result.wise
    title = "WiSE-FT: shapes-pretrained CLIP fine-tuned on digits"
    write_wise_ft(rows, out / "wise_ft", title=title)  # the curve (wise_ft.png); json and md are rewritten below
    start, end = rows[0], rows[-1]
    mid = min(rows, key=lambda r: abs(r["alpha"] - 0.5))
    intro = f"""`clip-tiny-nfnet` (32 px) pretrained {args.pre_steps} steps x {args.batch_size} on {args.n_shapes:,} built-in
shapes (lr 2e-3), then fine-tuned {args.ft_steps} steps x {args.batch_size} on the 1,437 scikit-learn digits of the
train split with FLYP captions (the class names in the 7 'short' templates, CLIP loss, lr {args.ft_lr:g}).
Zero-shot top-1 ('short' templates) on the 360 digits of the test split (10 classes, chance 10%) and on 500
held-out shapes (40 classes, chance 2.5%) for the weights (1 - alpha) * start + alpha * fine-tuned."""
    notes = f"""Fine-tuning took digits from {start["target_top1"]:.1%} to {end["target_top1"]:.1%}; shapes went from
{start["reference_top1"]:.1%} to {end["reference_top1"]:.1%}. At alpha {mid["alpha"]:g} the model keeps
{mid["reference_top1"] / max(start["reference_top1"], 1e-9):.0%} of the start's shapes accuracy with digits at
{mid["target_top1"]:.1%}. Curve: `wise_ft.png` (x: shapes, y: digits, one point per alpha).

Wall time: data {t_data:.0f} s, pretraining {t_pre:.0f} s, fine-tuning + WiSE-FT evaluation {t_ft:.0f} s."""
    write_results(
        "wise_ft",
        [[f"{r['alpha']:g}", f"{r['target_top1']:.1%}", f"{r['reference_top1']:.1%}"] for r in rows],
        ["alpha", "digits top-1 (target)", "shapes top-1 (reference)"],
        title,
        notes,
        info,
        intro=intro,
        data={"wise": rows, "args": vars(args), "seconds": {"data": t_data, "pretrain": t_pre, "finetune": t_ft}},
        command=reproduce_command("bench_wise_ft.py"),
        out_dir=out,
    )


if __name__ == "__main__":
    main()
