"""The GPU check: what the first minutes on a GPU should measure, in one command (`bash bench/gpu_check.sh OUT`).

    bash bench/gpu_check.sh OUT            # one CUDA GPU, at most 8 minutes -> OUT/gpu_check.json + a table
    bash bench/gpu_check.sh --smoke OUT    # the whole script on CPU with tiny models (seconds): CI runs it

Rows, in the order they run (a row that no longer fits the time budget is skipped, and says so):

- `train MODEL LIB compile=off|on`: ViT-B/32 and ViT-B/16, mmcl against open_clip, same GPU, same batch
  (random images, captions filling the 77-token context: `synthetic_captions`),
  bf16 autocast over fp32 weights, AdamW, gradient clipping at mmcl's default (1.0) for both. mmcl: the
  trainer's own objects (`mmcl.engine.trainer.Trainer`: accelerator, task, optimizer, `train.compile`) and
  its step (`Task.step`, clip, `optimizer.step`); open_clip: the step of `open_clip_train.train`
  (autocast forward, `ClipLoss`, backward, clip, step, logit-scale clamp), its optimizer groups, and
  `torch.compile(model)` as its `--torchcompile` does. Batches are random tensors already on the GPU: the
  loader is measured on its own rows. Reported: samples/s and step time over the timed steps, MFU = model
  FLOPs of one step (counted by `torch.utils.flop_counter.FlopCounterMode` on the eager step: matmuls,
  convolutions, attention; each library's own count: mmcl's class-token shortcut runs the last ViT block for
  one token, so its count is a few percent lower for the same architecture, and samples/s is the fair
  comparison) / step time / the GPU's dense bf16 peak (looked up from its name, `PEAK_TFLOPS`), and peak memory (`torch.cuda.max_memory_allocated`, weights + optimizer state + activations).
- `loader 224px decode_on=workers|device`, `device decode only 224px`: images/s of the loader at 224 px from
  256 px JPEG shards with one worker per core (`gpu_decode_check.throughput`), and the device path's
  pixel parity with the worker path (`gpu_decode_check.compare`).

Without CUDA (and without --smoke) every row is skipped with the reason. With --smoke everything runs on
CPU: tiny models (mmcl clip-tiny-64 and its open_clip twin stand in for both ViTs), fp32, batch 8, one
timed step, `torch.compile` with dynamo's eager backend (inductor's C++ build takes minutes on a CPU), the
"device" decode on the CPU. Smoke numbers check the script, not the hardware.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import common

# dense bf16 tensor-core peaks (no sparsity), TFLOPS, from the vendors' data sheets; first match in the name wins
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (HBM3)
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A6000", 155.0),
    ("RTX 4090", 165.0),
]

MODELS = {  # row label -> (mmcl preset, open_clip name); --smoke: the tiny twins for both
    "ViT-B/32": ("vit-b-32", "ViT-B-32"),
    "ViT-B/16": ("vit-b-16", "ViT-B-16"),
}
SMOKE_MODELS = ("clip-tiny-64", common.OPENCLIP_TINY_NAME)
LIBS = ("mmcl", "open_clip")
ROW_COST_S = {"eager": 45.0, "compile": 150.0, "loader": 60.0}  # H100 estimates, for the time budget
TARGETS = {"mmcl_over_open_clip": 1.2, "vit_b_32_mfu": 0.45}


@dataclass
class Row:
    """One line of the table; `status` is 'ok', 'skipped' or 'failed', with the reason in `note`."""

    name: str
    kind: str  # 'eager' | 'compile' | 'loader'
    status: str = "pending"
    note: str = ""
    model: str = ""
    samples_per_s: float | None = None
    step_ms: float | None = None
    flops_per_step: float | None = None
    mfu: float | None = None
    peak_mem_gib: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def peak_tflops(device_name: str, override: float | None) -> float | None:
    """The GPU's dense bf16 peak from its name (`torch.cuda.get_device_name`), or `override`."""
    if override:
        return override
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _count_flops(step: Callable[[], None]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------- the two trainers' steps

WORDS = ["a", "photo", "of", "red", "green", "blue", "circle", "square", "star", "cross", "on", "the", "left",
         "right", "top", "of", "a", "white", "background"]  # fmt: skip


def synthetic_captions(n: int, words: int = 100) -> list[str]:
    """Captions longer than the 77-token context, so both libraries run the text tower on the full context:
    mmcl cuts padding to the batch's longest caption and open_clip does not, so short captions would credit
    mmcl with text work it skips. Real captions are mostly shorter than the context, where that cut is a real
    saving; this check compares equal work."""
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(words)) for i in range(n)]


