"""Untrusted shards: every bad sample skipped and counted once, under the right reason, cumulatively over a run."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmcl.config import load_experiment
from mmcl.data.batch import Batch
from mmcl.data.decode import SkipSample, decode_image
from mmcl.data.shards import ShardStream, StreamState
from mmcl.engine.metrics import read_metrics
from mmcl.engine.trainer import train
from mmcl.utils import UserError


def _jpeg(seed: int, size: int = 32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buf, "PNG")  # 400M pixels in a few kB
    return buf.getvalue()


def _stream(shards: list[str]) -> ShardStream:
    def decode(raw, rng):
        from mmcl.data.decode import image_bytes

        return {"image": decode_image(image_bytes(raw), 10**12), "key": raw["__key__"]}

    def collate(samples):
        return Batch(keys=[s["key"] for s in samples])

    return ShardStream([shards], decode, collate, 4, shuffle_buffer=0, drop_last=False)


def _counts(stream: ShardStream) -> tuple[list[str], dict[str, int]]:
    stream.report_epoch_end = True
    keys, counts = [], {}
    for item in stream:
        if isinstance(item, Batch):
            keys += item.keys
        else:
            counts = item.skipped
    return keys, counts


def test_decompression_bomb_is_too_many_pixels():
    with pytest.raises(SkipSample) as e:
        decode_image(_bomb(), max_pixels=10**12)  # PIL's own guard fires before mmcl's limit
    assert e.value.reason == "too_many_pixels"
    with pytest.raises(SkipSample) as e:
        decode_image(_bomb(), max_pixels=40_000_000)
    assert e.value.reason == "too_many_pixels"


def test_truncated_and_empty_tars_are_counted_once_each(tmp_path):
    full = _tar(tmp_path / "full.tar", [(f"t{i}.jpg", _jpeg(i, 64)) for i in range(4)])
    (tmp_path / "00000.tar").write_bytes(full[: len(full) // 2])
    (tmp_path / "00001.tar").write_bytes(b"")
    _tar(tmp_path / "00002.tar", [("ok.jpg", _jpeg(9))])
    keys, counts = _counts(_stream([str(tmp_path / f"0000{i}.tar") for i in range(3)]))
    assert counts == {"unreadable_tar": 2}
    assert "ok" in keys


def test_a_sample_of_only_unknown_members_is_counted_as_no_image(tmp_path, monkeypatch):
    import pickle

    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("a shard member was unpickled"))
    payload = pickle.dumps({"x": 1})
    _tar(tmp_path / "00000.tar", [("a.pkl", payload), ("a.pyd", payload), ("b.jpg", _jpeg(1)), ("c.pth", payload)])
    keys, counts = _counts(_stream([str(tmp_path / "00000.tar")]))
    assert keys == ["b"]
    assert counts == {"no_image": 2}


def _bad_first_shards(root: Path) -> Path:
    """2 shards, each 2 undecodable samples first, then 20 good ones (shuffle off: counts are exact per batch)."""
    for shard in range(2):
        members = [(f"{shard}bad{i}.jpg", b"<html>404</html>") for i in range(2)]
        members += [(f"{shard}bad{i}.txt", b"x") for i in range(2)]
        for i in range(20):
            members += [(f"{shard}g{i:02d}.jpg", _jpeg(100 * shard + i)), (f"{shard}g{i:02d}.txt", b"a photo")]
        _tar(root / f"{shard:05d}.tar", sorted(members, key=lambda m: m[0].split(".")[0]))
    return root


def _cfg(shards: Path, out: Path, *extra: str):
    return load_experiment(
        None,
        [
            "model.preset=clip-tiny",
            "train.trackers=[none]",
            "train.progress=false",
            "data.batch_size=8",
            "data.num_workers=0",
            "data.shuffle_buffer=0",
            "data.augment=false",
            f"data.train_shards=[{shards}]",
            f"train.output_dir={out}",
            "train.log_every=5",
            "train.steps=10",
            *extra,
        ],
    )


def test_skip_counts_are_cumulative_across_epochs_and_resume(tmp_path):
    shards = _bad_first_shards(tmp_path / "shards")
    train(_cfg(shards, tmp_path / "straight"))  # 5 steps per epoch: the rows at 5 and 10 close epochs 0 and 1
    rows = [r for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "loss" in r]
    assert [(r["step"], r["epoch"], r["skipped_not_an_image"]) for r in rows] == [(5, 0, 4), (10, 1, 8)]

    train(_cfg(shards, tmp_path / "resumed"), stop_after=7)  # killed in epoch 1, resumed from its checkpoint
    train(_cfg(shards, tmp_path / "resumed"))
    rows = [r for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl") if "loss" in r]
    assert rows[-1]["step"] == 10 and rows[-1]["skipped_not_an_image"] == 8


def test_stream_state_keeps_earlier_epochs_through_a_checkpoint():
    state = StreamState(epoch=0, skipped={0: {"no_image": 2}, 1: {"no_image": 1, "corrupt_image": 1}})
    state.next_epoch(1)
    state.skipped = {0: {"no_image": 1}}
    restored = StreamState.from_dict(state.to_dict())
    assert restored.skip_totals() == {"no_image": 4, "corrupt_image": 1}
    assert restored.epoch_skip_totals() == {"no_image": 1}


def test_every_sample_skipped_names_the_reasons(tmp_path):
    root = tmp_path / "shards"
    members = [("a.jpg", b"<html>"), ("a.txt", b"x"), ("b.pkl", b"x"), ("b.txt", b"y"), ("c.jpg", _jpeg(1))]
    _tar(root / "00000.tar", members)
    (root / "00001.tar").write_bytes(b"")
    with pytest.raises(UserError) as e:
        train(_cfg(root, tmp_path / "run"))
    message = str(e.value)
    assert "every sample was skipped" in message
    for reason in ("not_an_image: 1", "no_image: 1", "missing_caption: 1", "unreadable_tar: 1"):
        assert reason in message, message


def _damage_header_halfway(path: Path, n: int) -> str:
    """A tar of `n` labelled samples (KEY.jpg + KEY.cls) with the header of sample n/2's .cls overwritten
    (name and checksum bytes), as a flipped disk block or a bad copy leaves it; returns the damaged key."""
    members = []
    for i in range(n):
        members += [(f"{i:09d}.jpg", _jpeg(i % 7, 8)), (f"{i:09d}.cls", str(i % 3).encode())]
    raw = bytearray(_tar(path, members))
    with tarfile.open(path) as tar:
        victim = [m for m in tar.getmembers() if m.name == f"{n // 2:09d}.cls"][0]
    raw[victim.offset : victim.offset + 16] = b"\xff" * 16  # the name
    raw[victim.offset + 148 : victim.offset + 156] = b"garbage!"  # the checksum
    path.write_bytes(bytes(raw))
    return f"{n // 2:09d}"


def test_a_damaged_header_mid_shard_is_counted_and_the_cut_sample_dropped(tmp_path):
    from mmcl.data.decode import SkipCounter
    from mmcl.data.reader import read_samples

    cut = _damage_header_halfway(tmp_path / "00000.tar", 1000)
    _tar(tmp_path / "00001.tar", [("next.jpg", _jpeg(1)), ("next.cls", b"0")])
    counter = SkipCounter()
    samples = list(read_samples([str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")], counter))
    keys = [s["__key__"] for s in samples]
    assert cut not in keys  # its .cls was behind the damaged header: never yielded without it
    assert keys == [f"{i:09d}" for i in range(500)] + ["next"]  # the next shard is still read
    assert all("cls" in s for s in samples)
    assert counter.counts == {"unreadable_tar": 1}


def test_eval_counts_a_damaged_header_instead_of_failing_on_a_label(tmp_path):
    from mmcl.eval.datasets import open_eval_dataset
    from mmcl.eval.runner import iterate_batches

    _damage_header_halfway(tmp_path / "00000.tar", 1000)
    (tmp_path / "classnames.txt").write_text("a\nb\nc\n")
    dataset = open_eval_dataset(str(tmp_path / "00000.tar"))
    skipped: dict[str, int] = {}
    samples = [s for batch in iterate_batches(dataset, 64, num_workers=2, skipped=skipped) for s in batch]
    assert len(samples) == 500 and all(s.label is not None for s in samples)
    assert skipped == {"unreadable_tar": 1}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("prefix", ["", "http://127.0.0.1:9/"])
def test_a_brace_range_typo_is_refused_in_one_line_before_it_is_expanded(tmp_path, prefix):
    import tracemalloc

    from mmcl.data.reader import expand_shards

    pattern = f"{prefix or str(tmp_path) + '/'}{{0..100000000}}.tar"
    tracemalloc.start()
    with pytest.raises(UserError) as e:
        expand_shards(pattern)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert pattern in str(e.value) and "100,000,001" in str(e.value) and "\n" not in str(e.value)
    assert peak < 50_000_000  # counted, never materialised (it grew to 8 GB)


@pytest.mark.parametrize(
    "pattern",
    [
        "a{0..9}.tar",
        "{a,b{1..3},c}-{x..z}.tar",
        "{00..20..3}/{1,2}.tar",
        "plain.tar",
        r"a\{1,2\}{3,4}",
        "{a}{}",
        "x{a,{1..4}}y",
        "{{1..3}}",
    ],
)
def test_the_expansion_count_matches_braceexpand(pattern):
    import braceexpand

    from mmcl.data.reader import count_expansions

    assert count_expansions(pattern) == len(list(braceexpand.braceexpand(pattern)))


def test_unbalanced_braces_are_one_line():
    from mmcl.data.reader import expand_shards

    with pytest.raises(UserError, match="unbalanced braces"):
        expand_shards("data/{0..3.tar")
