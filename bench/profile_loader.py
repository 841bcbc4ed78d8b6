"""CPU time per image of each stage of mmcl's training loader, one process (`time.process_time`; + reaped workers).

    python -m bench.profile_loader                      # 224 px from 256 px shards, 512 samples
    python -m bench.profile_loader --image-size 64 --shard-px 64
    python -m bench.profile_loader --cprofile 25        # plus cProfile's top 25 functions of the whole stream

CPU time, not wall time: it stays meaningful on a machine other jobs share (`bench_loader.py` needs a quiet one).
Stages: tar read, caption (json + .txt), JPEG decode, crop + resize, to tensor + normalise, tokenise + collate;
then the whole `ShardStream` (what `bench_loader.py` times with 0 workers) and open_clip's decode + transform of
the same images for comparison. Shards are written once to data/bench/ (git-ignored).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import random
import time
from collections.abc import Callable
from typing import Any

from bench.common import DATA, synthetic_shards


def cpu_ms(fn: Callable[[], Any], n: int, repeats: int = 3, children: bool = False) -> float:
    """Best of `repeats` CPU milliseconds per item of `fn()` over `n` items (best: least disturbed by others).

    `children`: add the CPU time of child processes `fn` started and ended (loader workers).
    """

    def now() -> float:  # process_time resolves finer than os.times' clock ticks, which count reaped children
        t = os.times()
        return time.process_time() + (t.children_user + t.children_system if children else 0.0)

    best = float("inf")
    for _ in range(repeats):
        t0 = now()
        fn()
        best = min(best, now() - t0)
    return 1000 * best / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--shard-px", type=int, default=256)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--cprofile", type=int, default=0, help="print cProfile's top N functions of the stream")
    args = p.parse_args(argv)

    import open_clip
    import torch

    from mmcl.config import DataConfig, model_config
    from mmcl.data.decode import SkipCounter, decode_caption, decode_image, decode_json, image_bytes
    from mmcl.data.pipeline import build_stream
    from mmcl.data.reader import read_samples
    from mmcl.data.shards import _seed, make_loader
    from mmcl.models import build_model

    torch.set_num_threads(1)  # CPU per image, not the speed of a thread pool
    shards = synthetic_shards(
        DATA / f"profile_{args.shard_px}px_{args.samples}", args.samples, image_size=args.shard_px, maxcount=256
    )
    urls = [str(t) for t in sorted(shards.glob("*.tar"))]
    model = build_model(model_config({"preset": "clip-tiny-64", "image": {"image_size": args.image_size}}))
    stream = build_stream(DataConfig(batch_size=args.batch_size, shuffle_buffer=100), model, [str(shards)], train=True)
    decoder, collate = stream.sample_fn, stream.collate_fn
    transform = decoder.transform

    raws = list(read_samples(urls, SkipCounter()))
    n = len(raws)
    rngs = lambda: [random.Random(_seed(0, 0, r["__key__"])) for r in raws]  # noqa: E731
    pils = [decode_image(image_bytes(r), target_size=args.image_size) for r in raws]
    samples = [decoder(r, rng) for r, rng in zip(raws, rngs())]
    batches = [samples[i : i + args.batch_size] for i in range(0, n, args.batch_size)]

    stages: dict[str, float] = {}
    stages["tar read"] = cpu_ms(lambda: list(read_samples(urls, SkipCounter())), n)
    stages["caption"] = cpu_ms(lambda: [decode_caption(r, decode_json(r), "txt", random.Random(0)) for r in raws], n)
    stages["rng per sample"] = cpu_ms(rngs, n)
    stages["decode"] = cpu_ms(lambda: [decode_image(image_bytes(r), target_size=args.image_size) for r in raws], n)
    stages["crop + resize + tensor + normalise"] = cpu_ms(lambda: [transform(im, g) for im, g in zip(pils, rngs())], n)
    stages["decoder total (decode + transform)"] = cpu_ms(lambda: [decoder(r, g) for r, g in zip(raws, rngs())], n)
    stages["tokenise + collate"] = cpu_ms(lambda: [collate(b) for b in batches], n)
    stages["collate without tokenizer"] = cpu_ms(lambda: [type(collate)(None)(b) for b in batches], n)

    def whole_stream() -> None:
        for _ in stream:
            pass

    stream.start(type(stream.state)(), 1)
    n_stream = sum(len(b) for b in stream)
    stages["mmcl ShardStream, whole (0 workers)"] = cpu_ms(whole_stream, n_stream, repeats=2)

    def one_worker() -> None:  # + the worker's side of sending batches to this process (os.times counts it)
        for _ in make_loader(stream, 1):
            pass

    stages["mmcl loader, 1 worker (main + worker)"] = cpu_ms(one_worker, n_stream, repeats=2, children=True)

    oc = open_clip.image_transform(args.image_size, is_train=True)
    oc_tok = open_clip.get_tokenizer("RN50")

    def openclip_path() -> None:
        from PIL import Image

        for r in raws:
            oc(Image.open(io.BytesIO(r["jpg"])).convert("RGB"))
        for i in range(0, n, args.batch_size):
            oc_tok([r["txt"].decode() for r in raws[i : i + args.batch_size]])

    stages["open_clip decode + transform + tokenise"] = cpu_ms(openclip_path, n, repeats=2)

    print(f"{args.image_size} px from {args.shard_px} px shards, {n} samples, CPU ms per image (best of repeats):")
    for name, ms in stages.items():
        print(f"  {name:42s} {ms:6.3f}")
    if args.cprofile:
        prof = cProfile.Profile()
        prof.runcall(whole_stream)
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.cprofile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