def mmcl_step(
    preset: str, batch: int, compile: bool, shards: Path, work: Path, precision: str
) -> tuple[Callable[[], None], str]:
    """mmcl's trainer objects (accelerator, task, optimizer, compile) and its step on one synthetic batch."""
    import torch

    from mmcl.config import load_experiment
    from mmcl.data.batch import Batch
    from mmcl.engine.trainer import Trainer

    cfg = load_experiment(None, [
        f"model.preset={preset}", f"data.train_shards=[{shards}]", f"data.batch_size={batch}",
        f"train.precision={precision}", f"train.compile={str(compile).lower()}", "train.trackers=[none]",
        "train.progress=false", f"train.output_dir={work}",
    ])  # fmt: skip
    trainer = Trainer(cfg)
    size = trainer.model.preprocess_cfg()["image_size"]
    captions = synthetic_captions(batch)
    ids, mask = trainer.model.tokenizer(captions)
    device = trainer.accelerator.device
    data = Batch(images=torch.randn(batch, 3, size, size, device=device), text=ids.to(device),
                 text_mask=mask.to(device), captions=captions)  # fmt: skip

    def step() -> None:
        trainer.prepared.train()
        trainer.task.step([data], trainer.accelerator, trainer.prepared)
        trainer._grad_norm()  # the trainer's clip (train.grad_clip), as its loop runs it every step
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step, f"{preset} ({sum(p.numel() for p in trainer.task.parameters()) / 1e6:.1f}M params, {size} px)"


def open_clip_step(name: str, batch: int, compile: bool, device: Any, precision: str) -> tuple[Callable[[], None], str]:
    """open_clip_train's step (amp_bf16, no accumulation), its AdamW groups, `--torchcompile`, clip 1.0."""
    import open_clip
    import torch

    model, _, _ = open_clip.create_model_and_transforms(name, device=device, output_dict=True)
    tokenizer = open_clip.get_tokenizer(name)
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2}],
        lr=5e-4, betas=(0.9, 0.98), eps=1e-6,
    )  # fmt: skip
    loss = open_clip.ClipLoss()
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    images = torch.randn(batch, 3, size, size, device=device)
    texts = tokenizer(synthetic_captions(batch)).to(device)
    raw = model
    if compile:
        model = torch.compile(model)

    def step() -> None:
        model.train()
        optimizer.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(images, texts)
            total = sum(loss(**out, output_dict=True).values())
        total.backward()
        torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0, norm_type=2.0)
        optimizer.step()
        with torch.no_grad():
            raw.logit_scale.clamp_(0, math.log(100))

    return step, f"{name} ({sum(p.numel() for p in raw.parameters()) / 1e6:.1f}M params, {size} px)"


def time_steps(step: Callable[[], None], device: Any, warmup: int, min_steps: int, min_s: float) -> float:
    """Seconds per step after `warmup` steps: at least `min_steps` steps and `min_s` seconds."""
    for _ in range(warmup):
        step()
    _sync(device)
    start, n = time.perf_counter(), 0
    while n < min_steps or (time.perf_counter() - start < min_s and n < 500):
        step()
        n += 1
        if n >= min_steps:
            _sync(device)
    return (time.perf_counter() - start) / n


