"""Retrieval index at scale: latency, recall@10 and memory of mmcl's index choices over 1M and 10M vectors.

Vectors: real embeddings (a trained demo model's image embeddings of generated images, queried with its
text embeddings of held-out captions: text -> image search as in the app) and a clustered synthetic set with
the structure of real embeddings to reach 1M and 10M (unit vectors around 4096 centres, 512-d), written once
as float16 chunks under data/bench/. For each size the index `mmcl index build` would choose
(`EmbeddingIndex.from_chunks`: plan from size + memory budget, search breadth tuned to the target recall) is
built, saved and loaded again as the app loads it, then queried one query at a time with one thread and with
all threads: p50/p95/p99 latency, recall@10 against exact search, build time and memory (RSS, split into the
process's own memory and the pages of memory-mapped index files). Exact search is timed beside the read
floor (the fastest single read of the same stored vectors: a torch sum or a numpy max over them) in the same
run. Results: bench/results/index.{json,md}.

    python -m bench.bench_index                      # demo embeddings + 1M in memory + 10M on disk (2 GiB)
    python -m bench.bench_index --tiny               # a seconds-long check of the script, not a measurement
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    DATA,
    REPO,
    RESULTS,
    VECTOR_CHUNK,
    clustered_queries,
    clustered_vectors,
    machine_info,
    machine_markdown,
    markdown_table,
    reproduce_command,
    reproduce_markdown,
    wait_for_quiet,
    write_files,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[1_000_000, 10_000_000])
    p.add_argument("--budgets", nargs="+", default=["8G", "2G"], help="memory budget per size (index only)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=500, help="single queries timed per setting")
    p.add_argument(
        "--target-recall",
        nargs="+",
        type=float,
        default=[0.95, 0.9],
        help="recall@10 the search breadth is tuned to, per --sizes entry (the issue's: 0.95 at 1M, 0.9 at 10M)",
    )
    p.add_argument("--ivf-threshold", type=int, default=100_000, help="sizes from here on get IVF (as the CLI)")
    p.add_argument("--exact-up-to", type=int, default=1_000_000, help="also time exact search up to this size")
    p.add_argument("--demo-run", type=Path, default=None, help="trained run for the real-embedding set (mmcl demo)")
    p.add_argument("--demo-size", type=int, default=100_000, help="generated images embedded by --demo-run")
    p.add_argument("--data-dir", type=Path, default=DATA)
    p.add_argument("--results", type=Path, default=None, help=f"default {RESULTS} (a temp folder with --tiny)")
    p.add_argument("--no-wait", action="store_true", help="do not wait for a 1-min load average below 1.5")
    p.add_argument("--build-only", action="store_true", help="build (and keep) the indexes, measure nothing")
    p.add_argument("--rebuild", action="store_true", help="build the indexes anew even where one is kept")
    p.add_argument("--retune", action="store_true", help="re-tune kept indexes (after a change to the tuning)")
    p.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)  # internal: one fresh process
    p.add_argument("--tiny", action="store_true", help="seconds-long check of the script, not a measurement")
    args = p.parse_args(argv)
    if args.tiny:
        args.sizes, args.budgets, args.dim, args.queries, args.no_wait = [20_000, 40_000], ["1G", "2M"], 64, 50, True
        args.exact_up_to, args.ivf_threshold = 40_000, 10_000
        args.data_dir = Path(tempfile.mkdtemp(prefix="bench_index_data_"))
    if len(args.budgets) != len(args.sizes):
        p.error("give one --budgets entry per --sizes entry")
    targets = args.target_recall
    args.target_recall = targets * len(args.sizes) if len(targets) == 1 else targets[: len(args.sizes)]
    if len(args.target_recall) != len(args.sizes):
        p.error("give one --target-recall, or one per --sizes entry")
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


def memory() -> dict[str, int]:
    """RSS split into the process's own pages and the file pages it maps (memory-mapped index lists), MiB.

    File pages are page cache the kernel can drop and re-read under memory pressure; anonymous ones cannot.
    """
    out = {"rss_mib": round(rss() / 2**20)}
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[key.lower() + "_mib"] = round(int(value.split()[0]) / 1024)
    return out


def demo_embeddings(args: argparse.Namespace) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """The demo run's image embeddings of `demo_size` generated images, its text embeddings of held-out
    captions as queries, and of other held-out captions to tune on, as `mmcl index build` tunes (cached under
    data/bench, keyed by the checkpoint's weights file)."""
    import hashlib

    import torch

    from mmcl.data.synthetic import generate
    from mmcl.index import TUNE_QUERIES
    from mmcl.inference import load_pipeline
    from mmcl.run_folder import find_weights

    weights, _ = find_weights(args.demo_run)
    key = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    path = args.data_dir / f"demo_embeddings_{key}_{args.demo_size}.npz"
    if not path.is_file():
        pipe = load_pipeline(args.demo_run)
        size = pipe.model.image_size if hasattr(pipe.model, "image_size") else 64
        chunks = []
        with torch.inference_mode():
            for lo in range(0, args.demo_size, 1024):
                imgs = [generate(i, image_size=size).image for i in range(lo, min(lo + 1024, args.demo_size))]
                chunks.append(pipe.encode_images(imgs).float().numpy())
                print(f"demo embeddings {lo + len(imgs):,}/{args.demo_size:,}", file=sys.stderr, flush=True)
            captions = [generate(i, image_size=8, split="val").caption for i in range(args.queries)]
            queries = pipe.encode_texts(captions).float().numpy()
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, vectors=np.concatenate(chunks).astype(np.float16), queries=queries)
        os.replace(tmp, path)
    data = np.load(path)
    x = data["vectors"]
    with torch.inference_mode():  # captions after the measured ones: never both tuned on and scored
        captions = [generate(args.queries + i, image_size=8, split="val").caption for i in range(TUNE_QUERIES)]
        tune = load_pipeline(args.demo_run).encode_texts(captions).float().numpy()
    chunks = [x[c : c + VECTOR_CHUNK] for c in range(0, len(x), VECTOR_CHUNK)]
    return chunks, np.ascontiguousarray(data["queries"], np.float32), tune


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


