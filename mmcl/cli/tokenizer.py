"""`mmcl tokenizer train SHARDS_OR_TXT... --vocab-size 1000 --out tokenizer.json`."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tokenizer",
        help="train a small BPE/WordPiece tokenizer on captions",
        description="Tokenizer tools. `train` learns a vocabulary from the captions of shards or text files "
        "and writes a tokenizer.json that model.text.tokenizer can point at.",
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser(
        "train",
        help="train on captions of shards / text files",
        description="Train a tokenizer (HF `tokenizers`) on captions. Inputs: .tar shards, directories of "
        "shards, glob or brace patterns ('data/{00000..00009}.tar'), or .txt files with one caption per line.",
    )
    t.add_argument("inputs", nargs="+", metavar="SHARDS_OR_TXT", help="shards, shard patterns or caption files")
    t.add_argument("--out", required=True, help="where to write tokenizer.json")
    t.add_argument("--vocab-size", type=int, default=1000, help="target vocabulary size (default 1000)")
    t.add_argument("--kind", choices=["bpe", "wordpiece"], default="bpe", help="model type (default bpe)")
    t.add_argument("--min-frequency", type=int, default=2, help="minimum pair/word count to merge (default 2)")
    t.add_argument("--no-lowercase", action="store_true", help="keep case (default: lowercase everything)")
    t.add_argument("--caption-key", default="txt", help="'txt' member or a key of the sample .json")
    t.add_argument("--max-samples", type=int, default=0, help="read at most this many captions (0 = all)")
    t.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmcl.cli._paths import require_output_file
    from mmcl.data.tokenizer_train import train_tokenizer_file

    require_output_file(args.out, "--out")

    summary = train_tokenizer_file(
        args.inputs,
        args.out,
        vocab_size=args.vocab_size,
        kind=args.kind,
        min_frequency=args.min_frequency,
        lowercase=not args.no_lowercase,
        caption_key=args.caption_key,
        max_samples=args.max_samples,
    )
    print(f"wrote {summary['path']}: {summary['kind']} tokenizer with {summary['vocab_size']} tokens")
    return 0
