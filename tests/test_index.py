"""The faiss index: exact vs approximate search against a numpy reference, growth, save/load, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmcl.index import EmbeddingIndex, EmptyIndexError, read_manifest
from mmcl.utils import UserError


def unit(n: int, d: int, seed: int = 0, clusters: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    if clusters:  # real embeddings cluster; IVF is built for that
        centres = rng.standard_normal((clusters, d)).astype(np.float32) * 3
        x += centres[rng.integers(0, clusters, n)]
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_topk(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :k]


def recall(metas: list[list[dict | None]], truth: np.ndarray) -> float:
    got = [{m["id"] for m in row if m is not None} for row in metas]
    return float(np.mean([len(g & set(t)) / len(t) for g, t in zip(got, truth)]))


def test_flat_search_matches_numpy_and_carries_metadata():
    x, q = unit(300, 16), unit(20, 16, seed=1)
    index = EmbeddingIndex(16, kind="flat")
    ids = index.add(x[:100], [{"key": f"k{i}"} for i in range(100)])
    ids += index.add(x[100:], [{"key": f"k{i}"} for i in range(100, 300)])
    assert ids == list(range(300)) and len(index) == 300 and index.structure == "flat"
    scores, metas = index.search(q, k=5)
    truth = reference_topk(x, q, 5)
    assert [[m["id"] for m in row] for row in metas] == truth.tolist()
    assert [[m["key"] for m in row] for row in metas] == [[f"k{i}" for i in row] for row in truth]
    np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, truth, 1), rtol=1e-5, atol=1e-6)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


def test_k_larger_than_collection_is_clamped():
    index = EmbeddingIndex(4, kind="flat")
    index.add(unit(3, 4))
    scores, metas = index.search(unit(1, 4, seed=2), k=10)
    assert scores.shape == (1, 3) and len(metas[0]) == 3


def test_auto_switches_to_ivf_past_threshold_and_keeps_recall():
    x, q = unit(3000, 32, clusters=30), unit(50, 32, seed=3, clusters=30)
    index = EmbeddingIndex(32, kind="auto", ivf_threshold=1500)
    index.add(x[:1000])
    assert index.structure == "flat"
    index.add(x[1000:])  # crosses the threshold: re-trained as IVF with every vector kept
    assert index.structure == "ivf" and len(index) == 3000 and index._index.ntotal == 3000
    np.testing.assert_allclose(index.vectors(), x, atol=1e-6)
    _, metas = index.search(q, k=10)
    assert recall(metas, reference_topk(x, q, 10)) >= 0.9


def test_ivf_retrains_as_the_collection_grows():
    x = unit(5000, 16, clusters=20)
    index = EmbeddingIndex(16, kind="ivf")
    index.add(x[:1000])
    first = index._index.nlist
    index.add(x[1000:])  # 5x growth: re-trained with more lists
    assert index.structure == "ivf" and index._index.nlist > first and index._index.ntotal == 5000


def test_hnsw_recall():
    x, q = unit(1000, 16), unit(30, 16, seed=4)
    index = EmbeddingIndex(16, kind="hnsw")
    index.add(x)
    assert index.structure == "hnsw"
    _, metas = index.search(q, k=10)
    assert recall(metas, reference_topk(x, q, 10)) >= 0.9


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_load_roundtrip(tmp_path, kind):
    x, q = unit(1200, 8, clusters=8), unit(5, 8, seed=5)
    index = EmbeddingIndex(8, kind=kind)
    index.add(x, [{"caption": f"c{i}"} for i in range(len(x))])
    index.info["model"] = "runs/x"
    index.save(tmp_path)
    loaded = EmbeddingIndex.load(tmp_path)
    assert len(loaded) == 1200 and loaded.structure == index.structure and loaded.info["model"] == "runs/x"
    s1, m1 = index.search(q, 7)
    s2, m2 = loaded.search(q, 7)
    np.testing.assert_allclose(s1, s2)
    assert m1 == m2
    loaded.add(unit(10, 8, seed=6))  # incremental after loading
    assert len(loaded) == 1210


def test_save_is_generational_and_manifest_is_the_commit_point(tmp_path):
    index = EmbeddingIndex(4, kind="flat")
    index.add(unit(5, 4))
    index.save(tmp_path)
    index.add(unit(5, 4, seed=1))
    index.save(tmp_path)
    manifest = read_manifest(tmp_path)
    assert manifest["generation"] == 2 and manifest["count"] == 10
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["index.000002.faiss", "manifest.json", "meta.000002.jsonl"]  # old generation removed
    # A crash after writing generation 3's data files but before the manifest leaves generation 2 in force.
    (tmp_path / "index.000003.faiss").write_bytes(b"half written")
    assert len(EmbeddingIndex.load(tmp_path)) == 10


def test_load_detects_inconsistent_files(tmp_path):
    index = EmbeddingIndex(4, kind="flat")
    index.add(unit(5, 4))
    index.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    meta = tmp_path / manifest["meta_file"]
    meta.write_text("".join(meta.read_text().splitlines(keepends=True)[:3]))
    with pytest.raises(UserError, match=rf"{manifest['meta_file']} is \d+ bytes, the manifest says"):
        EmbeddingIndex.load(tmp_path)  # the manifest's sizes catch it first
    # a manifest from before checksums: the row count still catches it, and faiss's own reader a garbled file
    (tmp_path / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "files"}))
    with pytest.raises(UserError, match="3 metadata rows"):
        EmbeddingIndex.load(tmp_path)
    (tmp_path / manifest["index_file"]).write_bytes(b"garbage")
    with pytest.raises(UserError, match="unreadable faiss index"):
        EmbeddingIndex.load(tmp_path)


def test_missing_or_foreign_index_folder(tmp_path):
    with pytest.raises(UserError, match="no index here"):
        EmbeddingIndex.load(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(UserError, match="not an mmcl index"):
        EmbeddingIndex.load(tmp_path)


def test_empty_index_search_is_a_clear_error_and_saves(tmp_path):
    index = EmbeddingIndex(8)
    with pytest.raises(EmptyIndexError, match="empty"):
        index.search(unit(1, 8), k=3)
    index.save(tmp_path)
    loaded = EmbeddingIndex.load(tmp_path)
    assert len(loaded) == 0
    with pytest.raises(EmptyIndexError):
        loaded.search(unit(1, 8), k=3)


def test_bad_vectors_are_refused():
    index = EmbeddingIndex(8)
    with pytest.raises(UserError, match=r"\(N, 8\)"):
        index.add(unit(3, 4))
    with pytest.raises(UserError, match="NaN"):
        index.add(np.full((1, 8), np.nan))
    with pytest.raises(UserError, match="metadata"):
        index.add(unit(3, 8), [{}])
    with pytest.raises(UserError, match="unknown index kind"):
        EmbeddingIndex(8, kind="lsh")
    assert len(index) == 0


def test_torch_vectors_accepted():
    import torch

    index = EmbeddingIndex(8, kind="flat")
    index.add(torch.nn.functional.normalize(torch.randn(4, 8), dim=-1))
    assert len(index) == 4
