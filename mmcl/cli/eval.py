"""`mmcl eval TASK RUN --shards ...`: evaluate a run folder or checkpoint, write a report.

TASK: zeroshot, retrieval, captions, compositional, linear-probe, knn."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmcl.data.decode import MAX_PIXELS, describe_counts

TASKS = {
    "zeroshot": "zero-shot classification of labelled images (top-1/top-5, mean per-class recall)",
    "retrieval": "image<->text retrieval on captioned images (recall@k, median rank)",
    "captions": "caption generation scored with BLEU-4, ROUGE-L and CIDEr-D",
    "compositional": "each image's caption against hard negative captions (SugarCrepe files, or made from the "
    "attributes of labelled captions such as the built-in shapes): accuracy per subset, chance 50%",
    "linear-probe": "logistic regression on frozen image features (CLIP_benchmark's protocol: weight-decay sweep "
    "on a validation split), fitted on --shards, scored on --test-shards",
    "knn": "weighted k-nearest-neighbour classification on frozen image features (DINO's: k 20, T 0.07), "
    "bank from --shards, queries from --test-shards",
}


def int_at_least(minimum: int):
    """An argparse type: an integer >= `minimum`, else one line saying what was given."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)  # a batch size, a k
non_negative_int = int_at_least(0)  # 0 meaning 'all' or 'none'


PROBES = {"linear-probe": "linear_probe", "knn": "knn"}


