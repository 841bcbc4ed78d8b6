"""Resume in constant time: how long a resampled run takes to deliver its first batch after a restart at sample N.

A run is advanced to (at least) sample N with a loader that reads but does not decode, its `StreamState` saved
as a checkpoint would save it, then resumed twice: seeking to the saved positions (shard, byte offset and the
shuffle buffer of every worker) and replaying the stream without decoding (what a checkpoint without positions
does, and what mmcl did before positions existed). Both resumed runs must deliver the same first batch.
Results: bench/results/resume.{json,md}.

    python -m bench.bench_resume            # N = 1,000,000 small images (resampled over 100k on disk)
    python -m bench.bench_resume --tiny     # a seconds-long check of the script, not a measurement
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    DATA,
    RESULTS,
    machine_info,
    reproduce_command,
    wait_for_quiet,
    write_results,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--at", type=int, default=1_000_000, help="resume at this sample (all workers together)")
    p.add_argument("--shards", type=int, default=20, help="shards on disk (drawn with replacement)")
    p.add_argument("--per-shard", type=int, default=5000, help="samples per shard")
    p.add_argument("--image-px", type=int, default=32, help="side of the stored JPEGs")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--data-dir", type=Path, default=DATA)
    p.add_argument("--results", type=Path, default=None, help=f"default {RESULTS} (a temp folder with --tiny)")
    p.add_argument("--no-wait", action="store_true", help="do not wait for a 1-min load average below 1.5")
    p.add_argument("--tiny", action="store_true", help="seconds-long check of the script, not a measurement")
    args = p.parse_args(argv)
    if args.tiny:
        args.at, args.shards, args.per_shard, args.batch_size, args.shuffle_buffer = 3000, 4, 250, 32, 100
        args.no_wait = True
        args.data_dir = Path(tempfile.mkdtemp(prefix="bench_resume_data_"))
    if args.results is None:
        args.results = Path(tempfile.mkdtemp(prefix="bench_resume_")) if args.tiny else RESULTS
    return args


def write_data(args: argparse.Namespace) -> Path:
    """Shards of small JPEGs + captions (64 distinct images, re-used: only reading speed matters here)."""
    import numpy as np
    from PIL import Image

    out = args.data_dir / f"resume_{args.shards}x{args.per_shard}_{args.image_px}px"
    sizes = {f"{s:05d}.tar": args.per_shard for s in range(args.shards)}
    if (out / "sizes.json").is_file() and json.loads((out / "sizes.json").read_text()) == sizes:
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(64):
        buf = io.BytesIO()
        pixels = rng.integers(0, 255, (args.image_px, args.image_px, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
    for s in range(args.shards):
        tmp = out / f".{s:05d}.tar.tmp"
        with tarfile.open(tmp, "w") as tar:
            for i in range(args.per_shard):
                key = f"{s:05d}{i:05d}"
                for ext, data in (("jpg", jpegs[i % 64]), ("txt", f"a small image number {key}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, out / f"{s:05d}.tar")
    (out / "sizes.json").write_text(json.dumps(sizes))
    return out


def keep_key(raw: dict[str, Any], rng) -> dict[str, Any]:
    """The sample function of this benchmark: no decoding (resume cost is about reaching the position)."""
    return {"key": raw["__key__"]}


def collate_keys(samples: list[dict[str, Any]]):
    from mmcl.data.batch import Batch

    return Batch(keys=[s["key"] for s in samples])


def make_stream(shards: Path, args: argparse.Namespace):
    from mmcl.data.shards import ShardStream, expand_shards

    return ShardStream(
        [expand_shards(str(shards))],
        keep_key,
        collate_keys,
        args.batch_size,
        resampled=True,
        shuffle_buffer=args.shuffle_buffer,
        seed=0,
    )


def advance(shards: Path, args: argparse.Namespace):
    """The StreamState of a run that has consumed at least `args.at` samples, and how long reaching it took."""
    from mmcl.data.shards import StreamState, make_loader

    stream, state = make_stream(shards, args), StreamState()
    t0 = time.perf_counter()
    for batch in make_loader(stream, args.workers):
        state.record(batch, stream.num_workers)
        if sum(state.consumed.values()) >= args.at:
            break
    return StreamState.from_dict(json.loads(json.dumps(state.to_dict()))), time.perf_counter() - t0


def first_batch(shards: Path, args: argparse.Namespace, state) -> tuple[list[str], float]:
    """Keys of the first batch after a resume from `state`, and seconds from building the loader to it."""
    from mmcl.data.shards import make_loader

    t0 = time.perf_counter()
    batch = next(iter(make_loader(make_stream(shards, args), args.workers, state)))
    return batch.keys, time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mmcl.data.shards import StreamState

    skipped = {"quiet": False, "threshold": None, "waited_s": 0, "load_history": [round(os.getloadavg()[0], 2)]}
    load = skipped if args.no_wait else wait_for_quiet()
    shards = write_data(args)
    state, reach_s = advance(shards, args)
    _, fresh_s = first_batch(shards, args, StreamState())
    seek_keys, seek_s = first_batch(shards, args, state)
    old = state.to_dict()
    old.pop("positions")
    replay_keys, replay_s = first_batch(shards, args, StreamState.from_dict(old))
    if seek_keys != replay_keys:
        raise SystemExit("seek and replay resumed at different samples: the resume is not exact")
    load["loadavg_end"] = list(os.getloadavg())
    return {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "position": {"consumed_per_worker": state.consumed, "total": sum(state.consumed.values())},
        "seconds": {
            "reach_position": round(reach_s, 3),
            "fresh_first_batch": round(fresh_s, 3),
            "resume_seek": round(seek_s, 3),
            "resume_replay": round(replay_s, 3),
        },
        "checkpoint_bytes_data_state": len(json.dumps(state.to_dict())),
        "machine": machine_info(),
        "load": load,
        "command": reproduce_command("bench_resume.py"),
        "tiny": args.tiny,
    }


def write(res: dict[str, Any], out: Path | None) -> tuple[Path, Path]:
    """bench/results/resume.{json,md} (or `out`) through the one results writer."""
    s, sec = res["settings"], res["seconds"]
    row = [
        f"{res['position']['total']:,}",
        f"{sec['resume_seek']:.2f}",
        f"{sec['resume_replay']:.2f}",
        f"{sec['resume_replay'] / max(sec['resume_seek'], 1e-9):.0f}x",
        f"{sec['fresh_first_batch']:.2f}",
        f"{res['checkpoint_bytes_data_state']:,}",
    ]
    note = "**--tiny run: a check of the script, not a measurement.**\n\n" if res["tiny"] else ""
    intro = f"""{note}Time from building the loader to its first batch after a restart at the position shown: `seek` uses the
positions saved in the checkpoint (per worker: shard, byte offset, shuffle buffer of {s["shuffle_buffer"]}
entries re-read one seek each); `replay` is a checkpoint without positions (reads, never decodes, every
sample up to there). Both deliver the same first batch (checked). {s["workers"]} loader worker(s), batch
{s["batch_size"]}, {s["shards"]} shards x {s["per_shard"]} JPEGs of {s["image_px"]} px drawn with
replacement; no decoding in either path (the cost measured is reaching the position). "fresh start" is the
first batch of a new run (worker start-up and shuffle-buffer fill), the floor for any resume."""
    columns = ["resumed at sample", "seek (s)", "replay (s)", "replay / seek", "fresh start (s)", "data state (bytes)"]
    return write_results("resume", [row], columns, "Resume: seek vs replay (resampled stream)",
                         machine=res["machine"], intro=intro, data=res, load=res["load"], command=res["command"],
                         out_dir=out)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    write(run(args), args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
