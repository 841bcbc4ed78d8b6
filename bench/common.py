"""Helpers shared by the side-by-side benchmarks against open_clip (`bench_loader.py`, `bench_train.py`).

Synthetic shards written once and reused, clustered embedding-like vectors (`bench_index.py`, `bench_app.py`),
machine description, load-average gating, peak memory of a process tree, the open_clip webdataset workaround,
and the one results writer (`write_results`: atomic JSON + markdown in one skeleton).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DATA = REPO / "data" / "bench"  # /data/ is git-ignored: shards are cached here between runs
OPENCLIP_TINY_NAME = "open_clip-tiny-64"  # open_clip's name for mmcl's clip-tiny-64 preset (see openclip_tiny_config)


# ----------------------------------------------------------------------------- data


def synthetic_shards(
    out_dir: Path, n: int, split: str = "train", image_size: int = 64, maxcount: int = 1000, num_workers: int = 2
) -> Path:
    """`n` built-in synthetic samples as shards in `out_dir` (kept if already written with the same options).

    The writer starts "spawn" workers: callers need an `if __name__ == "__main__":` guard.
    """
    from mmcl.data.writer import write_synthetic_shards

    write_synthetic_shards(
        out_dir, n, split=split, image_size=image_size, maxcount=maxcount, num_workers=num_workers, progress=False
    )
    return out_dir


def brace_pattern(shard_dir: Path) -> str:
    """`DIR/{00000..000NN}.tar` for open_clip's `--train-data` (it wants a brace pattern, not a folder)."""
    tars = sorted(shard_dir.glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"no .tar in {shard_dir}")
    first, last = tars[0].stem, tars[-1].stem
    return str(shard_dir / (f"{first}.tar" if first == last else f"{{{first}..{last}}}.tar"))


# ----------------------------------------------------------------------------- embedding-like vectors

CLUSTER_CENTRES = 4096
VECTOR_CHUNK = 250_000


def _centres(dim: int) -> Any:
    import numpy as np

    return np.random.default_rng(0).standard_normal((CLUSTER_CENTRES, dim)).astype(np.float32)