# ----------------------------------------------------------------------------- the check


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        self.start = time.perf_counter()
        if args.smoke:  # tiny models on a shared CPU: two OpenMP threads spin at barriers (5-10x slower)
            torch.set_num_threads(1)
        self.cuda = torch.cuda.is_available() and not args.smoke
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.device_name = torch.cuda.get_device_name() if self.cuda else "CPU (smoke)" if args.smoke else "no CUDA"
        # bf16 autocast on a CPU without bf16 units runs 10x slower than fp32: the smoke run checks the script
        self.precision = "fp32" if args.smoke else "bf16"
        self.peak = peak_tflops(self.device_name, args.peak_tflops) if self.cuda or args.peak_tflops else None
        self.rows = self.plan()
        self.flops: dict[tuple[str, str], float] = {}  # (model, lib) -> FLOPs of one step, from the eager row

    def plan(self) -> list[Row]:
        rows = [Row(f"train {m} {lib} compile=off", "eager") for m in MODELS for lib in LIBS]
        rows += [Row("loader 224px decode_on=workers", "loader"), Row("loader 224px decode_on=device", "loader"),
                 Row("device decode only 224px", "loader")]  # fmt: skip
        rows += [Row(f"train {m} {lib} compile=on", "compile") for m in MODELS for lib in LIBS]
        return rows

    def left_s(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.start)

    def write(self, out: Path, final: bool = False) -> dict[str, Any]:
        from mmcl.utils import atomic_write_text

        result = {
            "device": self.device_name,
            "smoke": self.args.smoke,
            "peak_bf16_tflops": self.peak,
            "batch_size": self.args.batch_size,
            "precision": self.precision,
            "elapsed_s": round(time.perf_counter() - self.start, 1),
            "complete": final,
            "machine": self.machine,
            "rows": [asdict(r) for r in self.rows],
            "targets": self.targets(),
        }
        atomic_write_text(out / "gpu_check.json", json.dumps(result, indent=2, default=str) + "\n")
        return result

    def targets(self) -> dict[str, Any]:
        by_name = {r.name: r for r in self.rows}
        out: dict[str, Any] = {}
        for model in MODELS:
            for comp in ("off", "on"):
                a, b = (by_name[f"train {model} {lib} compile={comp}"].samples_per_s for lib in LIBS)
                if a and b:
                    out[f"{model} compile={comp} mmcl/open_clip"] = {
                        "ratio": round(a / b, 3), "target": TARGETS["mmcl_over_open_clip"],
                        "met": a / b >= TARGETS["mmcl_over_open_clip"]}  # fmt: skip
        mfus = [by_name[f"train ViT-B/32 mmcl compile={c}"].mfu for c in ("off", "on")]
        if any(m is not None for m in mfus):
            best = max(m for m in mfus if m is not None)
            out["ViT-B/32 mmcl MFU"] = {"mfu": best, "target": TARGETS["vit_b_32_mfu"],
                                        "met": best >= TARGETS["vit_b_32_mfu"]}  # fmt: skip
        return out

    # ------------------------------------------------------------------ rows

    def run_train(self, row: Row, shards: Path, work: Path) -> None:
        import torch

        label, lib = row.name.split()[1], row.name.split()[2]
        compile = row.kind == "compile"
        preset, oc_name = SMOKE_MODELS if self.args.smoke else MODELS[label]
        batch = self.args.batch_size
        with self._smoke_compile():
            if lib == "mmcl":
                run_dir = work / row.name.replace(" ", "_").replace("/", "")
                step, row.model = mmcl_step(preset, batch, compile, shards, run_dir, self.precision)
            else:
                step, row.model = open_clip_step(oc_name, batch, compile, self.device, self.precision)
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            if not compile:
                step()  # first step outside the count: lazy state (optimizer moments, cuBLAS handles)
                self.flops[(label, lib)] = _count_flops(step)
            smoke = self.args.smoke
            seconds = time_steps(step, self.device, warmup=1 if smoke else 3, min_steps=1 if smoke else 10,
                                 min_s=0.0 if smoke else self.args.min_timed_s)  # fmt: skip
        row.step_ms = round(seconds * 1000, 2)
        row.samples_per_s = round(batch / seconds, 1)
        row.flops_per_step = self.flops.get((label, lib))
        if self.cuda:
            row.peak_mem_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if row.flops_per_step and self.peak:
            row.mfu = round(row.flops_per_step / seconds / (self.peak * 1e12), 4)
        elif not self.peak:
            row.note = "MFU: no known bf16 peak for this device (pass --peak-tflops)"
        row.status = "ok"

    @contextlib.contextmanager
    def _smoke_compile(self):
        """--smoke: torch.compile through dynamo's eager backend (the same capture, no minutes of C++ build)."""
        import torch

        if not self.args.smoke:
            yield
            return
        original = torch.compile
        torch.compile = lambda *a, **kw: original(*a, **{**kw, "backend": "eager"})
        try:
            yield
        finally:
            torch.compile = original

    def run_loaders(self, shards: Path) -> None:
        from bench import gpu_decode_check

        device = "cuda" if self.cuda else "cpu"
        batch = 16 if self.args.smoke else 128
        parity = gpu_decode_check.compare(shards, 224, batch, device)
        rates = gpu_decode_check.throughput(shards, 224, batch, self.args.workers, self.args.n_images, device)
        names = {"loader_workers": "loader 224px decode_on=workers", "loader_device": "loader 224px decode_on=device",
                 "device_decode_only": "device decode only 224px"}  # fmt: skip
        for key, name in names.items():
            row = next(r for r in self.rows if r.name == name)
            row.samples_per_s, row.status = round(rates[key], 1), "ok"
            row.model = f"{self.args.workers} workers" if key != "device_decode_only" else "batched decode"
            if key != "loader_workers":
                row.extra["parity_224px"] = parity
                row.note = (
                    "parity with workers: "
                    + ("ok" if parity["ok"] else "FAILED")
                    + (f" (mean {parity['mean_levels']:.2f}, p99 {parity['p99_levels']:.1f} levels)")
                )

    def run(self, out: Path) -> dict[str, Any]:
        out.mkdir(parents=True, exist_ok=True)
        self.machine = {"cores": os.cpu_count(), **({"gpu": self.device_name} if self.cuda else {})}
        if not self.cuda and not self.args.smoke:
            for row in self.rows:
                row.status, row.note = "skipped", "no CUDA device (torch.cuda.is_available() is False)"
            return self.write(out, final=True)
        self.machine.update(common.machine_info())
        if self.args.smoke:
            common.patch_open_clip()  # registers the tiny twin of clip-tiny-64 with open_clip
        with tempfile.TemporaryDirectory() as tmp:
            n = 64 if self.args.smoke else self.args.n_images
            shards = common.synthetic_shards(Path(tmp) / "s256", n, image_size=256, maxcount=256,
                                             num_workers=min(8, os.cpu_count() or 1))  # fmt: skip
            try:
                self._run_rows(shards, Path(tmp), out)
            except KeyboardInterrupt:  # gpu_check.sh's hard stop (SIGINT): the rows done so far stay, the rest say why
                for row in self.rows:
                    if row.status == "pending":
                        row.status, row.note = "skipped", "stopped by the time limit (SIGINT) before or during this row"
        return self.write(out, final=True)

    def _run_rows(self, shards: Path, tmp: Path, out: Path) -> None:
        loaders_done = False
        for row in self.rows:
            if row.status != "pending":
                continue
            cost = ROW_COST_S[row.kind]
            if not self.args.smoke and self.left_s() < cost:
                row.status = "skipped"
                row.note = f"time budget: {self.left_s():.0f} s left, the row needs about {cost:.0f} s"
                continue
            row_start = time.perf_counter()
            try:
                if row.kind == "loader" and not loaders_done:
                    loaders_done = True
                    self.run_loaders(shards)
                elif row.kind != "loader":
                    self.run_train(row, shards, tmp)
            except Exception as e:  # recorded, not raised: the other rows are still worth having
                for r in self.rows if row.kind == "loader" else [row]:
                    if r.kind == row.kind and r.status == "pending":
                        r.status, r.note = "failed", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            finally:
                self._release()
                row.extra["wall_s"] = round(time.perf_counter() - row_start, 1)
            self.write(out)
            print(f"[gpu_check] {row.name}: {row.status} {row.note}", file=sys.stderr, flush=True)

    def _release(self) -> None:
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        torch._dynamo.reset()


