"""Training from shards served over HTTP by a local server that stalls, drops connections, answers 503 and
restarts: mmcl retries with backoff, skips and counts what stays unreadable, and keeps going."""

from __future__ import annotations

import io
import json
import logging
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmcl.config import ConfigError, DataConfig, load_experiment
from mmcl.data.decode import SkipCounter
from mmcl.data.pipeline import fetch_options as build_fetch
from mmcl.data.reader import expand_shards, read_samples
from mmcl.data.remote import FetchOptions
from mmcl.engine.metrics import read_metrics
from mmcl.engine.trainer import train

STALL_S = 1.5  # the server's stall; the client's timeout is well below it
TRICKLE_S = 0.05  # the trickling server's pause between two bytes: every byte comes well within the timeout
FAST = FetchOptions(timeout=0.4, retries=4, backoff=0.05, max_backoff=0.4)


def write_shards(root: Path, n_shards: int, per_shard: int) -> dict[str, list[str]]:
    """Shards of 48 px JPEGs (large enough that a shard spans several reads); keys per shard name."""
    root.mkdir(parents=True, exist_ok=True)
    keys: dict[str, list[str]] = {}
    rng = np.random.default_rng(0)
    for s in range(n_shards):
        name = f"{s:05d}.tar"
        keys[name] = []
        with tarfile.open(root / name, "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
                for ext, data in (("jpg", buf.getvalue()), ("txt", f"caption {key}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                keys[name].append(key)
    return keys


def _header_boundary(tar: bytes) -> int:
    """The offset of the member header nearest the middle of `tar` (a cut there leaves a shorter valid-looking tar)."""
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        offsets = [m.offset for m in t.getmembers()]
    return offsets[len(offsets) // 2]


class FaultyServer:
    """A threaded HTTP server on 127.0.0.1 serving the files of `root`, with faults planned per file.

    `faults[name]` lists what the next requests for `name` get, in order: 'stall' (headers and a few bytes,
    then silence for STALL_S), 'drop' (the connection closed half way through the body), '503', 'restart'
    (the connection closed and the whole server down for a moment, then back on the same port), 'cut' (no
    Content-Length, the body closed at the member header boundary half way through), 'range_ignored' (a Range
    request answered 206 with the body from byte 0; 'range_unlabelled': the same without a Content-Range), 'trickle' (one byte every TRICKLE_S); requests past
    the list are served normally. `always` names files that always answer 503. Ranges are honoured.
    """

    def __init__(self, root: Path, faults: dict[str, list[str]], always: tuple[str, ...] = ()) -> None:
        self.root, self.faults, self.always = root, {k: list(v) for k, v in faults.items()}, set(always)
        self.requests: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        self.port = 0
        self._serve()

    def _serve(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep the test output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                name = self.path.lstrip("/")
                with server.lock:
                    plan = server.faults.get(name, [])
                    fault = "503" if name in server.always else (plan.pop(0) if plan else "ok")
                    server.requests.append((name, fault, self.headers.get("Range")))
                if fault == "503":
                    self.send_error(503)
                    return
                if fault == "restart":
                    self.close_connection = True
                    server.restart(0.3)
                    return
                path = server.root / name
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
                if fault in ("range_ignored", "range_unlabelled"):
                    start, partial = 0, bool(start)
                else:
                    partial = bool(start)
                self.send_response(206 if partial else 200)
                if fault != "cut":
                    self.send_header("Content-Length", str(len(data) - start))
                if partial and fault != "range_unlabelled":
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                body = data[start:]
                try:
                    if fault == "cut":
                        self.wfile.write(body[: _header_boundary(body)])
                        self.close_connection = True
                        return
                    if fault == "trickle":
                        for i in range(len(body)):
                            self.wfile.write(body[i : i + 1])
                            self.wfile.flush()
                            time.sleep(TRICKLE_S)
                        return
                    if fault == "stall":
                        self.wfile.write(body[:1024])
                        self.wfile.flush()
                        time.sleep(STALL_S)
                        self.close_connection = True
                        return
                    if fault == "drop":
                        self.wfile.write(body[: len(body) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                        return
                    self.wfile.write(body)
                except OSError:  # the client gave up on a stalled response
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def restart(self, down_s: float) -> None:
        def cycle() -> None:
            self.httpd.shutdown()
            self.httpd.server_close()
            time.sleep(down_s)
            self._serve()

        threading.Thread(target=cycle, daemon=True).start()

    def url(self, pattern: str) -> str:
        return f"http://127.0.0.1:{self.port}/{pattern}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path):
    servers: list[FaultyServer] = []

    def start(n_shards: int, per_shard: int, faults: dict[str, list[str]], always: tuple[str, ...] = ()):
        keys = write_shards(tmp_path / "shards", n_shards, per_shard)
        server = FaultyServer(tmp_path / "shards", faults, always)
        servers.append(server)
        return server, keys

    yield start
    for server in servers:
        server.close()


def test_every_fault_is_retried_and_a_dead_shard_is_counted_by_url(served, caplog):
    faults = {"00001.tar": ["stall"], "00002.tar": ["drop"], "00003.tar": ["503", "503"], "00004.tar": ["restart"]}
    server, keys = served(6, 6, faults, always=("00005.tar",))
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="mmcl.data"):
        t0 = time.monotonic()
        samples = list(read_samples(expand_shards(server.url("{00000..00005}.tar")), counter, options=FAST))
        elapsed = time.monotonic() - t0
    got = [s["__key__"] for s in samples]
    assert got == [k for name in sorted(keys)[:5] for k in keys[name]]  # each readable sample once, in order
    assert all(s["jpg"][:2] == b"\xff\xd8" and s["txt"] for s in samples)
    assert counter.counts == {"http_503": 1}  # only the shard that never came back
    dead = server.url("00005.tar")
    assert any(r.getMessage().startswith(f"skipped shard {dead} (http_503") for r in caplog.records)
    requests = {name: [(f, rng) for n, f, rng in server.requests if n == name] for name in keys}
    assert [f for f, _ in requests["00001.tar"]] == ["stall", "ok"]
    assert requests["00002.tar"][0][0] == "drop" and requests["00002.tar"][1][1].startswith("bytes=")
    assert [f for f, _ in requests["00003.tar"]] == ["503", "503", "ok"]
    assert len(requests["00005.tar"]) == FAST.retries + 1  # bounded: retried, then given up
    assert elapsed < 20


def test_retry_options_are_validated():
    with pytest.raises(ConfigError, match="http_retries"):
        DataConfig(http_retries=-1).validate()
    with pytest.raises(ConfigError, match="http_timeout"):
        DataConfig(http_timeout=0).validate()
    with pytest.raises(ConfigError, match="http_min_speed"):
        DataConfig(http_min_speed=-1).validate()
    assert build_fetch(DataConfig(http_min_speed=7)).min_speed == 7


def test_training_over_http_survives_the_faults_and_reports_them(served, tmp_path):
    faults = {"00000.tar": ["drop"], "00001.tar": ["stall", "503"], "00002.tar": ["restart"]}
    server, _ = served(4, 8, faults, always=("00003.tar",))
    cfg = load_experiment(
        None,
        [
            "model.preset=clip-tiny",
            "train.trackers=[none]",
            "train.progress=false",
            "train.warmup_steps=1",
            "train.steps=6",
            "train.log_every=3",
            "train.ckpt_every=100",
            "data.batch_size=8",
            "data.num_workers=0",
            "data.shuffle_buffer=4",
            f"data.train_shards=[{server.url('{00000..00003}.tar')}]",
            "data.http_timeout=0.4",
            "data.http_retries=4",
            "data.http_backoff=0.05",
            "data.http_max_backoff=0.4",
            f"train.output_dir={tmp_path / 'run'}",
        ],
    )
    result = train(cfg)
    assert result.step == 6
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(np.isfinite(r["loss"]) for r in rows)
    # 3 readable shards x 8 = 3 batches an epoch: 6 steps take two epochs, each failing on the dead shard once
    assert rows[-1]["skipped_http_503"] == 2
    assert json.loads(json.dumps(rows[-1]))  # metrics stay plain JSON


def test_a_truncated_tar_over_http_is_counted_not_read_as_a_shorter_shard(served, tmp_path):
    server, keys = served(3, 8, {"00001.tar": ["cut"]})
    full = (tmp_path / "shards" / "00000.tar").read_bytes()
    (tmp_path / "shards" / "00000.tar").write_bytes(full[: _header_boundary(full)])  # served whole, Content-Length true
    counter = SkipCounter()
    samples = list(read_samples(expand_shards(server.url("{00000..00002}.tar")), counter, options=FAST))
    got = [s["__key__"] for s in samples]
    assert counter.counts == {"unreadable_tar": 2}  # the file cut on disk, and the body cut by the connection
    assert got[-8:] == keys["00002.tar"]
    for name in ("00000.tar", "00001.tar"):  # only the complete samples before the cut, none twice
        read = [k for k in got if k[:5] == name[:5]]
        assert read == keys[name][: len(read)] and len(read) < 8


def test_a_206_answer_from_byte_0_is_not_spliced_into_the_stream(served):
    server, keys = served(2, 8, {"00000.tar": ["drop", "range_ignored"], "00001.tar": ["drop", "range_unlabelled"]})
    counter = SkipCounter()
    samples = list(read_samples(expand_shards(server.url("{00000..00001}.tar")), counter, options=FAST))
    assert [s["__key__"] for s in samples] == keys["00000.tar"] + keys["00001.tar"] and counter.counts == {}
    # an honest Content-Range from 0: the bytes before the resume point are skipped; none at all: asked again
    faults = [f for _, f, _ in server.requests]
    assert faults == ["drop", "range_ignored", "drop", "range_unlabelled", "ok"]
    resumed = [r for _, f, r in server.requests if f != "drop"]
    assert all(r.startswith("bytes=") and r != "bytes=0-" for r in resumed)


def test_a_dead_shard_is_reported_as_a_skipped_shard(served, tmp_path, caplog):
    server, keys = served(1, 4, {})
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="mmcl.data"):
        samples = list(read_samples([server.url("00001.tar"), server.url("00000.tar")], counter, options=FAST))
    assert len(samples) == 4 and counter.counts == {"http_404": 1}
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith(f"skipped shard {server.url('00001.tar')} (http_404") for line in lines), lines
    assert not any("skipped sample" in line for line in lines), lines


@pytest.mark.timeout(60)
def test_a_trickling_server_is_given_up_on_and_counted(served, caplog):
    """One byte every TRICKLE_S: no read ever waits `timeout`, yet a shard would take hours. Bounded, counted."""
    server, keys = served(2, 6, {"00000.tar": ["trickle"] * (FAST.retries + 1)})
    counter = SkipCounter()
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="mmcl.data"):
        samples = list(read_samples(expand_shards(server.url("{00000..00001}.tar")), counter, options=FAST))
    elapsed = time.monotonic() - t0
    assert counter.counts == {"http_slow": 1}
    assert [s["__key__"] for s in samples] == keys["00001.tar"]
    assert [f for n, f, _ in server.requests if n == "00000.tar"] == ["trickle"] * (FAST.retries + 1)  # retried
    assert any(r.getMessage().startswith(f"skipped shard {server.url('00000.tar')} (http_slow") for r in caplog.records)
    assert elapsed < 15


def test_a_slow_consumer_is_not_taken_for_a_slow_server(served):
    """The rate is the server's while the reader waits for it: time the reader spends elsewhere never counts."""
    picky = FetchOptions(timeout=0.2, retries=0, min_speed=1e6)  # localhost delivers far faster than 1 MB/s
    server, keys = served(1, 60, {})  # ~200 kB: several 64 kB reads, each after a pause longer than the timeout
    counter = SkipCounter()
    got = []
    for sample in read_samples([server.url("00000.tar")], counter, options=picky):
        got.append(sample["__key__"])
        if len(got) % 15 == 0:
            time.sleep(0.3)
    assert got == keys["00000.tar"] and counter.counts == {}
