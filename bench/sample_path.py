"""The path one sample takes from the tar member to the loss value, counted from the code (README's "The tree").

    python -m bench.sample_path                  # a one-step `mmcl train` of clip-tiny on 64 built-in samples
    python -m bench.sample_path --out DIR        # also writes DIR/sample_path.json (every function entered)

Runs one optimizer step through the real `Trainer` with `data.num_workers=0` (the loader workers' code then runs
in this process, where `sys.setprofile` sees it) and records every call into `mmcl/` from the training loop's
first request for a batch to the return of the clip loss term; plus the call stacks at the tar read and at the
loss. Prints: the mmcl files and functions entered, and how many calls below the loop the loss and the tar
read sit.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from bench.common import REPO

PACKAGE = str(REPO / "mmcl") + "/"


class PathTracer:
    """A `sys.setprofile` hook recording calls into mmcl/ between the loop's batch request and the loss value."""

    def __init__(self) -> None:
        self.on = self.done = False
        self.calls: list[tuple[str, str]] = []
        self.stacks: dict[str, list[str]] = {}

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        file, name = frame.f_code.co_filename, frame.f_code.co_name
        if self.done or not file.startswith(PACKAGE):
            return
        where = file[len(str(REPO)) + 1 :]
        if event == "call":
            self.on = self.on or (name == "next" and where == "mmcl/data/pipeline.py")  # TrainBatches.next
            if not self.on:
                return
            self.calls.append((where, name))
            if where == "mmcl/data/reader.py" and name == "_samples":
                self.stacks.setdefault("read", _stack(frame))
            if where == "mmcl/losses/clip_loss.py" and type(frame.f_locals.get("self")).__name__ == "ClipLoss":
                self.stacks.setdefault("loss", _stack(frame))
        elif event == "return" and self.on and type(frame.f_locals.get("self")).__name__ == "ClipTerm":
            self.done = name == "forward"

    def summary(self) -> dict[str, Any]:
        def below_loop(stack: list[str]) -> list[str]:
            return stack[next(i for i, s in enumerate(stack) if s.endswith("trainer.py:_fit")) :]

        functions = list(dict.fromkeys(self.calls))
        named = [f for f in functions if not f[1].startswith("<")]  # comprehensions and generator expressions apart
        loss, read = below_loop(self.stacks["loss"]), below_loop(self.stacks["read"])
        return {
            "files": list(dict.fromkeys(f for f, _ in self.calls)),
            "functions": [f"{f}:{n}" for f, n in functions],
            "named_functions": len(named),
            "loop_to_loss": loss,
            "loop_to_read": read,
            "loss_calls_below_loop": sum(1 for s in loss if s.startswith("mmcl/")) - 1,
            "loss_torch_frames": sum(1 for s in loss if not s.startswith("mmcl/")),
            "read_calls_below_loop": sum(1 for s in read if s.startswith("mmcl/")) - 1,
            "read_torch_frames": sum(1 for s in read if not s.startswith("mmcl/")),
        }


def _stack(frame: Any) -> list[str]:
    """`file:function` of every frame, `torch:function` for frames outside mmcl/ (nn.Module calls, DataLoader)."""
    out = []
    for fs in traceback.extract_stack(frame):
        inside = fs.filename.startswith(PACKAGE)
        out.append(f"{fs.filename[len(str(REPO)) + 1 :] if inside else 'torch'}:{fs.name}")
    return out


def trace(work: Path) -> dict[str, Any]:
    from mmcl.config import load_experiment
    from mmcl.data.writer import write_synthetic_shards
    from mmcl.engine.trainer import Trainer

    shards = work / "shards"
    write_synthetic_shards(shards, 64, split="train", image_size=32, maxcount=64, num_workers=0, progress=False)
    cfg = load_experiment(None, [
        "model.preset=clip-tiny", f"data.train_shards=[{shards}]", "data.batch_size=8", "data.num_workers=0",
        "data.shuffle_buffer=8", "train.steps=1", "train.warmup_steps=1", "train.trackers=[none]",
        "train.progress=false", f"train.output_dir={work / 'run'}",
    ])  # fmt: skip
    trainer, tracer = Trainer(cfg), PathTracer()
    sys.setprofile(tracer)
    try:
        trainer.fit()
    finally:
        sys.setprofile(None)
    return tracer.summary()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="write OUT/sample_path.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sample_path_") as work:
        res = trace(Path(work))
    print(f"{len(res['files'])} mmcl files, {res['named_functions']} functions ({len(res['functions'])} with "
          f"comprehensions) from the loop's batch request to the loss value:")  # fmt: skip
    print("  " + ", ".join(res["files"]))
    print(f"loss value: {res['loss_calls_below_loop']} mmcl calls below the loop (+{res['loss_torch_frames']} of "
          "torch's nn.Module calls): " + " -> ".join(res["loop_to_loss"]))  # fmt: skip
    print(f"tar read: {res['read_calls_below_loop']} mmcl calls below the loop (+{res['read_torch_frames']} of "
          "torch's DataLoader): " + " -> ".join(res["loop_to_read"]))  # fmt: skip
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sample_path.json").write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
