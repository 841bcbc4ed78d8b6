"""Shards in an fsspec store: fsspec's in-memory filesystem (memory://), and a store that counts the byte
ranges it serves and fails on demand, to show that a resumed shard is read from its byte offset with range
requests, and that the store's failures are retried and counted as http(s) failures are."""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path

import fsspec
import pytest
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem
from test_shards import make_shards, stream

from mmcl.data.decode import SkipCounter
from mmcl.data.reader import expand_shards, open_at, read_samples
from mmcl.data.remote import FetchOptions
from mmcl.data.shards import StreamState, make_loader
from mmcl.utils import UserError

FAST = FetchOptions(timeout=0.5, retries=3, backoff=0.01, max_backoff=0.05)


class RangeStore(AbstractFileSystem):
    """A store of `files` served in blocks by range reads (as s3fs/gcsfs serve them), recording every range
    fetched; `faults[path]` lists what the next fetches of that file do: 'error' (a dropped connection),
    'hang' (no answer for 2 s), 'ok'."""

    protocol = "rangestore"
    files: dict[str, bytes] = {}
    fetched: list[tuple[str, int, int]] = []
    faults: dict[str, list[str]] = {}

    def info(self, path: str, **kwargs) -> dict:
        path = self._strip_protocol(path)
        if path not in self.files:
            raise FileNotFoundError(path)
        return {"name": path, "size": len(self.files[path]), "type": "file"}

    def ls(self, path: str, detail: bool = True, **kwargs):
        path = self._strip_protocol(path).rstrip("/")
        found = [self.info(p) for p in sorted(self.files) if p.rsplit("/", 1)[0] == path]
        return found if detail else [f["name"] for f in found]

    def _open(self, path: str, mode: str = "rb", block_size=None, autocommit=True, cache_options=None, **kw):
        size = self.info(path)["size"]
        return RangeFile(self, self._strip_protocol(path), mode, block_size=4096, size=size)


class RangeFile(AbstractBufferedFile):
    def _fetch_range(self, start: int, end: int) -> bytes:
        plan = RangeStore.faults.get(self.path, [])
        fault = plan.pop(0) if plan else "ok"
        if fault == "error":
            raise ConnectionResetError("connection reset by the store")
        if fault == "hang":  # answers after the reader gave up: not recorded (a later test may be running)
            time.sleep(2)
            return RangeStore.files[self.path][start:end]
        RangeStore.fetched.append((self.path, start, end))
        return RangeStore.files[self.path][start:end]


@pytest.fixture
def store(tmp_path):
    fsspec.register_implementation("rangestore", RangeStore, clobber=True)
    local = make_shards(tmp_path / "local", 3, 12)
    RangeStore.files = {f"shards/{Path(p).name}": Path(p).read_bytes() for p in local}
    big = make_shards(tmp_path / "big", 1, 400, prefix="b")[0]  # over 1 MiB: read in several requests
    RangeStore.files["shards/big.tar"] = Path(big).read_bytes()
    RangeStore.fetched, RangeStore.faults = [], {}
    yield RangeStore
    RangeStore.files, RangeStore.fetched, RangeStore.faults = {}, [], {}


@pytest.fixture
def memory(tmp_path):
    fs = fsspec.filesystem("memory")
    local = make_shards(tmp_path / "local", 4, 9)
    for p in local:
        fs.pipe(f"/mmcl-test/shards/{Path(p).name}", Path(p).read_bytes())
    yield tmp_path / "local"
    fs.rm("/mmcl-test", recursive=True)


def test_memory_store_shards_read_like_local_ones(memory):
    local = [s["__key__"] for s in read_samples(expand_shards(str(memory)), SkipCounter())]
    for pattern in ("memory://mmcl-test/shards/{00000..00003}.tar", "memory://mmcl-test/shards/*.tar"):
        urls = expand_shards(pattern)
        assert [u.replace(":///", "://") for u in urls] == [f"memory://mmcl-test/shards/{i:05d}.tar" for i in range(4)]
        counter = SkipCounter()
        assert [s["__key__"] for s in read_samples(urls, counter)] == local and counter.counts == {}
    with pytest.raises(UserError, match="matches no file"):
        expand_shards("memory://mmcl-test/none/*.tar")


