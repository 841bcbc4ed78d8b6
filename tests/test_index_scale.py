"""Index choices by size and memory budget, recall tuning, the on-disk layout, and a build resumed after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmcl.index import EmbeddingIndex, build_index
from mmcl.index.plan import exact_topk, parse_bytes, plan_index, recall_at_k
from mmcl.utils import UserError

GIB = 2**30


def clustered(n: int, dim: int = 32, clusters: int = 50, seed: int = 0) -> np.ndarray:
    """Unit vectors around `clusters` centres: the structure of real embeddings, unlike uniform noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_plan_follows_size_and_memory_budget():
    assert plan_index(50_000, 512, memory_budget=8 * GIB).factory == "Flat"
    assert plan_index(50_000, 512, memory_budget=60 * 2**20).factory == "SQfp16"  # 100 MB of fp32 does not fit
    big = plan_index(1_000_000, 512, memory_budget=8 * GIB)
    assert big.factory == "IVF4096,Flat" and not big.on_disk
    assert plan_index(1_000_000, 512, memory_budget=GIB + GIB // 2).storage == "fp16"
    assert plan_index(1_000_000, 512, memory_budget=GIB // 2 + GIB // 4).storage == "sq8"
    huge = plan_index(10_000_000, 512, memory_budget=2 * GIB)
    assert huge.storage == "sq8" and huge.on_disk and huge.bytes_estimate < 2 * GIB  # lists memory-mapped
    assert huge.factory == "IVF16384_HNSW32,SQ8"  # a graph finds the nearest of 16k lists
    assert plan_index(1_000_000, 512, storage="pq", memory_budget=8 * GIB).factory == "IVF4096,PQ64x8"
    assert plan_index(200_000, 512, "hnsw", memory_budget=8 * GIB).factory == "HNSW32,Flat"
    with pytest.raises(UserError, match="needs an IVF"):
        plan_index(10, 8, "flat", storage="pq", memory_budget=GIB)
    assert parse_bytes("4G") == 4 * GIB and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("0") == 0
    with pytest.raises(UserError, match="as a size"):
        parse_bytes("lots")


def test_exact_search_is_exact():
    x = clustered(3000)
    index = EmbeddingIndex(32, kind="flat")
    index.add(x)
    scores, metas = index.search(x[:5], k=7)
    truth_s, truth_i = exact_topk(x[:5], [x], 7)
    assert [[m["id"] for m in row] for row in metas] == truth_i.tolist()
    np.testing.assert_allclose(scores, truth_s, rtol=1e-5)
    assert [row[0]["id"] for row in metas] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_exact_search_split_over_threads_equals_one_scan(monkeypatch, threads):
    """A few queries are scanned one block of rows per thread; the merged top-k is the whole scan's."""
    import faiss

    import mmcl.index.store

    monkeypatch.setattr(mmcl.index.store, "SPLIT_SCAN_MIN", 100)
    x = clustered(5003, dim=16, clusters=20)
    index = EmbeddingIndex(16, kind="flat")
    index.add(x)
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        for q in (x[:1], x[4990:5000], x[:3] * -1):  # own vectors (last block too) and far-off queries
            scores, metas = index.search(q, k=12)
            truth_s, truth_i = exact_topk(q, [x], 12)
            assert [[m["id"] for m in row] for row in metas] == truth_i.tolist()
            np.testing.assert_allclose(scores, truth_s, rtol=1e-5)
        assert faiss.omp_get_max_threads() == threads  # the caller's thread setting is left as it was
    finally:
        faiss.omp_set_num_threads(before)


@pytest.mark.parametrize("kind,storage", [("ivf", "fp32"), ("ivf", "fp16"), ("ivf", "sq8"), ("hnsw", "fp32")])
def test_search_breadth_is_tuned_to_the_target_recall(kind, storage):
    both = clustered(6200)
    x, queries = both[:6000], both[6000:]  # queries from the same distribution, never stored
    chunks = [x[:2500], x[2500:]]
    index = EmbeddingIndex.from_chunks(
        32, chunks, [{"n": i} for i in range(6000)], kind=kind, storage=storage, target_recall=0.9, memory_budget=GIB
    )
    assert index.structure == kind and index.plan["storage"] == storage
    assert index.tuning["recall"] >= 0.9 and index.tuning["param"] == ("nprobe" if kind == "ivf" else "efSearch")
    _, truth = exact_topk(queries, [x], 10)
    _, found = index.search(queries, k=10)
    ids = np.array([[m["id"] for m in row] for row in found])
    assert recall_at_k(ids, truth, None, 10) >= 0.85  # what the tuning promised, on other queries
    assert index.metas[4321] == {"n": 4321, "id": 4321}


def test_hnsw_coarse_quantizer_is_tuned_saved_and_loaded(monkeypatch, tmp_path):
    """Past HNSW_COARSE_FROM lists the centroids are found by a graph; tuning widens it with nprobe."""
    import faiss

    import mmcl.index.plan

    monkeypatch.setattr(mmcl.index.plan, "HNSW_COARSE_FROM", 32)
    both = clustered(6200)
    x, queries = both[:6000], both[6000:]
    params = {"kind": "ivf", "storage": "sq8", "nlist": 64, "target_recall": 0.9, "memory_budget": 100_000}
    index = EmbeddingIndex.from_chunks(32, [x], [{} for _ in range(6000)], **params)
    assert index.plan["factory"] == "IVF64_HNSW32,SQ8" and index.on_disk
    ivf = faiss.extract_index_ivf(index._index)
    coarse = faiss.downcast_index(ivf.quantizer)
    assert isinstance(coarse, faiss.IndexHNSW) and coarse.hnsw.efSearch >= 2 * ivf.nprobe
    index.save(tmp_path / "idx")
    loaded = EmbeddingIndex.load(tmp_path / "idx")
    _, truth = exact_topk(queries, [x], 10)
    _, found = loaded.search(queries, k=10)
    ids = np.array([[m["id"] for m in row] for row in found])
    assert recall_at_k(ids, truth, None, 10) >= 0.85
    assert faiss.extract_index_ivf(loaded._index).nprobe == ivf.nprobe


def test_on_disk_lists_are_memory_mapped_and_search_the_same(tmp_path):
    import faiss

    x = clustered(5000)
    params = {"kind": "ivf", "storage": "sq8", "memory_budget": 100_000}  # 5000 x 32 B of lists does not fit
    index = EmbeddingIndex.from_chunks(32, [x], [{} for _ in range(5000)], **params)
    assert index.on_disk and index.plan["on_disk"]
    index.save(tmp_path / "idx")
    loaded = EmbeddingIndex.load(tmp_path / "idx")
    invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(loaded._index).invlists)
    assert isinstance(invlists, faiss.OnDiskInvertedLists)  # read from the file on demand, not loaded
    s1, m1 = index.search(x[:20], k=10)
    s2, m2 = loaded.search(x[:20], k=10)
    assert m1 == m2 and np.allclose(s1, s2)
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["on_disk"] and manifest["tuning"]["param"] == "nprobe" and manifest["plan"]["factory"]


SLOW_BUILD = """
import sys, time
import numpy as np, torch
from mmcl.index import build_index

class Slow:
    can_encode, can_caption = True, False
    def encode_images(self, images):
        time.sleep(0.15)
        return torch.tensor(np.stack([np.asarray(im, np.float32).mean((0, 1)) for im in images]))

build_index(Slow(), [sys.argv[1]], sys.argv[2], batch_size=4, chunk_size=8, progress=False)
"""


class Counting:
    can_encode, can_caption = True, False

    def __init__(self) -> None:
        self.images = 0

    def encode_images(self, images):
        import torch

        self.images += len(images)
        return torch.tensor(np.stack([np.asarray(im, np.float32).mean((0, 1)) for im in images]))


def test_build_resumes_after_sigkill(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(60):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"im{i:03d}.png")
        (folder / f"im{i:03d}.txt").write_text(f"image {i}")
    (folder / "im030.png").write_bytes(b"not an image")  # a skipped input must not shift the resume
    out = tmp_path / "idx"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_BUILD, str(folder), str(out)], env=env)
    state = out / ".build" / "state.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["images"] >= 24:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(state.read_text())["images"]
    assert 24 <= done < 59 and not (out / "manifest.json").exists()

    encoder = Counting()
    resumed = build_index(encoder, [str(folder)], out, batch_size=4, chunk_size=8, progress=False)
    assert encoder.images == 59 - done  # only what the killed run had not saved
    fresh = build_index(Counting(), [str(folder)], tmp_path / "fresh", batch_size=4, progress=False)
    assert resumed.metas == fresh.metas and np.allclose(resumed.vectors(), fresh.vectors())
    assert resumed.info["skipped"] == {"not_an_image": 1} and not (out / ".build").exists()
    assert len(list((out / "images").glob("*.jpg"))) == 59


