"""Memory of SigLIP's all-gather loss against the chunked (ring) one, 2 gloo processes on CPU.

For each global batch B (B/2 rows per process, feature width D) and each `dist_impl`, a fresh pair of
forked processes runs one forward + backward of `SigLipLoss` on random normalised features and reports,
per process:

- peak RSS growth: the Linux high-water mark (`VmHWM`) reset just before the step (`/proc/self/clear_refs`)
  minus the RSS before it: every byte the step touched, allocator slack included (fresh processes, so no
  earlier step's freed memory is reused; a 4-row warm-up step first sets up threads and buffers);
- saved for backward: bytes of the tensors autograd keeps between forward and backward
  (`torch.autograd.graph.saved_tensors_hooks`), exact and independent of the allocator.

    python -m bench.bench_siglip_memory          # ~1 min -> results/siglip_memory.{json,md}
    python -m bench.bench_siglip_memory --tiny   # seconds, results to a temp folder
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import time
from pathlib import Path

from bench import common

WORLD = 2


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _worker(rank: int, world: int, port: int, impl: str, batch: int, dim: int, out_dir: str) -> None:
    import json

    import torch
    import torch.distributed as dist

    from mmcl.losses import SigLipLoss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        n = batch // world
        g = torch.Generator().manual_seed(rank)
        img = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1).requires_grad_(True)
        txt = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1).requires_grad_(True)
        scale = torch.tensor(10.0, requires_grad=True)
        bias = torch.tensor(-10.0, requires_grad=True)
        loss_fn = SigLipLoss(dist_impl=impl)
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[id(t)] = t.numel() * t.element_size()  # ids of live tensors: each storage counted once
            return t

        # one step on 4 rows first: library set-up (threads, BLAS buffers, gloo's pairs) is not the loss's
        warm = [t.detach()[:4].clone().requires_grad_(True) for t in (img, txt)]
        loss_fn(*warm, scale, bias)["loss"].backward()
        dist.barrier()
        rss_before = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = loss_fn(img, txt, scale, bias)
        out["loss"].backward()
        seconds = time.perf_counter() - start
        peak = _status_kib("VmHWM") - rss_before
        result = {"peak_rss_growth_mib": peak / 1024, "saved_for_backward_mib": sum(saved.values()) / 2**20,
                  "step_s": seconds, "loss": float(out["loss"])}  # fmt: skip
        Path(out_dir, f"{impl}_{world}_{batch}_{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def measure(impl: str, batch: int, dim: int, tmp: Path, world: int = WORLD) -> dict[str, float]:
    import json

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = (world, port, impl, batch, dim, str(tmp))
    mp.start_processes(_worker, args=args, nprocs=world, join=True, start_method="fork")
    ranks = [json.loads((tmp / f"{impl}_{world}_{batch}_{r}.json").read_text()) for r in range(world)]
    return {key: max(r[key] for r in ranks) for key in ranks[0]}  # the larger process


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small batches, results to a temp folder")
    parser.add_argument("--dim", type=int, default=256)
    args = parser.parse_args(argv)
    batches = [128, 256, 512, 1024] if args.tiny else [512, 1024, 2048, 4096]
    info = common.machine_info()
    rows, table = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in batches:
            row: dict[str, object] = {"global_batch": batch, "per_process": batch // WORLD, "dim": args.dim}
            for impl in ("gather", "ring"):
                row[impl] = measure(impl, batch, args.dim, Path(tmp))
            rows.append(row)
            g, r = row["gather"], row["ring"]
            table.append([batch, batch // WORLD,
                          f"{g['peak_rss_growth_mib']:.1f}", f"{r['peak_rss_growth_mib']:.1f}",
                          f"{g['saved_for_backward_mib']:.2f}", f"{r['saved_for_backward_mib']:.2f}",
                          f"{g['step_s']:.2f}", f"{r['step_s']:.2f}"])  # fmt: skip
            print(table[-1], flush=True)
        # the same local batch on 1, 2, 4 processes: the gather's memory grows with the world, the ring's does not
        local = 128 if args.tiny else 1024
        by_world, world_table = [], []
        for world in (1, 2, 4):
            row = {"world": world, "per_process": local, "global_batch": local * world}
            for impl in ("gather", "ring"):
                row[impl] = measure(impl, local * world, args.dim, Path(tmp), world)
            by_world.append(row)
            g, r = row["gather"], row["ring"]
            world_table.append([world, local, local * world,
                                f"{g['peak_rss_growth_mib']:.1f}", f"{r['peak_rss_growth_mib']:.1f}",
                                f"{g['saved_for_backward_mib']:.2f}", f"{r['saved_for_backward_mib']:.2f}"])  # fmt: skip
            print(world_table[-1], flush=True)
    headers = ["global batch", "per process", "gather: peak RSS growth MiB", "ring: peak RSS growth MiB",
               "gather: saved for backward MiB", "ring: saved for backward MiB", "gather: step s", "ring: step s"]  # fmt: skip
    intro = (
        f"One forward + backward of `SigLipLoss` on float32 features of width {args.dim}, per process "
        "(the larger of the two). Peak RSS growth: Linux `VmHWM` reset before the step minus the RSS before "
        "it (fresh forked processes per cell, after a 4-row warm-up step that sets up the libraries). Saved for "
        "backward: bytes autograd keeps between forward and backward (`saved_tensors_hooks`), exact. Step time is "
        "one step on one thread per process."
    )
    common.write_results(
        "siglip_memory",
        table,
        headers,
        "SigLIP loss memory: all-gather vs chunked ring (2 gloo processes, CPU)",
        "The machine is shared with other jobs: times are noisy; memory is per process and not affected by them.",
        info,
        intro=intro,
        tables=[common.Table(["processes", "per process", "global batch", *headers[2:6]], world_table,
                             f"The same {local} rows per process on 1, 2 and 4 processes (4 processes share the 2 cores):")],
        data={"settings": {"world": WORLD, "dim": args.dim, "dtype": "float32", "batches": batches},
              "measurements": rows, "by_world": by_world},
        command=common.reproduce_command("bench_siglip_memory.py"),
        out_dir=Path(tempfile.mkdtemp()) if args.tiny else None,
    )  # fmt: skip


if __name__ == "__main__":
    main()