def report_dir(args: argparse.Namespace, task: str) -> Path:
    """--out, else RUN/eval/TASK for an mmcl run; a transformers / open_clip folder or a hub name is not ours
    to write into: ./eval/NAME/TASK."""
    if args.out:
        return Path(args.out)
    run = Path(args.run)
    foreign = not run.is_dir() or (
        not (run / "config.yaml").is_file()
        and ((run / "config.json").is_file() or (run / "open_clip_config.json").is_file())
    )
    if foreign:
        name = run.resolve().name if run.is_dir() else args.run.split(":", 1)[-1].strip("/").replace("/", "_")
        return Path("eval") / name / task
    return run / "eval" / task


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model: zero-shot, retrieval, captioning, compositional, linear probe, k-NN",
        description="Evaluate a run folder (or checkpoint folder) and write eval.json, eval.md and plots.",
    )
    sub = p.add_subparsers(dest="eval_task", metavar="TASK", required=True)
    for name, help_text in TASKS.items():
        t = sub.add_parser(name, help=help_text.replace("%", "%%"), description=help_text)  # help is %-formatted
        t.add_argument(
            "run",
            help="model: an mmcl run (runs/NAME) or checkpoint folder, a transformers or open_clip folder, "
            "hf:ORG/NAME or hf-hub:ORG/NAME",
        )
        t.add_argument(
            "--shards",
            "--data",
            nargs="+",
            required=name != "compositional",
            help="tar shards (paths, globs, {000..009} patterns, folders), an image-folder tree, or a CLIP_benchmark root"
            + (" (the training split of the probe)" if name in PROBES else ""),
        )
        t.add_argument("--out", help="report folder (default: RUN/eval/TASK)")
        t.add_argument("--split", default="test", help="split folder of a CLIP_benchmark root (default: test)")
        t.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
        t.add_argument("--max-samples", type=non_negative_int, default=0, help="stop after this many images (0 = all)")
        t.add_argument("--workers", type=non_negative_int, default=0, help="data loader processes decoding images")
        t.add_argument("--max-pixels", type=positive_int, default=MAX_PIXELS, help="skip larger images unread")
        t.add_argument("--quiet", action="store_true", help="no progress bar")
        if name == "zeroshot":
            t.add_argument("--classnames", help="class names file, one per line (default: found with the data)")
            t.add_argument(
                "--templates",
                help="'openai' (80), 'short' (7), 'cifar' (18), 'none', or a file with one template per line "
                "holding {} (default: the data's own templates if any, else openai)",
            )
            t.add_argument("--label-key", default="label", help="key of the label in each sample's .json")
        if name == "retrieval":
            t.add_argument("--ks", type=positive_int, nargs="+", default=[1, 5, 10], help="recall@k cut-offs")
            t.add_argument(
                "--chunk-size", type=positive_int, default=1024, help="queries x gallery block size of the scoring"
            )
        if name == "compositional":
            t.add_argument("--sugarcrepe", metavar="DATA_ROOT", help="SugarCrepe's data/ folder instead of --shards")
            t.add_argument("--images", help="folder of the images SugarCrepe's entries name (COCO val2017)")
            t.add_argument("--subsets", nargs="+", help="SugarCrepe subsets to read (default: every file found)")
            t.add_argument("--max-pairs", type=non_negative_int, default=0, help="pairs per subset (0 = all)")
            t.add_argument(
                "--counterfactuals",
                type=positive_int,
                metavar="N",
                help="instead of captions: N built-in test scenes and their counterfactual images, scored with "
                "Winoground's text, image and group scores",
            )
            t.add_argument("--image-size", type=positive_int, default=64, help="side of the built-in scenes")
        if name in ("zeroshot", "retrieval", "compositional"):
            t.add_argument("--text-batch-size", type=positive_int, default=256, help="texts per forward pass")
        if name in PROBES:
            t.add_argument("--test-shards", nargs="+", required=True, help="the labelled split the probe is scored on")
            t.add_argument("--classnames", help="class names file, one per line (default: found with the data)")
            t.add_argument("--label-key", default="label", help="key of the label in each sample's .json")
        if name == "linear-probe":
            t.add_argument("--fewshot-k", type=int, default=-1, help="training samples per class (-1 = all)")
            t.add_argument(
                "--val-proportion",
                type=float,
                default=0.2,
                help="share of the training split held out for the weight-decay sweep (0 = no sweep, wd 0)",
            )
            t.add_argument("--epochs", type=positive_int, default=10, help="passes over the training features")
            t.add_argument("--lr", type=float, default=0.1, help="AdamW learning rate (cosine schedule)")
            t.add_argument("--seed", type=int, default=0, help="seed of the split, the init and the order")
        if name == "knn":
            t.add_argument("-k", "--k", type=positive_int, default=20, help="neighbours that vote")
            t.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(similarity / T)")
        if name == "captions":
            t.add_argument("--num-beams", type=int, default=None, help="beam width passed to generate()")
            t.add_argument("--max-new-tokens", type=int, default=None, help="caption length limit passed to generate()")
        t.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmcl.eval.datasets import open_eval_dataset
    from mmcl.eval.runner import evaluate_captions, evaluate_retrieval, evaluate_zero_shot
    from mmcl.eval.templates import load_templates
    from mmcl.inference import load_pipeline
    from mmcl.utils import UserError

    task = args.eval_task
    if task == "compositional":
        return run_compositional(args)
    if task in PROBES:
        return run_probe(args)
    common = dict(
        batch_size=args.batch_size, max_samples=args.max_samples, num_workers=args.workers, progress=not args.quiet
    )
    settings = {"model": str(args.run), "data": " ".join(args.shards), "max_samples": args.max_samples or "all"}
    dataset = open_eval_dataset(
        args.shards,
        classnames=getattr(args, "classnames", None),
        label_key=getattr(args, "label_key", "label"),
        split=args.split,
        max_pixels=args.max_pixels,
    )
    if task == "zeroshot":
        if not dataset.classnames:
            raise UserError("no class names: pass --classnames FILE or put classnames.txt beside the shards")
        if args.templates:
            templates, settings["templates"] = load_templates(args.templates), args.templates
        elif dataset.templates:
            templates, settings["templates"] = dataset.templates, "from the dataset"
        else:
            templates, settings["templates"] = load_templates("openai"), "openai"
        pipeline = load_pipeline(args.run)
        results = evaluate_zero_shot(
            pipeline, dataset, dataset.classnames, templates, text_batch_size=args.text_batch_size, **common
        )
    elif task == "retrieval":
        pipeline = load_pipeline(args.run)
        results = evaluate_retrieval(
            pipeline,
            dataset,
            ks=tuple(args.ks),
            chunk_size=args.chunk_size,
            text_batch_size=args.text_batch_size,
            **common,
        )
    else:
        gen = {
            k: v for k, v in (("num_beams", args.num_beams), ("max_new_tokens", args.max_new_tokens)) if v is not None
        }
        settings.update(gen)
        pipeline = load_pipeline(args.run)
        results = evaluate_captions(pipeline, dataset, generate_kwargs=gen, **common)
    return report_metrics(args, task, results, settings)


def report_metrics(args: argparse.Namespace, task: str, results: dict, settings: dict) -> int:
    """Write the report of `results` and print its metrics, what was skipped and where the report is."""
    from mmcl.eval.report import write_report

    written = write_report(results, report_dir(args, task), title=f"{task} evaluation of {args.run}", settings=settings)
    for k, v in results["metrics"].items():
        print(f"{k:>24}  {v:.4f}" if isinstance(v, float) else f"{k:>24}  {v}")
    if results.get("skipped"):
        print(f"{'skipped':>24}  {describe_counts(results['skipped'])}")
    print(f"report: {written['eval.md']}")
    return 0


