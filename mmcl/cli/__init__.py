"""`mmcl <command> ...`: a thin argparse layer over the library.

Each command lives in its own module exposing `register(subparsers)`, which
adds a parser whose `func` default takes the parsed args and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "shards": "mmcl.cli.shards",
    "train": "mmcl.cli.train",
    "finetune": "mmcl.cli.finetune",
    "eval": "mmcl.cli.eval",
    "tokenizer": "mmcl.cli.tokenizer",
    "index": "mmcl.cli.index",
    "app": "mmcl.cli.app",
    "export": "mmcl.cli.export",
    "demo": "mmcl.cli.demo",
}


def _version() -> str:
    """The installed distribution's version (what pip reports), else the package's own."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmcl")
    except PackageNotFoundError:  # imported from a checkout without installing it
        from mmcl import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmcl",
        description="Multimodal image-text pretraining: write shards, train CLIP/SigLIP/PrefixLM, evaluate, serve.",
    )
    parser.add_argument("--version", action="version", version=f"mmcl {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS.values():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue  # command not built yet
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mmcl.utils import UserError, setup_logging

    setup_logging()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot take KEY=VALUE positionals after an option; gather the stragglers here
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError) as e:
        print(f"mmcl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: one line (the trainer's says where it stopped), no traceback
        print(f"mmcl {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return 130