def test_loaded_metadata_rows_are_read_on_demand_and_equal_the_saved(tmp_path):
    from mmcl.index import MetaRows

    x = clustered(1200)
    metas = [{"key": f"k{i}", "caption": f"ein Bild\nmit «{i}» ✓"} for i in range(1200)]
    index = EmbeddingIndex(32, kind="flat")
    index.add(x, metas)
    index.save(tmp_path / "idx")
    loaded = EmbeddingIndex.load(tmp_path / "idx")
    assert isinstance(loaded.metas, MetaRows)  # not a list of 1200 parsed dicts
    assert loaded.metas == index.metas and len(loaded) == 1200
    assert loaded.metas[-1] == {**metas[-1], "id": 1199} and loaded.metas[3:5] == index.metas[3:5]
    with pytest.raises(IndexError):
        loaded.metas[1200]
    _, found = loaded.search(x[7], k=3)
    assert found[0][0] == {**metas[7], "id": 7}
    loaded.add(x[:2], [{"key": "new"}] * 2)  # growing copies the rows into memory, then appends
    assert isinstance(loaded.metas, list) and loaded.metas[1201] == {"key": "new", "id": 1201}
    loaded.save(tmp_path / "idx")
    again = EmbeddingIndex.load(tmp_path / "idx")
    assert len(again) == 1202 and again.metas[5] == index.metas[5]
    (tmp_path / "cut.jsonl").write_text('{"id": 0}\n{"id": 1')
    with pytest.raises(UserError, match="middle of a row"):
        MetaRows(tmp_path / "cut.jsonl")