def run_compositional(args: argparse.Namespace) -> int:
    from mmcl.eval.compositional import evaluate_compositional, generated_pairs, sugarcrepe_pairs
    from mmcl.eval.datasets import open_eval_dataset
    from mmcl.eval.report import compositional_table, write_report
    from mmcl.inference import load_pipeline
    from mmcl.utils import UserError

    if args.counterfactuals:
        return run_group_scores(args)
    if bool(args.sugarcrepe) == bool(args.shards):
        raise UserError(
            "give either --shards (labelled captions with attributes), --sugarcrepe DATA_ROOT --images "
            "or --counterfactuals N (built-in scenes)"
        )
    if args.sugarcrepe:
        if not args.images:
            raise UserError("--sugarcrepe needs --images: the folder of the images its entries name (COCO val2017)")
        pairs = sugarcrepe_pairs(args.sugarcrepe, args.images, args.subsets, max_per_subset=args.max_pairs)
        data = f"{args.sugarcrepe} (images {args.images})"
    else:
        dataset = open_eval_dataset(args.shards, split=args.split, max_pixels=args.max_pixels)
        data = " ".join(args.shards)
        pairs = generated_pairs(dataset, args.max_pairs, args.max_samples, source=f"generated from {data}")
    pipeline = load_pipeline(args.run)
    results = evaluate_compositional(
        pipeline,
        pairs,
        batch_size=args.batch_size,
        text_batch_size=args.text_batch_size,
        max_pixels=args.max_pixels,
        progress=not args.quiet,
    )
    out = report_dir(args, "compositional")
    settings = {"model": str(args.run), "data": data, "max_pairs per subset": args.max_pairs or "all"}
    written = write_report(results, out, title=f"compositional evaluation of {args.run}", settings=settings)
    print(compositional_table(results), end="")
    if results.get("skipped"):
        print(f"skipped: {describe_counts(results['skipped'])}")
    print(f"report: {written['eval.md']}")
    return 0


def run_probe(args: argparse.Namespace) -> int:
    from mmcl.eval.datasets import open_eval_dataset
    from mmcl.eval.linear_probe import ProbeSettings
    from mmcl.eval.runner import evaluate_probe
    from mmcl.inference import load_pipeline

    method = PROBES[args.eval_task]

    def open_split(shards: list[str], split: str):
        return open_eval_dataset(
            shards, classnames=args.classnames, label_key=args.label_key, split=split, max_pixels=args.max_pixels
        )

    train = open_split(args.shards, "train" if args.split == "test" else args.split)
    test = open_split(args.test_shards, args.split)
    settings = {"model": str(args.run), "train data": " ".join(args.shards), "test data": " ".join(args.test_shards)}
    options: dict = {}
    if method == "linear_probe":
        options = dict(
            settings=ProbeSettings(lr=args.lr, epochs=args.epochs, seed=args.seed),
            fewshot_k=args.fewshot_k,
            val_proportion=args.val_proportion,
        )
        settings.update(fewshot_k=args.fewshot_k, val_proportion=args.val_proportion, epochs=args.epochs, lr=args.lr)
    else:
        options = dict(k=args.k, temperature=args.temperature)
        settings.update(k=args.k, temperature=args.temperature)
    pipeline = load_pipeline(args.run)
    results = evaluate_probe(
        method,
        pipeline,
        train,
        test,
        classnames=train.classnames,
        batch_size=args.batch_size,
        max_samples=args.max_samples,
        num_workers=args.workers,
        progress=not args.quiet,
        **options,
    )
    return report_metrics(args, args.eval_task, results, settings)


def run_group_scores(args: argparse.Namespace) -> int:
    from mmcl.eval.group_scores import counterfactual_groups, evaluate_group_scores, group_table
    from mmcl.eval.report import write_report
    from mmcl.inference import load_pipeline

    groups = counterfactual_groups(args.counterfactuals, image_size=args.image_size, subsets=args.subsets)
    pipeline = load_pipeline(args.run)
    results = evaluate_group_scores(pipeline, groups, batch_size=args.batch_size, text_batch_size=args.text_batch_size)
    out = report_dir(args, "counterfactual")
    settings = {"model": str(args.run), "data": f"{args.counterfactuals} built-in test scenes + counterfactuals"}
    written = write_report(results, out, title=f"counterfactual group scores of {args.run}", settings=settings)
    print(group_table(results), end="")
    print(f"report: {written['eval.md']}")
    return 0
