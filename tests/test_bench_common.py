"""The benchmarks' clustered embedding-like vectors (`bench/common.py`), shared by bench_index.py and bench_app.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.common import clustered_queries, clustered_vectors


def test_clustered_vectors_are_unit_float16_chunks_written_once(tmp_path: Path) -> None:
    chunks = clustered_vectors(tmp_path, 1000, 16, chunk=300)
    assert [c.shape for c in chunks] == [(300, 16), (300, 16), (300, 16), (100, 16)]
    assert all(c.dtype == np.float16 for c in chunks)
    x = np.concatenate([np.asarray(c, np.float32) for c in chunks])
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=2e-3)
    files = sorted(tmp_path.rglob("*.npy"))
    assert len(files) == 4
    stamps = [f.stat().st_mtime_ns for f in files]
    again = np.concatenate([np.asarray(c, np.float32) for c in clustered_vectors(tmp_path, 1000, 16, chunk=300)])
    np.testing.assert_array_equal(again, x)  # read back, not regenerated
    assert [f.stat().st_mtime_ns for f in files] == stamps
    fewer = clustered_vectors(tmp_path, 450, 16, chunk=300)  # a prefix of the same collection
    np.testing.assert_array_equal(np.concatenate([np.asarray(c, np.float32) for c in fewer]), x[:450])


def test_clustered_vectors_have_cluster_structure(tmp_path: Path) -> None:
    """Neighbours are far closer than random pairs, as in real embeddings (i.i.d. vectors would not be)."""
    x = np.concatenate([np.asarray(c, np.float32) for c in clustered_vectors(tmp_path, 20_000, 32)])
    sims = x[:200] @ x.T  # (200, N)
    sims[np.arange(200), np.arange(200)] = -1  # not itself
    assert np.median(sims.max(axis=1)) > 0.5
    assert abs(float(np.median(sims))) < 0.1


def test_clustered_queries_follow_the_vectors_but_are_not_stored(tmp_path: Path) -> None:
    x = np.concatenate([np.asarray(c, np.float32) for c in clustered_vectors(tmp_path, 20_000, 32)])
    q = clustered_queries(50, 32)
    assert q.shape == (50, 32) and q.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(q, clustered_queries(50, 32))
    best = (q @ x.T).max(axis=1)
    assert np.median(best) > 0.5 and best.max() < 0.999


def test_narrow_cnn_preset_is_clip_tiny_64_sized_and_open_clip_builds_the_same_tower() -> None:
    """bench_objectives' CNN: at most clip-tiny-64's parameters and image FLOPs, the same trunk in open_clip."""
    import open_clip
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bench.common import patch_open_clip
    from mmcl.config import model_config
    from mmcl.models import build_model

    def size(model, encode) -> tuple[int, int]:
        with FlopCounterMode(display=False) as flops:
            encode(torch.randn(1, 3, 64, 64))
        return sum(p.numel() for p in model.parameters()), flops.get_total_flops()

    vit = build_model(model_config("clip-tiny-64"))
    cnn = build_model(model_config("clip-tiny-cnn-narrow-64"))
    (vit_params, vit_flops), (cnn_params, cnn_flops) = size(vit, vit.encode_image), size(cnn, cnn.encode_image)
    assert cnn_params <= vit_params and cnn_flops <= vit_flops
    patch_open_clip()
    oc = open_clip.create_model("open_clip-tiny-cnn-narrow-64")
    assert sum(p.numel() for p in oc.parameters()) == cnn_params
    shapes = sorted(tuple(p.shape) for p in cnn.image.trunk.parameters())
    assert sorted(tuple(p.shape) for p in oc.visual.trunk.parameters()) == shapes


def test_one_results_writer_records_table_machine_and_load(tmp_path: Path) -> None:
    """`write_results`: NAME.json keeps the data, the table, the machine and the load; NAME.md is the shared
    skeleton (title, intro, table, further tables, notes, machine + load, how to reproduce)."""
    import json

    from bench.common import Table, machine_info, write_results

    machine = machine_info()
    js, md = write_results(
        "demo", [["a", 1.5], ["b", 2]], ["name", "value"], "A title", "Some notes.", machine,
        intro="What was measured.", tables=[Table(["x"], [[3]], "More:")], data={"raw": [1, 2]},
        command="python -m bench.demo --tiny", out_dir=tmp_path, echo=False,
    )  # fmt: skip
    data = json.loads(js.read_text())
    assert data["raw"] == [1, 2] and data["rows"] == [["a", 1.5], ["b", 2]] and data["columns"] == ["name", "value"]
    assert data["machine"]["nproc"] == machine["nproc"] and len(data["load"]["loadavg_end"]) == 3
    text = md.read_text()
    order = ["# A title", "What was measured.", "| name | value |", "| a | 1.5 |", "More:", "| x |", "| 3 |",
             "Some notes.", "Machine: ", "Load: ", "python -m bench.demo --tiny"]  # fmt: skip
    positions = [text.index(part) for part in order]
    assert positions == sorted(positions)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.json", "demo.md"]  # nothing temporary left