def test_tuning_stops_where_recall_levels_off_and_the_manifest_tuning_is_applied_on_load(tmp_path):
    import faiss

    import mmcl.index.plan

    both = clustered(20200, clusters=5)  # few, wide clusters: 4-byte PQ codes rank close neighbours wrongly
    x, queries = both[:20000], both[20000:]
    params = {"kind": "ivf", "storage": "pq", "nlist": 256, "target_recall": 0.9999, "memory_budget": GIB}
    index = EmbeddingIndex.from_chunks(32, [x], [{} for _ in range(20000)], **params)
    tried = index.tuning["tried"]
    assert tried[-1][1] - tried[-5][1] < mmcl.index.plan.PLATEAU  # four doublings added nothing: stop there
    assert index.tuning["value"] == tried[-5][0] < 256  # the plateau's start, not a scan of every list
    assert faiss.extract_index_ivf(index._index).nprobe == index.tuning["value"]
    index.save(tmp_path / "idx")
    loaded = EmbeddingIndex.load(tmp_path / "idx")
    assert faiss.extract_index_ivf(loaded._index).nprobe == index.tuning["value"]
    loaded.tune([x], 0.05)  # a lower target: a narrower search, written to the manifest only
    loaded.save_tuning(tmp_path / "idx")
    narrow = EmbeddingIndex.load(tmp_path / "idx")
    assert narrow.target_recall == 0.05 and narrow.tuning["recall"] >= 0.05
    assert faiss.extract_index_ivf(narrow._index).nprobe == narrow.tuning["value"] < index.tuning["value"]
    _, truth = exact_topk(queries, [x], 10)
    _, found = narrow.search(queries, k=10)
    assert recall_at_k(np.array([[m["id"] for m in r] for r in found]), truth, None, 10) >= 0.03


def test_tuning_on_given_queries_reaches_the_target_on_queries_of_that_kind():
    """Queries off the stored vectors' manifold (text queries of an image index) need a broader search than
    held-out stored vectors do; tuned on queries of their kind, the target holds for them."""
    x = clustered(8000, clusters=40)
    rng = np.random.default_rng(5)
    gap = rng.standard_normal(32).astype(np.float32)
    q = x[rng.integers(0, 8000, 600)] + 0.5 * gap / np.linalg.norm(gap) + 0.3 * rng.standard_normal((600, 32))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    tune_q, test_q = q[:300], q[300:]
    _, truth = exact_topk(test_q, [x], 10)

    def recall(index: EmbeddingIndex) -> float:
        _, found = index.search(test_q, k=10)
        return recall_at_k(np.array([[m["id"] for m in r] for r in found]), truth, None, 10)

    params = {"kind": "ivf", "storage": "fp32", "nlist": 128, "target_recall": 0.95, "memory_budget": GIB}
    on_stored = EmbeddingIndex.from_chunks(32, [x], [{} for _ in range(8000)], **params)
    on_queries = EmbeddingIndex.from_chunks(32, [x], [{} for _ in range(8000)], tune_q, **params)
    assert on_queries.tuning["on"] == "300 given queries" and "stored" in on_stored.tuning["on"]
    assert on_queries.tuning["value"] > on_stored.tuning["value"]
    assert recall(on_queries) >= 0.92 and recall(on_queries) > recall(on_stored)
