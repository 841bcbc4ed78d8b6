"""Retrieval index at scale: latency, recall@10 and memory of mmcl's index choices over 1M and 10M vectors.

Vectors: a clustered synthetic set with the structure of real embeddings (unit vectors around 4096 centres,
512-d), written once as float16 chunks under data/bench/. For each size the index `mmcl index build` would
choose (`EmbeddingIndex.from_chunks`: plan from size + memory budget, search breadth tuned to the target
recall) is built, saved and loaded again as the app loads it, then queried one query at a time with one
thread and with all threads: p50/p95/p99 latency, recall@10 against exact search, build time and RSS.
Exact search is timed beside the scan floor (one multi-threaded matrix-vector product over the same stored
vectors) in the same run. Results: bench/results/index.{json,md}.

    python bench/bench_index.py                      # 1M in memory + 10M on disk (2 GiB budget)
    python bench/bench_index.py --tiny               # a seconds-long check of the script, not a measurement
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DATA,
    RESULTS,
    clustered_queries,
    clustered_vectors,
    machine_info,
    machine_markdown,
    markdown_table,
    publish,
    reproduce_command,
    reproduce_markdown,
    wait_for_quiet,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[1_000_000, 10_000_000])
    p.add_argument("--budgets", nargs="+", default=["8G", "2G"], help="memory budget per size (index only)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=500, help="single queries timed per setting")
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--ivf-threshold", type=int, default=100_000, help="sizes from here on get IVF (as the CLI)")
    p.add_argument("--exact-up-to", type=int, default=1_000_000, help="also time exact search up to this size")
    p.add_argument("--data-dir", type=Path, default=DATA)
    p.add_argument("--results", type=Path, default=None, help=f"default {RESULTS} (a temp folder with --tiny)")
    p.add_argument("--no-wait", action="store_true", help="do not wait for a 1-min load average below 1.5")
    p.add_argument("--tiny", action="store_true", help="seconds-long check of the script, not a measurement")
    args = p.parse_args(argv)
    if args.tiny:
        args.sizes, args.budgets, args.dim, args.queries, args.no_wait = [20_000, 40_000], ["1G", "2M"], 64, 50, True
        args.exact_up_to, args.ivf_threshold = 40_000, 10_000
        args.data_dir = Path(tempfile.mkdtemp(prefix="bench_index_data_"))
    if len(args.budgets) != len(args.sizes):
        p.error("give one --budgets entry per --sizes entry")
    if args.results is None:
        args.results = Path(tempfile.mkdtemp(prefix="bench_index_")) if args.tiny else RESULTS
    return args


def vectors(args: argparse.Namespace, n: int) -> list[np.ndarray]:
    """`n` clustered unit vectors as memory-mapped float16 chunks (written once, deterministic)."""
    return clustered_vectors(args.data_dir, n, args.dim)


def query_set(args: argparse.Namespace) -> np.ndarray:
    """Queries from the same distribution as the stored vectors, never stored themselves."""
    return clustered_queries(args.queries, args.dim)


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def timed(fn, queries: np.ndarray) -> dict[str, float]:
    for q in queries[:5]:
        fn(q[None])
    times = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q[None])
        times.append((time.perf_counter() - t0) * 1e3)
    p50, p95, p99 = np.percentile(times, [50, 95, 99])
    return {"p50_ms": round(float(p50), 3), "p95_ms": round(float(p95), 3), "p99_ms": round(float(p99), 3)}


def set_threads(n: int) -> None:
    import faiss
    import torch

    faiss.omp_set_num_threads(n)
    torch.set_num_threads(n)


def measure_size(args: argparse.Namespace, n: int, budget: str, queries: np.ndarray) -> dict[str, Any]:
    from mmcl.index import EmbeddingIndex
    from mmcl.index_plan import exact_topk, parse_bytes, recall_at_k

    chunks = vectors(args, n)
    _, truth = exact_topk(queries, chunks, 10)
    metas = [{} for _ in range(n)]
    t0 = time.perf_counter()
    index = EmbeddingIndex.from_chunks(
        args.dim,
        chunks,
        metas,
        memory_budget=parse_bytes(budget),
        target_recall=args.target_recall,
        ivf_threshold=args.ivf_threshold,
    )
    build_s = time.perf_counter() - t0
    folder = Path(tempfile.mkdtemp(prefix="bench_index_idx_", dir=args.data_dir))
    index.save(folder)
    del index
    gc.collect()
    rss_before = rss()
    t0 = time.perf_counter()
    loaded = EmbeddingIndex.load(folder)
    load_s = time.perf_counter() - t0
    row: dict[str, Any] = {
        "n": n,
        "budget": budget,
        "plan": loaded.plan,
        "tuning": loaded.tuning,
        "on_disk": loaded.on_disk,
        "build_s": round(build_s, 1),
        "load_s": round(load_s, 2),
        "index_file_mib": round(sum(f.stat().st_size for f in folder.glob("index.*")) / 2**20, 1),
    }
    _, found = loaded.search(queries, k=10)
    ids = np.array([[m["id"] if m else -1 for m in r] for r in found])
    row["recall_at_10"] = round(recall_at_k(ids, truth, None, 10), 4)
    for threads in (1, os.cpu_count() or 1):
        set_threads(threads)
        row[f"threads_{threads}"] = timed(functools.partial(loaded.search, k=10), queries)
    row["rss_mib"] = round(rss() / 2**20)
    row["rss_growth_mib"] = round((rss() - rss_before) / 2**20)
    set_threads(os.cpu_count() or 1)
    del loaded
    gc.collect()
    if n <= args.exact_up_to:
        row["exact"] = exact_vs_scan(args, chunks, queries, truth)
    shutil.rmtree(folder, ignore_errors=True)
    return row


def exact_vs_scan(args: argparse.Namespace, chunks: list[np.ndarray], queries: np.ndarray, truth) -> dict[str, Any]:
    """Exact search (kind='flat') against the scan floor: one matrix-vector product over the same vectors."""
    import faiss
    import torch

    from mmcl.index import EmbeddingIndex

    n = sum(len(c) for c in chunks)
    index = EmbeddingIndex(args.dim, kind="flat")
    for chunk in chunks:
        index.add(np.asarray(chunk, np.float32), [{} for _ in range(len(chunk))])
    stored = torch.from_numpy(faiss.rev_swig_ptr(index._index.get_xb(), n * args.dim).reshape(n, args.dim))
    out = {}
    for threads in (1, os.cpu_count() or 1):
        set_threads(threads)
        scan = timed(lambda q: stored @ torch.from_numpy(q[0]), queries[:100])
        exact = timed(lambda q: index.search(q, k=10), queries[:100])
        faiss_own = timed(lambda q: index._index.search(q, 10), queries[:30])
        out[f"threads_{threads}"] = {
            "scan_floor": scan,
            "exact": exact,
            "faiss_flat_search": faiss_own,
            "exact_over_scan_p50": round(exact["p50_ms"] / max(scan["p50_ms"], 1e-9), 3),
        }
    set_threads(os.cpu_count() or 1)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    skipped = {"quiet": False, "threshold": None, "waited_s": 0, "load_history": [round(os.getloadavg()[0], 2)]}
    load = skipped if args.no_wait else wait_for_quiet()
    queries = query_set(args)
    rows = [measure_size(args, n, budget, queries) for n, budget in zip(args.sizes, args.budgets)]
    load["loadavg_end"] = list(os.getloadavg())
    return {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
        "machine": machine_info(),
        "load": load,
        "command": reproduce_command("bench_index.py"),
        "tiny": args.tiny,
    }


def to_markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    cores = max(int(k.split("_")[1]) for k in res["rows"][0] if k.startswith("threads_"))
    rows, exact_rows = [], []
    for r in res["rows"]:
        for t in sorted({1, cores}):
            lat = r[f"threads_{t}"]
            rows.append(
                [
                    f"{r['n']:,}",
                    r["budget"],
                    r["plan"].get("factory", "Flat") + (" (on disk)" if r["on_disk"] else ""),
                    f"{r['tuning'].get('param')}={r['tuning'].get('value')}" if r["tuning"].get("param") else "-",
                    t,
                    f"{lat['p50_ms']:.2f} / {lat['p95_ms']:.2f} / {lat['p99_ms']:.2f}",
                    f"{r['recall_at_10']:.3f}",
                    f"{r['build_s']:.0f}",
                    f"{r['rss_mib']:,} (+{r['rss_growth_mib']:,})",
                ]
            )
        for t, e in sorted((r.get("exact") or {}).items()):
            exact_rows.append(
                [
                    f"{r['n']:,}",
                    t.split("_")[1],
                    f"{e['scan_floor']['p50_ms']:.1f}",
                    f"{e['exact']['p50_ms']:.1f}",
                    f"{e['exact_over_scan_p50']:.2f}x",
                    f"{e['faiss_flat_search']['p50_ms']:.1f}",
                ]
            )
    table = markdown_table(
        ["vectors", "budget", "index", "tuned", "threads", "p50 / p95 / p99 ms", "recall@10", "build s", "RSS MiB"],
        rows,
    )
    exact = markdown_table(
        ["vectors", "threads", "scan floor p50 ms", "mmcl exact p50 ms", "exact / scan", "faiss IndexFlatIP p50 ms"],
        exact_rows,
    )
    note = "\n**--tiny run: a check of the script, not a measurement.**\n" if res["tiny"] else ""
    return f"""# Retrieval index: latency, recall and memory at scale
{note}
{s["dim"]}-d clustered synthetic unit vectors (4096 centres), {s["queries"]} single queries from the same
distribution (never stored). The index is what `mmcl index build` chooses for the size and memory budget
(`mmcl.index_plan`), its search breadth tuned to recall@10 >= {s["target_recall"]} on held-out stored vectors;
saved, then loaded as the app loads it (memory-mapped lists when on disk). Recall@10 is measured on the
queries against exact search. RSS: the whole benchmark process after the queries (growth since loading).

{table}

Exact search against the scan floor (one matrix-vector product over the same stored float32 vectors, timed
in the same run):

{exact}

{machine_markdown(res["machine"], res["load"])}

{reproduce_markdown(res["command"])}
"""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res = run(args)
    publish("index", res, to_markdown(res), args.results)
    if args.tiny:
        shutil.rmtree(args.data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