def test_training_stream_from_a_store_resumes_exactly_with_workers(memory):
    url = "memory://mmcl-test/shards/*.tar"
    full = [b.keys for b in itertools.islice(make_loader(stream(url), 2), 6)]
    assert full == [b.keys for b in itertools.islice(make_loader(stream(memory), 2), 6)]  # as from disk
    s, state = stream(url), StreamState()
    it = iter(make_loader(s, 2))
    for _ in range(3):
        state.record(next(it), s.num_workers)
    del it
    assert all(p["url"].startswith("memory:/") and p["offset"] > 0 for p in state.positions.values())
    assert [b.keys for b in itertools.islice(make_loader(stream(url), 2, state), 3)] == full[3:6]


def test_a_shard_resumed_at_byte_n_is_fetched_from_n(store):
    data = store.files["shards/00001.tar"]
    samples = list(read_samples(["rangestore://shards/00001.tar"], SkipCounter()))
    middle = samples[7]
    store.fetched.clear()
    resumed = list(read_samples(["rangestore://shards/00001.tar"], SkipCounter(), start_offset=middle["__offset__"]))
    assert [s["__key__"] for s in resumed] == [s["__key__"] for s in samples[7:]]
    starts = [start for _, start, _ in store.fetched]
    fetched = sum(end - start for _, start, end in store.fetched)
    assert min(starts) == middle["__offset__"]  # nothing before the offset was asked for
    assert fetched <= len(data) - middle["__offset__"] + 4096  # and nothing read twice (one block of slack)


def test_store_failures_are_retried_from_where_they_stopped_and_counted(store, caplog):
    assert len(store.files["shards/big.tar"]) > 1 << 20
    store.faults = {
        "shards/big.tar": ["ok", "error", "hang"],  # dropped mid-shard, then silent: both retried, then read
        "shards/00002.tar": ["error"] * 10,  # never comes back
    }
    urls = ["rangestore://shards/big.tar", "rangestore://shards/missing.tar", "rangestore://shards/00002.tar"]
    counter = SkipCounter()
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="mmcl.data"):
        keys = [s["__key__"] for s in read_samples(urls, counter, options=FAST)]
    assert time.monotonic() - t0 < 15
    assert keys == [f"b00000{i:04d}" for i in range(400)]
    assert counter.counts == {"store_not_found": 1, "store_error": 1}
    retried = [start for path, start, _ in store.fetched if path == "shards/big.tar"][1:]
    assert retried and min(retried) > 0  # the retries asked for the rest, not the shard again from byte 0
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("skipped shard rangestore://shards/missing.tar (store_not_found") for line in lines)
    assert any("store_timeout" in line for line in lines)  # the hang was cut at the timeout, then retried


def test_open_at_reads_the_same_bytes_as_the_file(store):
    data = store.files["shards/00002.tar"]
    for offset in (0, 512, 4096 + 17, len(data) - 10):
        with open_at("rangestore://shards/00002.tar", offset) as f:
            assert f.read() == data[offset:]


def test_a_store_without_its_package_is_one_line(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_fsspec(name, *args, **kwargs):
        if name == "fsspec" or name.startswith("fsspec."):
            raise ImportError("No module named 'fsspec'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fsspec)
    with pytest.raises(UserError, match=r"needs fsspec: pip install 'mmcl\[fsspec\]'"):
        expand_shards("s3://bucket/train/{0..3}.tar")
    monkeypatch.undo()
    with pytest.raises(UserError, match="nosuchstore://") as e:
        expand_shards("nosuchstore://bucket/{0..3}.tar")
    assert "\n" not in str(e.value)
