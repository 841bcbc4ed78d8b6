"""`mmcl app [RUN] [--index DIR] [--allow-runs RUN ...] [--port N] [--host 127.0.0.1]`: serve the Gradio app."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "app",
        help="serve the Gradio app: zero-shot, retrieval, captioning",
        description="Serve a trained model in a browser app. With no RUN, serves runs/demo (made by `mmcl demo`) "
        "and its index runs/demo/index when present.",
    )
    p.add_argument("run", nargs="?", help="run folder or checkpoint folder (default: runs/demo)")
    p.add_argument("--index", help="index folder from `mmcl index build` (default: RUN/index when it exists)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--open-clip", default="", metavar="NAME", help="serve an open_clip model instead, e.g. ViT-B-32")
    p.add_argument(
        "--pretrained", default="", metavar="TAG", help="open_clip pretrained tag (downloads: needs internet)"
    )
    p.add_argument("--max-file-size", default="20mb", help="upload size limit (default 20mb)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="refuse larger images before decoding them")
    p.add_argument("--concurrency", type=int, default=2, help="requests computed at once; the rest queue (default 2)")
    p.add_argument("--queue-size", type=int, default=64, help="requests that may wait in the queue (default 64)")
    p.add_argument("--auth", metavar="USER:PASSWORD", help="require this login (Gradio auth); use it off localhost")
    p.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="another web origin allowed to call the server, e.g. https://example.org (default: only its own)",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name the server may be reached under besides localhost and --host, e.g. a LAN name; repeatable "
        "(other names are refused: DNS rebinding)",
    )
    p.add_argument(
        "--allow-runs",
        nargs="+",
        default=[],
        metavar="RUN",
        help="other run folders a visitor may switch their own browser tab to (default: none, no model picker)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmcl.extras import require_app

    require_app("mmcl app")
    from mmcl.app import launch
    from mmcl.app.guard import parse_auth

    auth = parse_auth(args.auth) if args.auth else None

    launch(
        args.run,
        args.index,
        host=args.host,
        port=args.port,
        share=args.share,
        open_clip=args.open_clip,
        pretrained=args.pretrained,
        max_file_size=args.max_file_size,
        max_pixels=args.max_pixels,
        concurrency=args.concurrency,
        queue_size=args.queue_size,
        allow_runs=tuple(args.allow_runs),
        auth=auth,
        allowed_origins=tuple(args.allow_origin),
        allowed_hosts=tuple(args.allow_host),
    )
    return 0