def build_once(
    args: argparse.Namespace,
    chunks: list[np.ndarray],
    budget: str,
    queries: np.ndarray,
    data: str,
    target: float,
    tune_queries: np.ndarray | None = None,
) -> Path:
    """The index `mmcl index build` would make, saved under data/bench with its build record, queries and
    their exact top-10 (kept: a 10M build takes most of an hour here; `--rebuild` makes it anew). A kept
    index tuned to another target recall is re-tuned (`EmbeddingIndex.tune`, manifest only)."""
    from mmcl.index import EmbeddingIndex, read_manifest
    from mmcl.index.plan import exact_topk, parse_bytes

    n, dim = sum(len(c) for c in chunks), chunks[0].shape[1]
    folder = args.data_dir / f"index_{data}_{n}x{dim}_{budget}"
    record = folder / "build.json"
    if record.is_file() and not args.rebuild:
        manifest = read_manifest(folder)
        tuned_on = manifest.get("tuning", {}).get("on", "")
        stale = manifest.get("target_recall") != target or (tune_queries is not None and "given" not in tuned_on)
        if stale or args.retune:
            kept = EmbeddingIndex.load(folder)
            kept.tune(chunks, target, tune_queries)
            kept.save_tuning(folder)
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    load_start = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    index = EmbeddingIndex.from_chunks(
        dim,
        chunks,
        [{} for _ in range(n)],
        tune_queries,
        memory_budget=parse_bytes(budget),
        target_recall=target,
        ivf_threshold=args.ivf_threshold,
    )
    build_s = time.perf_counter() - t0
    index.save(folder)
    del index
    gc.collect()
    np.save(folder / "queries.npy", queries)
    np.save(folder / "truth.npy", exact_topk(queries, chunks, 10)[1])
    built = {"build_s": round(build_s, 1), "loadavg_start": load_start, "loadavg_end": round(os.getloadavg()[0], 2)}
    record.write_text(json.dumps({**built, "at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}))
    return folder


def measure_index(folder: Path) -> dict[str, Any]:
    """Load a saved index as the app does and time single queries (run in a fresh process: its RSS is the
    index's, not the builder's)."""
    from mmcl.index import EmbeddingIndex
    from mmcl.index.plan import recall_at_k

    queries, truth = np.load(folder / "queries.npy"), np.load(folder / "truth.npy")
    rss_before = rss()
    t0 = time.perf_counter()
    loaded = EmbeddingIndex.load(folder)
    row: dict[str, Any] = {
        "plan": loaded.plan,
        "tuning": loaded.tuning,
        "on_disk": loaded.on_disk,
        "load_s": round(time.perf_counter() - t0, 2),
        "index_file_mib": round(sum(f.stat().st_size for f in folder.glob("index.*")) / 2**20, 1),
    }
    _, found = loaded.search(queries, k=10)
    ids = np.array([[m["id"] if m else -1 for m in r] for r in found])
    row["recall_at_10"] = round(recall_at_k(ids, truth, None, 10), 4)
    for threads in (1, os.cpu_count() or 1):
        set_threads(threads)
        row[f"threads_{threads}"] = timed(functools.partial(loaded.search, k=10), queries)
    row.update(memory())
    row["rss_growth_mib"] = round((rss() - rss_before) / 2**20)
    return row


def measure_size(
    args: argparse.Namespace,
    chunks: list[np.ndarray],
    budget: str,
    queries: np.ndarray,
    data: str,
    target: float,
    tune_queries: np.ndarray | None = None,
) -> dict[str, Any]:
    n, dim = sum(len(c) for c in chunks), chunks[0].shape[1]
    folder = build_once(args, chunks, budget, queries, data, target, tune_queries)
    row: dict[str, Any] = {"data": data, "dim": dim, "n": n, "budget": budget, "target": target, "folder": str(folder)}
    row["build"] = json.loads((folder / "build.json").read_text())
    row["build_s"] = row["build"]["build_s"]
    if args.build_only:
        return row
    out = subprocess.run(
        [sys.executable, "-m", "bench.bench_index", "--measure", str(folder)],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    if out.returncode:
        raise SystemExit(f"measuring {folder} failed:\n{out.stderr[-3000:]}")
    row.update(json.loads(out.stdout.strip().splitlines()[-1]))
    if n <= args.exact_up_to:
        row["exact"] = exact_vs_scan(args, chunks, queries, np.load(folder / "truth.npy"))
    return row


def exact_vs_scan(args: argparse.Namespace, chunks: list[np.ndarray], queries: np.ndarray, truth) -> dict[str, Any]:
    """Exact search (kind='flat') against the read floor: the fastest single read of the same stored vectors."""
    import faiss
    import torch

    from mmcl.index import EmbeddingIndex

    n, dim = sum(len(c) for c in chunks), chunks[0].shape[1]
    index = EmbeddingIndex(dim, kind="flat")
    for chunk in chunks:
        index.add(np.asarray(chunk, np.float32), [{} for _ in range(len(chunk))])
    stored_np = faiss.rev_swig_ptr(index._index.get_xb(), n * dim).reshape(n, dim)
    stored = torch.from_numpy(stored_np)
    out = {}
    for threads in (1, os.cpu_count() or 1):
        set_threads(threads)
        reads = {
            "torch_sum": timed(lambda q: stored.sum(), queries[:50]),
            "numpy_max": timed(lambda q: stored_np.max(), queries[:20]),
        }
        floor = min(reads.values(), key=lambda r: r["p50_ms"])
        exact = timed(lambda q: index.search(q, k=10), queries[:100])
        faiss_own = timed(lambda q: index._index.search(q, 10), queries[:30])
        matvec = timed(lambda q: stored @ torch.from_numpy(q[0]), queries[:30])
        out[f"threads_{threads}"] = {
            "read_floor": floor,
            "reads": reads,
            "exact": exact,
            "faiss_flat_search": faiss_own,
            "torch_matvec": matvec,
            "exact_over_floor_p50": round(exact["p50_ms"] / max(floor["p50_ms"], 1e-9), 3),
        }
    set_threads(os.cpu_count() or 1)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    skipped = {"quiet": False, "threshold": None, "waited_s": 0, "load_history": [round(os.getloadavg()[0], 2)]}
    load = skipped if args.no_wait or args.build_only else wait_for_quiet()
    rows = []
    if args.demo_run:
        chunks, text_queries, tune_queries = demo_embeddings(args)
        rows.append(measure_size(args, chunks, "8G", text_queries, "demo", args.target_recall[0], tune_queries))
    queries = query_set(args)
    for n, budget, target in zip(args.sizes, args.budgets, args.target_recall):
        rows.append(measure_size(args, vectors(args, n), budget, queries, "synthetic", target))
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
        data = "demo model" if r.get("data") == "demo" else "synthetic"
        for t in sorted({1, cores}):
            lat = r[f"threads_{t}"]
            rows.append(
                [
                    data,
                    f"{r['n']:,} x {r.get('dim', s['dim'])}",
                    r["budget"],
                    r["plan"].get("factory", "Flat") + (" (on disk)" if r["on_disk"] else ""),
                    f"{r['tuning'].get('param')}={r['tuning'].get('value')}" if r["tuning"].get("param") else "-",
                    r.get("target", s["target_recall"]),
                    t,
                    f"{lat['p50_ms']:.2f} / {lat['p95_ms']:.2f} / {lat['p99_ms']:.2f}",
                    f"{r['recall_at_10']:.3f}",
                    f"{r['build_s']:.0f}" + ("*" if r.get("build", {}).get("loadavg_start", 0) > 1.5 else ""),
                    f"{r['rss_mib']:,} (+{r['rss_growth_mib']:,})",
                    f"{r.get('rssanon_mib', '-'):,} / {r.get('rssfile_mib', '-'):,}",
                ]
            )
        for t, e in sorted((r.get("exact") or {}).items()):
            floor_name = min(e["reads"], key=lambda k: e["reads"][k]["p50_ms"])
            exact_rows.append(
                [
                    data,
                    f"{r['n']:,}",
                    t.split("_")[1],
                    f"{e['read_floor']['p50_ms']:.1f} ({floor_name.replace('_', ' ')})",
                    f"{e['exact']['p50_ms']:.1f}",
                    f"{e['exact_over_floor_p50']:.2f}x",
                    f"{e['faiss_flat_search']['p50_ms']:.1f}",
                    f"{e['torch_matvec']['p50_ms']:.1f}",
                ]
            )
    table = markdown_table(
        [
            "vectors",
            "n x dim",
            "budget",
            "index",
            "tuned",
            "target",
            "threads",
            "p50 / p95 / p99 ms",
            "recall@10",
            "build s",
            "RSS MiB (growth)",
            "own / mapped MiB",
        ],
        rows,
    )
    exact = markdown_table(
        [
            "vectors",
            "n",
            "threads",
            "read floor p50 ms",
            "mmcl exact p50 ms",
            "exact / floor",
            "faiss IndexFlatIP.search p50 ms",
            "torch matvec p50 ms",
        ],
        exact_rows,
    )
    note = "\n**--tiny run: a check of the script, not a measurement.**\n" if res["tiny"] else ""
    return f"""# Retrieval index: latency, recall and memory at scale
{note}
*demo model*: `mmcl demo`'s model's image embeddings of {s["demo_size"]:,} generated images, queried with its
text embeddings of {s["queries"]} held-out captions (text -> image, as in the app). *synthetic*: {s["dim"]}-d
clustered unit vectors (4096 centres), {s["queries"]} single queries from the same distribution (never
stored). The index is what `mmcl index build` chooses for the size and memory budget (`mmcl.index.plan`), its
search breadth tuned to the target recall@10 (column *target*) on held-out stored vectors (synthetic) or on
the text embeddings of other held-out captions (demo model, as `mmcl index build` tunes on captions); saved, then loaded as the
app loads it (memory-mapped lists when on disk). Recall@10 is measured on the queries against exact search.
Each index is built once and kept under data/bench (build s with *: built while other jobs loaded the machine,
so slower than it would be quiet); it is then loaded and queried in a fresh process, whose RSS after the
queries is reported (growth since loading), split into the process's own memory and the mapped pages of
index files (page cache: dropped and re-read by the kernel under memory pressure).

{table}

Exact search against the read floor (the fastest single read of the same stored float32 vectors, a torch sum
or a numpy max, timed in the same run), with faiss's own flat search and a torch matrix-vector product beside:

{exact}

{machine_markdown(res["machine"], res["load"])}

{reproduce_markdown(res["command"])}
"""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure:
        print(json.dumps(measure_index(args.measure)))
        return 0
    res = run(args)
    if args.build_only:
        print(json.dumps([{k: r[k] for k in ("data", "n", "budget", "folder", "build")} for r in res["rows"]]))
        return 0
    write_files("index", res, to_markdown(res), args.results)
    if args.tiny:
        shutil.rmtree(args.data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