def clustered_vectors(data_dir: Path, n: int, dim: int, chunk: int = VECTOR_CHUNK) -> list[Any]:
    """`n` unit vectors with the cluster structure of real embeddings, as memory-mapped float16 chunks.

    Each vector is one of 4096 random centres plus Gaussian noise (0.6 per coordinate), normalised: tight
    enough clusters for IVF to find, as in embeddings of images. Written once under
    `data_dir/index_vectors_{dim}d/` (one .npy per `chunk` rows, atomically) and read back on later calls;
    deterministic, so every benchmark and every rerun sees the same vectors.

    Returns:
        (rows, dim) float16 arrays, memory-mapped, `n` rows in all, in order.
    """
    import numpy as np

    out = data_dir / (f"index_vectors_{dim}d" + ("" if chunk == VECTOR_CHUNK else f"_chunk{chunk}"))
    out.mkdir(parents=True, exist_ok=True)
    centres = _centres(dim)
    chunks = []
    for c in range(0, n, chunk):
        path = out / f"{c // chunk:05d}.npy"
        rows = min(chunk, n - c)
        if not path.is_file() or np.load(path, mmap_mode="r").shape[0] < rows:
            g = np.random.default_rng(1 + c // chunk)
            x = centres[g.integers(0, len(centres), rows)] + 0.6 * g.standard_normal((rows, dim), np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, x.astype(np.float16))
            os.replace(tmp, path)
        chunks.append(np.load(path, mmap_mode="r")[:rows])
    return chunks


def clustered_queries(n: int, dim: int, seed: int = 999) -> Any:
    """(n, dim) float32 unit queries from the distribution of `clustered_vectors`, never stored themselves."""
    import numpy as np

    g = np.random.default_rng(seed)
    centres = _centres(dim)
    q = centres[g.integers(0, len(centres), n)] + 0.6 * g.standard_normal((n, dim))
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


# ----------------------------------------------------------------------------- open_clip


def patch_open_clip() -> None:
    """Make open_clip_train 3.3.0 read shards under webdataset >= 0.2.96 and know the tiny config.

    webdataset yields `{}` as an end-of-shard marker that open_clip's `group_by_keys_nothrow` chokes on
    (`KeyError: 'fname'`, open_clip #935 / webdataset #384); `eof_value=None` turns the marker off.
    Loader workers are forked after this runs, so they inherit the patch.
    """
    import open_clip
    import open_clip_train.data
    from webdataset import tariterators

    open_clip_train.data.tar_file_expander = functools.partial(tariterators.tar_file_expander, eof_value=None)
    open_clip.add_model_config(str(openclip_tiny_config()))
    register_timm_narrow_cnn()
    register_timm_demo_cnn()
    for config in sorted((REPO / "bench" / "configs").glob("*.json")):  # configs the exporter cannot derive
        open_clip.add_model_config(str(config))  # e.g. open_clip-tiny-cnn-64: a timm resnet10t tower
    sized = DATA / "open_clip_configs"  # the same at other image sizes (bench_objectives --image-size)
    if sized.is_dir():
        open_clip.add_model_config(str(sized))


NARROW_CNN_CHANNELS = (38, 76, 152, 304)  # = mmcl's clip-tiny-cnn-narrow-64 preset (timm_kwargs.channels)


def register_timm_narrow_cnn() -> None:
    """timm name `resnet10t_narrow`: resnet10t at the channels of mmcl's `clip-tiny-cnn-narrow-64`.

    open_clip hands a timm tower no keyword arguments besides drop rates, so its twin of the preset
    (bench/configs/open_clip-tiny-cnn-narrow-64.json) names a registered model instead.
    """
    import timm
    from timm.models import register_model

    if "resnet10t_narrow" in timm.list_models("resnet10t_narrow"):
        return

    @register_model
    def resnet10t_narrow(pretrained: bool = False, **kwargs: Any):
        return timm.create_model("resnet10t", pretrained=pretrained, channels=NARROW_CNN_CHANNELS, **kwargs)


# ----------------------------------------------------------------------------- open_clip: the demo's CNN (bench_binding.py)

DEMO_CNN_CHANNELS = (24, 48, 96, 192)  # = mmcl's clip-demo-cnn preset (timm_kwargs.channels)


def register_timm_demo_cnn() -> None:
    """timm name `resnet10t_demo`: resnet10t at the channels of mmcl's `clip-demo-cnn` (the binding recipe's tower),
    named by open_clip's twin of that preset, bench/configs/open_clip-demo-cnn.json."""
    import timm
    from timm.models import register_model

    if "resnet10t_demo" in timm.list_models("resnet10t_demo"):
        return

    @register_model
    def resnet10t_demo(pretrained: bool = False, **kwargs: Any):
        return timm.create_model("resnet10t", pretrained=pretrained, channels=DEMO_CNN_CHANNELS, **kwargs)


# ----------------------------------------------------------------------------- open_clip: clip-tiny-64


def openclip_tiny_config() -> Path:
    """open_clip's model config of mmcl's `clip-tiny-64` preset, derived through mmcl's exporter
    (`open_clip_model_config`), written to `DATA/open_clip-tiny-64.json`: the benchmarks compare the same
    architecture in both libraries from any clone, with no file from outside the repository."""
    from mmcl.config import model_config
    from mmcl.models import build_model
    from mmcl.models.openclip_compat import open_clip_model_config

    cfg = json.dumps(open_clip_model_config(build_model(model_config("clip-tiny-64"))), indent=2)
    path = DATA / f"{OPENCLIP_TINY_NAME}.json"
    if not path.is_file() or path.read_text() != cfg:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(cfg)
        tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- machine and load


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    except OSError:
        pass
    return []


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
        return out.stdout.strip() + ("+uncommitted" if dirty.strip() else "")
    except OSError:
        return "unknown"


def machine_info() -> dict[str, Any]:
    """What a reader needs to compare these numbers with theirs."""
    import open_clip
    import torch
    import webdataset

    try:
        from importlib.metadata import version

        oc_version = version("open_clip_torch")
    except Exception:
        oc_version = getattr(open_clip, "__version__", "?")
    return {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "cpu_simd_flags": _cpu_flags(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "open_clip": oc_version,
        "webdataset": getattr(webdataset, "__version__", "?"),
        "python": platform.python_version(),
        "mmcl_commit": _git_commit(),
        "loadavg_start": list(os.getloadavg()),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def wait_for_quiet(max_load: float = 1.5, poll_s: float = 60.0, max_wait_s: float = 1800.0) -> dict[str, Any]:
    """Poll the 1-minute load average until it is below `max_load` or `max_wait_s` has passed.

    Returns what happened (`quiet` False means the benchmark ran on a busy machine), for the results file.
    """
    start = time.time()
    history = []
    while True:
        load = os.getloadavg()[0]
        history.append(round(load, 2))
        if load < max_load:
            quiet = True
            break
        if time.time() - start + poll_s > max_wait_s:
            quiet = False
            break
        print(f"[bench] 1-min load {load:.2f} >= {max_load}: waiting {poll_s:.0f}s", file=sys.stderr, flush=True)
        time.sleep(poll_s)
    return {"quiet": quiet, "threshold": max_load, "waited_s": round(time.time() - start), "load_history": history}


# ----------------------------------------------------------------------------- memory


class TreeMemory:
    """Peak memory of a process and all its descendants (loader workers included), sampled in a thread.

    `rss` sums resident set sizes every `interval_s` (cheap: /proc/PID/statm). Pages shared between a
    parent and its forked workers count once per process, so it over-states the RAM used; `pss` sums
    proportional set sizes (shared pages split between their users), the better "RAM this costs" figure,
    but reading it walks every page table (~0.1 s of CPU per large process, measured here), so it is
    sampled only every `pss_interval_s` while the RSS is within 10% of its peak: a lower bound.
    """

    def __init__(self, pid: int, interval_s: float = 0.5, pss_interval_s: float = 20.0) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.interval_s, self.pss_interval_s = interval_s, pss_interval_s
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0
        self._last_pss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _procs(self) -> list:
        import psutil

        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return []

    def _sample(self) -> None:
        import psutil

        procs = self._procs()
        rss = 0
        for p in procs:
            try:
                rss += p.memory_info().rss
            except psutil.Error:
                continue
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_procs = max(self.peak_procs, len(procs))
        now = time.monotonic()
        if rss >= 0.9 * self.peak_rss and now - self._last_pss >= self.pss_interval_s:
            self._last_pss = now
            pss = 0
            for p in procs:
                try:
                    pss += p.memory_full_info().pss
                except (psutil.Error, AttributeError):
                    continue
            self.peak_pss = max(self.peak_pss, pss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> dict[str, float]:
        return {
            "peak_rss_mib": round(self.peak_rss / 2**20, 1),
            "peak_pss_mib": round(self.peak_pss / 2**20, 1),
            "max_processes": self.peak_procs,
        }


# ----------------------------------------------------------------------------- results


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def reproduce_command(script: str, argv: Sequence[str] | None = None) -> str:
    args = sys.argv[1:] if argv is None else list(argv)
    module = "bench." + script.removesuffix(".py")  # run from the repository root as a module: no sys.path edits
    return "source .venv/bin/activate && python -m " + shlex.join([module, *args])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_markdown(info: dict[str, Any], load: dict[str, Any] | None = None, during: Sequence[Any] = ()) -> str:
    """The machine and load paragraph of a results file; `during`: 1-min load averages sampled during the run."""
    text = (
        f"Machine: {info['nproc']} CPUs ({info['cpu_model']}; {', '.join(info['cpu_simd_flags']) or 'no AVX'}), "
        f"{info['memory_gib']} GiB; torch {info['torch']} ({info['torch_threads']} threads), "
        f"open_clip {info['open_clip']}, webdataset {info['webdataset']}, Python {info['python']}, "
        f"mmcl {info['mmcl_commit']}; {info['date']}."
    )
    if load is not None:
        state = ("not checked (the run did not wait for a quiet machine)" if load["quiet"] is None else "quiet"
                 if load["quiet"] else "BUSY (other jobs were running; numbers are noisier and lower)")  # fmt: skip
        text += (
            f"\nLoad: 1-min load average {load['load_history'][-1]} when started "
            f"(threshold {load['threshold']}, waited {load['waited_s']} s): {state}; "
            f"load averages at the end {load.get('loadavg_end')}."
        )
    during = [v for v in during if v is not None]
    if during:
        text += (
            f" 1-min load average after each measurement: median {median(during):.1f}, max {max(during):.1f} "
            "(the benchmark itself accounts for about 1-2 of it)."
        )
    return text


def reproduce_markdown(command: str) -> str:
    """The closing lines of every results file: how to run it again."""
    return f"Reproduce:\n\n```\n{command}\n```"


# ----------------------------------------------------------------------------- the one results writer
# Every script's results: NAME.json (the data, the table, machine, load, command) and NAME.md (title, intro,
# the table, more tables, notes, the machine and load paragraph, how to reproduce), both written atomically.


@dataclass
class Table:
    """A further table of a results file, after the main one: a paragraph introducing it, its columns and rows."""

    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str = ""


def current_load() -> dict[str, Any]:
    """The load record of a run that did not wait for a quiet machine (`wait_for_quiet` returns the full one)."""
    return {"quiet": None, "threshold": None, "waited_s": 0, "load_history": [round(os.getloadavg()[0], 2)]}


def results_markdown(
    title: str,
    rows: Sequence[Sequence[Any]],
    columns: Sequence[str],
    notes: str = "",
    machine: dict[str, Any] | None = None,
    *,
    intro: str = "",
    tables: Sequence[Table] = (),
    load: dict[str, Any] | None = None,
    during: Sequence[Any] = (),
    command: str | None = None,
) -> str:
    """The markdown skeleton every results file shares (empty parts left out)."""
    parts = [f"# {title}", intro, markdown_table(columns, rows) if columns else ""]
    for table in tables:
        parts += [table.caption, markdown_table(table.columns, table.rows)]
    parts += [notes, machine_markdown(machine, load, during) if machine else ""]
    parts.append(reproduce_markdown(command) if command else "")
    return "\n\n".join(p.strip("\n") for p in parts if p and p.strip())


def write_results(
    name: str,
    rows: Sequence[Sequence[Any]],
    columns: Sequence[str],
    title: str,
    notes: str = "",
    machine: dict[str, Any] | None = None,
    *,
    intro: str = "",
    tables: Sequence[Table] = (),
    data: dict[str, Any] | None = None,
    load: dict[str, Any] | None = None,
    during: Sequence[Any] = (),
    command: str | None = None,
    out_dir: Path | None = None,
    echo: bool = True,
) -> tuple[Path, Path]:
    """Write `out_dir/NAME.json` and `out_dir/NAME.md` (default `RESULTS`), atomically; print the markdown.

    Args:
        rows, columns: the main table (cells as they are shown).
        title, intro, notes: the heading, the paragraph before the table, the text after the tables.
        machine: `machine_info()` (taken now when None); `load`: `wait_for_quiet()`'s record (the load now
            when None); `during`: 1-min load averages sampled during the run.
        tables: further tables after the main one.
        data: everything else the JSON keeps (the raw measurements, settings).
        command: how to reproduce (`reproduce_command`).
    """
    machine = machine if machine is not None else machine_info()
    load = load if load is not None else current_load()
    load.setdefault("loadavg_end", [round(v, 2) for v in os.getloadavg()])
    markdown = results_markdown(title, rows, columns, notes, machine, intro=intro, tables=tables, load=load,
                                during=during, command=command)  # fmt: skip
    payload = {**(data or {}), "title": title, "columns": list(columns), "rows": [list(r) for r in rows],
               "tables": [asdict(t) for t in tables], "machine": machine, "load": load, "command": command}  # fmt: skip
    return write_files(name, payload, markdown, out_dir, echo)


def write_files(
    name: str, data: dict[str, Any], markdown: str, out_dir: Path | None = None, echo: bool = True
) -> tuple[Path, Path]:
    """`out_dir/NAME.json` and `out_dir/NAME.md` (default `RESULTS`), each written atomically, for scripts whose
    markdown is not (yet) `results_markdown`'s skeleton; print the markdown."""
    from mmcl.utils import atomic_write_text

    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{name}.json", out_dir / f"{name}.md"
    atomic_write_text(js, json.dumps(data, indent=2, default=str) + "\n")
    atomic_write_text(md, markdown.rstrip() + "\n")
    if echo:
        print(markdown)
        print(f"wrote {js} and {md}")
    return js, md