def table(result: dict[str, Any]) -> str:
    def fmt(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    rows = [[r["name"], r["status"], fmt(r["samples_per_s"], ".1f"), fmt(r["step_ms"], ".1f"),
             fmt(r["mfu"] * 100 if r["mfu"] is not None else None, ".1f"), fmt(r["peak_mem_gib"], ".2f"),
             r["model"], r["note"]] for r in result["rows"]]  # fmt: skip
    headers = ["row", "status", "samples/s (images/s)", "step ms", "MFU %", "peak GiB", "model / setup", "note"]
    lines = [f"GPU check on {result['device']} (bf16 peak {result['peak_bf16_tflops']} TFLOPS), "
             f"batch {result['batch_size']}, {result['precision']}, {result['elapsed_s']} s", common.markdown_table(headers, rows)]  # fmt: skip
    for name, t in result["targets"].items():
        value = t.get("ratio", t.get("mfu"))
        lines.append(f"target {name}: {value} (want >= {t['target']}): {'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--smoke", action="store_true", help="tiny models on CPU, seconds: checks the script")
    p.add_argument("--batch-size", type=int, default=None, help="per step, both libraries (default 256; smoke 8)")
    p.add_argument("--budget-s", type=float, default=450.0, help="rows that would end past this are skipped")
    p.add_argument("--min-timed-s", type=float, default=5.0, help="timed seconds per training row (GPU)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="loader workers (default: one per core)")
    p.add_argument("--n-images", type=int, default=2048, help="256 px JPEGs written for the loader rows")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not in the table")
    args = p.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 8 if args.smoke else 256
    if args.smoke:
        args.workers = min(args.workers, 2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = Check(args).run(args.out_dir)
    print(table(result))
    print(f"wrote {args.out_dir / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
