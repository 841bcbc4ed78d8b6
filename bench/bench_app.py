"""The app's retrieval tab over an indexed collection of 1M images: latency end to end through `gradio_client`.

For each size, an index folder in the exact format `mmcl index build` writes (`EmbeddingIndex.from_chunks` +
`save`: the structure planned for the size and memory budget, its search tuned to recall@10 >= 0.95) over
clustered synthetic vectors of the model's embedding size (`common.clustered_vectors`, as bench_index.py),
with one metadata row per vector whose thumbnail is one of a few hundred generated images in `images/`, so the
gallery gets real files. The app is started as a user starts it (`mmcl app RUN --index DIR --port P`, in a
subprocess) and, once it answers, timed one request at a time (warm-up calls excluded):

- end to end: `gradio_client.Client.predict(query, k, api_name="/search_text")` with distinct query texts;
  `/search_image` with distinct uploaded images; `/classify` (one image, 10 labels, the same labels each time);
- the same endpoint's handler in-process (the Blocks function behind it, on a state loaded as the app loads
  it), after the server has stopped: model + search + formatting, without HTTP, queue and file cache;
- the text encoder alone and the index search alone (one encoded query at a time, one faiss thread as in the app).

The model: `--run` (e.g. a trained `mmcl demo` run), by default a `clip-demo` run folder with random weights
made in a temp folder (latency does not depend on the weights). Results: bench/results/app.{json,md}.

    python -m bench.bench_app                          # 1M images (waits for a quiet machine)
    python -m bench.bench_app --run runs/demo --sizes 100000 1000000
    python -m bench.bench_app --tiny                   # a 1-2 minute check of the script, not a measurement
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    DATA,
    REPO,
    RESULTS,
    clustered_vectors,
    machine_info,
    machine_markdown,
    markdown_table,
    reproduce_command,
    reproduce_markdown,
    wait_for_quiet,
    write_files,
)

LABELS = "red circle, blue square, green triangle, yellow star, purple cross, orange circle, white square, "
LABELS += "black triangle, red star, blue cross"
APP_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, help="run folder to serve (default: a random-weight clip-demo run, temp)")
    p.add_argument("--sizes", nargs="+", type=int, default=[1_000_000], help="images in the index")
    p.add_argument("--calls", type=int, default=200, help="timed requests per endpoint (after the warm-up)")
    p.add_argument("--warmup", type=int, default=10, help="requests per endpoint before timing")
    p.add_argument("-k", type=int, default=12, help="results per query (the app's default: 12)")
    p.add_argument("--thumbs", type=int, default=300, help="distinct thumbnails the metadata points to")
    p.add_argument("--thumb-size", type=int, default=256, help="side of the thumbnails (`mmcl index build`'s max)")
    p.add_argument("--memory-budget", default="0", help="index memory budget as for `mmcl index build` (0 = auto)")
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--ivf-threshold", type=int, default=100_000, help="sizes from here on get IVF (as the CLI)")
    p.add_argument("--start-timeout", type=float, default=1200.0, help="seconds the app may take to answer")
    p.add_argument("--data-dir", type=Path, default=DATA, help="where the synthetic vectors are cached")
    p.add_argument("--results", type=Path, default=None, help=f"default {RESULTS} (a temp folder with --tiny)")
    p.add_argument("--no-wait", action="store_true", help="do not wait for a 1-min load average below 1.5")
    p.add_argument("--tiny", action="store_true", help="a 1-2 minute check of the script, not a measurement")
    args = p.parse_args(argv)
    if args.tiny:
        args.sizes, args.calls, args.warmup, args.thumbs, args.no_wait = [20_000], 30, 3, 50, True
        args.ivf_threshold = 10_000  # the IVF path 1M takes, at a size that builds in seconds
        args.data_dir = Path(tempfile.mkdtemp(prefix="bench_app_data_"))
    if args.results is None:
        args.results = Path(tempfile.mkdtemp(prefix="bench_app_")) if args.tiny else RESULTS
    return args


# ----------------------------------------------------------------------------- inputs


def random_run(folder: Path) -> Path:
    """A `clip-demo` run folder with random weights (`final/model.safetensors` + `config.yaml`)."""
    from mmcl.config import ExperimentConfig, model_config, save_yaml
    from mmcl.engine.checkpoint import save_model
    from mmcl.models import build_model

    cfg = ExperimentConfig(model=model_config("clip-demo"))
    (folder / "final").mkdir(parents=True, exist_ok=True)
    save_model(build_model(cfg.model), folder / "final" / "model.safetensors")
    save_yaml(cfg, folder / "config.yaml")
    return folder


def embed_dim(run: Path) -> int:
    from mmcl.app.models import load_run

    return int(load_run(run).encode_texts(["a red circle"]).shape[1])


def write_thumbnails(index_dir: Path, n: int, size: int) -> list[str]:
    """`n` generated pictures as `images/NNNNNNNN.jpg` (as `mmcl index build` names them); returns their captions."""
    from mmcl.data.synthetic import generate
    from mmcl.index import thumbs_dir

    folder = thumbs_dir(index_dir)
    folder.mkdir(parents=True, exist_ok=True)
    captions = []
    for j in range(n):
        sample = generate(j, image_size=size, split="train")
        sample.image.save(folder / f"{j:08d}.jpg", format="JPEG", quality=88)
        captions.append(sample.caption)
    return captions


def query_texts(n: int) -> list[str]:
    """`n` distinct captions of held-out generated samples (the val split: never in the thumbnails)."""
    from mmcl.data.synthetic import generate

    texts: dict[str, None] = {}
    i = 0
    while len(texts) < n:
        caption = generate(i, image_size=32, split="val").caption
        texts[caption if caption not in texts else f"{caption} ({i})"] = None
        i += 1
    return list(texts)


def query_images(folder: Path, n: int) -> list[str]:
    """`n` distinct generated test-split pictures as PNG files (what a visitor uploads)."""
    from mmcl.data.synthetic import generate

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"query_{i:05d}.png"
        generate(i, image_size=64, split="test").image.save(path)
        paths.append(str(path))
    return paths


def build_index_folder(args: argparse.Namespace, n: int, dim: int, folder: Path, model: str) -> dict[str, Any]:
    """An index of `n` clustered vectors in `folder`, saved as `mmcl index build` saves one; what was built."""
    from mmcl.index import EmbeddingIndex
    from mmcl.index.plan import parse_bytes

    captions = write_thumbnails(folder, args.thumbs, args.thumb_size)
    chunks = clustered_vectors(args.data_dir, n, dim)
    metas = [
        {"key": f"{i:09d}", "caption": captions[i % len(captions)], "source": "synthetic"}
        | {"image": f"images/{i % len(captions):08d}.jpg"}
        for i in range(n)
    ]
    t0 = time.perf_counter()
    index = EmbeddingIndex.from_chunks(
        dim,
        chunks,
        metas,
        memory_budget=parse_bytes(args.memory_budget),
        target_recall=args.target_recall,
        ivf_threshold=args.ivf_threshold,
    )
    build_s = time.perf_counter() - t0
    index.info = {"model": model, "sources": ["bench/bench_app.py clustered synthetic vectors"]}
    index.save(folder)
    return {
        "structure": index.structure,
        "plan": index.plan,
        "tuning": index.tuning,
        "build_s": round(build_s, 1),
        "index_mib": round(sum(f.stat().st_size for f in folder.glob("index.*")) / 2**20, 1),
        "meta_mib": round(sum(f.stat().st_size for f in folder.glob("meta.*")) / 2**20, 1),
    }


# ----------------------------------------------------------------------------- the app as a user runs it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_mib(pid: int) -> float:
    import psutil

    proc = psutil.Process(pid)
    return round(sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20, 1)


@contextmanager
def serve_app(run_dir: Path, index_dir: Path, log_path: Path, timeout_s: float) -> Iterator[dict[str, Any]]:
    """`mmcl app RUN --index DIR` on a free port in a subprocess; yields {url, pid, start_s} once it answers.

    Started as `python -m mmcl.cli` from the repository root, so it serves this checkout's `mmcl`.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    cmd = [sys.executable, "-m", "mmcl.cli", "app", str(run_dir), "--index", str(index_dir), "--port", str(port)]
    env = {
        **os.environ,
        **APP_ENV,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the app exited with code {proc.returncode} before answering:\n{tail}")
            try:
                with urllib.request.urlopen(url + "config", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - t0 > timeout_s:
                raise RuntimeError(f"the app did not answer on {url} within {timeout_s:.0f} s (log: {log_path})")
            time.sleep(0.5)
        yield {"url": url, "pid": proc.pid, "start_s": round(time.perf_counter() - t0, 1), "command": cmd}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------- timing


def timed(fn: Callable[[Any], Any], inputs: Sequence[Any], warmup: int) -> dict[str, Any]:
    """p50/p95/p99 ms of `fn(x)` over `inputs[warmup:]`, one call at a time; the first `warmup` are not timed."""
    for x in inputs[:warmup]:
        fn(x)
    times = []
    for x in inputs[warmup:]:
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    p50, p95, p99 = np.percentile(times, [50, 95, 99])
    return {
        "p50_ms": round(float(p50), 2),
        "p95_ms": round(float(p95), 2),
        "p99_ms": round(float(p99), 2),
        "mean_ms": round(float(np.mean(times)), 2),
        "calls": len(times),
        "load_after": round(os.getloadavg()[0], 2),
    }


def rest_call(http: Any, url: str, api: str, data: list[Any]) -> Any:
    """One call through Gradio's REST API as curl makes it: `POST /gradio_api/call/NAME`, then its SSE result."""
    r = http.post(f"{url}gradio_api/call/{api}", json={"data": data})
    r.raise_for_status()
    event = None
    with http.stream("GET", f"{url}gradio_api/call/{api}/{r.json()['event_id']}") as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line[len("event:") :].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                if event == "error":
                    raise RuntimeError(f"/{api} answered an error: {line}")
                return json.loads(line[len("data:") :])
    raise RuntimeError(f"/{api}: the result stream ended without a result")


def measure_http(args: argparse.Namespace, url: str, texts: list[str], images: list[str]) -> dict[str, Any]:
    """The endpoints through `gradio_client`, as a program calls them; /search_text also through the REST API."""
    import httpx
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False, download_files=False)
    gallery, table = client.predict(texts[0], args.k, api_name="/search_text")
    if len(gallery) != args.k or len(table["data"]) != args.k:
        raise RuntimeError(f"/search_text answered {len(gallery)} images and {len(table['data'])} rows, not {args.k}")
    out = {"gallery_items": len(gallery)}
    out["search_text"] = timed(lambda q: client.predict(q, args.k, api_name="/search_text"), texts, args.warmup)
    with httpx.Client(timeout=60) as http:  # one keep-alive connection, as a script would hold
        if len(rest_call(http, url, "search_text", [texts[0], args.k, None])[0]) != args.k:
            raise RuntimeError(f"the REST API's /search_text did not answer {args.k} images")
        out["search_text_rest"] = timed(
            lambda q: rest_call(http, url, "search_text", [q, args.k, None]), texts, args.warmup
        )
    out["search_image"] = timed(
        lambda p: client.predict(handle_file(p), args.k, api_name="/search_image"), images, args.warmup
    )
    out["classify"] = timed(
        lambda p: client.predict(handle_file(p), LABELS, "short", "", 5, api_name="/classify"), images, args.warmup
    )
    return out


def measure_in_process(
    args: argparse.Namespace, run_dir: Path, index_dir: Path, texts: list[str], images: list[str]
) -> dict[str, Any]:
    """The handlers behind the endpoints, the text encoder and the index search, on the state the app loads."""
    import faiss

    from mmcl.app.handlers import to_numpy
    from mmcl.app.ui import build_app, make_state

    faiss.omp_set_num_threads(1)  # as `mmcl.app.ui.launch` does
    state, _ = make_state(str(run_dir), str(index_dir))
    demo = build_app(state, str(run_dir))
    handler = {f.api_name: f.fn for f in demo.fns.values() if f.api_name}
    out = {
        "search_text": timed(lambda q: handler["search_text"](q, args.k, ""), texts, args.warmup),
        "search_image": timed(lambda p: handler["search_image"](p, args.k, ""), images, args.warmup),
        "classify": timed(lambda p: handler["classify"](p, LABELS, "short", "", 5, ""), images, args.warmup),
        "encode_text": timed(lambda q: state.pipeline.encode_texts([q]), texts, args.warmup),
    }
    vectors = [to_numpy(state.pipeline.encode_texts([q])) for q in texts]
    out["index_search"] = timed(lambda v: state.index.search(v, args.k), vectors, args.warmup)
    return out


def measure_size(args: argparse.Namespace, n: int, run_dir: Path, dim: int, work: Path) -> dict[str, Any]:
    texts = query_texts(args.warmup + args.calls)
    images = query_images(work / "queries", args.warmup + args.calls)
    index_dir = work / f"index_{n}"
    row: dict[str, Any] = {"n": n, "dim": dim, **build_index_folder(args, n, dim, index_dir, str(run_dir))}
    print(f"[bench] {n:,} images: {row['structure']} index built in {row['build_s']} s", flush=True)
    with serve_app(run_dir, index_dir, work / f"app_{n}.log", args.start_timeout) as app:
        row["app_start_s"], row["app_command"] = app["start_s"], " ".join(app["command"])
        row["app_rss_mib_ready"] = tree_rss_mib(app["pid"])
        print(f"[bench] app answered after {app['start_s']} s; timing requests", flush=True)
        row["http"] = measure_http(args, app["url"], texts, images)
        row["app_rss_mib_end"] = tree_rss_mib(app["pid"])
    row["in_process"] = measure_in_process(args, run_dir, index_dir, texts, images)
    shutil.rmtree(index_dir, ignore_errors=True)
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    skipped = {"quiet": False, "threshold": None, "waited_s": 0, "load_history": [round(os.getloadavg()[0], 2)]}
    load = skipped if args.no_wait else wait_for_quiet()
    with tempfile.TemporaryDirectory(prefix="bench_app_work_") as tmp:
        work = Path(tmp)
        run_dir = args.run.resolve() if args.run else random_run(work / "clip-demo-random")
        dim = embed_dim(run_dir)
        rows = [measure_size(args, n, run_dir, dim, work) for n in args.sizes]
    load["loadavg_end"] = list(os.getloadavg())
    return {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": str(args.run) if args.run else "clip-demo, random weights",
        "rows": rows,
        "machine": machine_info(),
        "load": load,
        "command": reproduce_command("bench_app.py"),
        "tiny": args.tiny,
    }


# ----------------------------------------------------------------------------- results


def _lat(t: dict[str, Any]) -> str:
    return f"{t['p50_ms']:.1f} / {t['p95_ms']:.1f} / {t['p99_ms']:.1f}"


def to_markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    summary, detail, during = [], [], []
    for r in res["rows"]:
        http, local = r["http"], r["in_process"]
        tuned = f"{r['tuning'].get('param')}={r['tuning'].get('value')}" if r["tuning"].get("param") else "-"
        summary.append(
            [
                f"{r['n']:,}",
                f"{r['plan'].get('factory', 'Flat')}, {tuned}",
                f"{r['build_s']:.0f}",
                f"{r['app_start_s']:.0f}",
                f"{r['app_rss_mib_end']:,.0f}",
                f"**{http['search_text']['p50_ms']:.1f}**",
                f"{http['search_text_rest']['p50_ms']:.1f}",
                f"{local['search_text']['p50_ms']:.1f}",
                f"{local['encode_text']['p50_ms']:.1f}",
                f"{local['index_search']['p50_ms']:.2f}",
                f"{http['search_text']['p50_ms'] - local['search_text']['p50_ms']:.1f}",
            ]
        )
        rows = [
            ("/search_text", "gradio_client (HTTP)", http["search_text"]),
            ("/search_text", "REST API (httpx: POST + SSE result)", http["search_text_rest"]),
            ("/search_text", "handler in-process", local["search_text"]),
            ("", "text encoder alone", local["encode_text"]),
            ("", "index search alone", local["index_search"]),
            ("/search_image", "gradio_client (HTTP, upload)", http["search_image"]),
            ("/search_image", "handler in-process", local["search_image"]),
            ("/classify", "gradio_client (HTTP, upload)", http["classify"]),
            ("/classify", "handler in-process", local["classify"]),
        ]
        for endpoint, path, t in rows:
            detail.append([f"{r['n']:,}", endpoint, path, _lat(t), t["calls"]])
            during.append(t["load_after"])
    summary_table = markdown_table(
        [
            "images",
            "index (as `mmcl index build` plans it)",
            "build s",
            "app start s",
            "app RSS MiB",
            "/search_text p50 ms, gradio_client",
            "REST p50 ms",
            "handler p50 ms",
            "encode p50 ms",
            "search p50 ms",
            "HTTP + Gradio ms",
        ],
        summary,
    )
    detail_table = markdown_table(["images", "endpoint", "path", "p50 / p95 / p99 ms", "calls"], detail)
    note = "\n**--tiny run: a check of the script, not a measurement.**\n" if res["tiny"] else ""
    return f"""# The app's retrieval tab: latency end to end
{note}
Model: {res["model"]} ({res["rows"][0]["dim"]}-d embeddings). Index: clustered synthetic unit vectors (as in
bench_index.py) saved in `mmcl index build`'s format, each row's thumbnail one of {s["thumbs"]} generated
{s["thumb_size"]} px JPEGs, so the gallery returns real files. The app runs as `mmcl app RUN --index DIR` in a
subprocess; one request at a time, k = {s["k"]}, {s["calls"]} timed requests per row after {s["warmup"]} warm-up
ones, distinct query texts (captions of held-out generated samples) and distinct uploaded images.
*gradio_client*: `Client.predict(..., api_name=...)`, end to end (queue, upload, SSE; thumbnails not
downloaded: the page fetches them afterwards). *REST*: the same /search_text request through Gradio's REST API
(`POST /gradio_api/call/search_text`, then its SSE result, on one keep-alive httpx connection): the server's
share without gradio_client's own (its result threads poll every 50 ms). *Handler in-process*: the Blocks
function behind the endpoint on the state the app loads (encode + search + formatting), timed after the server
stopped. *HTTP + Gradio*: gradio_client minus handler, at p50. Index search: one faiss thread, as in the app.

{summary_table}

{detail_table}

{machine_markdown(res["machine"], res["load"], during)}

{reproduce_markdown(res["command"])}
"""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res = run(args)
    write_files("app", res, to_markdown(res), args.results)
    if args.tiny:
        shutil.rmtree(args.data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
