"""The shard reader: splitting without overlap or loss, bad input, resampling, exact resume."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmcl.config import DataConfig
from mmcl.data.pipeline import build_stream
from mmcl.data.shards import StreamState, count_samples, expand_shards, make_loader
from mmcl.utils import UserError


class FakeModel:
    """Just what the data pipeline asks of a model."""

    def __init__(self, size: int = 16) -> None:
        self.size = size

    def preprocess_cfg(self):
        return {"image_size": self.size, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

    def tokenizer(self, texts):
        ids = torch.tensor([[len(t), sum(map(ord, t)) % 1000] for t in texts])
        return ids, torch.ones_like(ids)


def jpeg(seed: int, size: int = 20) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_shards(root: Path, n_shards: int, per_shard: int, prefix: str = "") -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for s in range(n_shards):
        members = {}
        for i in range(per_shard):
            key = f"{prefix}{s:05d}{i:04d}"
            members[f"{key}.jpg"] = jpeg(s * 1000 + i)
            members[f"{key}.txt"] = f"caption {key}".encode()
            members[f"{key}.json"] = json.dumps({"key": key, "label": i % 3}).encode()
        write_tar(root / f"{s:05d}.tar", members)
        sizes[f"{s:05d}.tar"] = per_shard
    (root / "sizes.json").write_text(json.dumps(sizes))
    return sorted(str(p) for p in root.glob("*.tar"))


def keys_of(loader) -> list[str]:
    return [k for batch in loader for k in batch.keys]


def stream(shards, train=True, rank=0, world=1, **cfg):
    data = DataConfig(train_shards=[str(shards)], **{"batch_size": 4, "shuffle_buffer": 8, **cfg})
    return build_stream(data, FakeModel(), data.train_shards, train=train, seed=1, rank=rank, world_size=world)


def test_expand_and_count(tmp_path):
    make_shards(tmp_path / "a", 3, 5)
    shards = expand_shards(str(tmp_path / "a" / "{00000..00002}.tar"))
    assert [Path(s).name for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    assert expand_shards(str(tmp_path / "a")) == shards
    assert count_samples(shards) == 15
    with pytest.raises(UserError, match="matches no .tar"):
        expand_shards(str(tmp_path / "nothing" / "*.tar"))
    with pytest.raises(UserError, match="not found"):
        expand_shards(str(tmp_path / "a" / "{00000..00009}.tar"))


def test_count_from_img2dataset_stats(tmp_path):
    shards = make_shards(tmp_path, 2, 4)
    (tmp_path / "sizes.json").unlink()
    for s in range(2):
        (tmp_path / f"{s:05d}_stats.json").write_text(json.dumps({"count": 5, "successes": 4}))
    assert count_samples(shards) == 8


@pytest.mark.parametrize("workers", [0, 2])
def test_epoch_reads_every_sample_once(tmp_path, workers):
    make_shards(tmp_path, 4, 6)
    s = stream(tmp_path, train=False)
    keys = keys_of(make_loader(s, workers))
    assert len(keys) == 24 and len(set(keys)) == 24


def test_ranks_and_workers_partition_the_data(tmp_path):
    make_shards(tmp_path, 8, 5)
    seen = []
    for rank in range(2):
        s = stream(tmp_path, rank=rank, world=2, batch_size=1)
        seen.append(keys_of(make_loader(s, 2)))
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) + len(seen[1]) == 40 == len(set(seen[0]) | set(seen[1]))


def test_training_batches_are_shuffled_and_full(tmp_path):
    make_shards(tmp_path, 2, 10)
    batches = list(make_loader(stream(tmp_path), 0))
    assert all(len(b) == 4 for b in batches) and len(batches) == 5
    keys = [k for b in batches for k in b.keys]
    assert keys != sorted(keys)
    b = batches[0]
    assert b.images.shape == (4, 3, 16, 16) and b.text.shape == (4, 2) and b.labels.shape == (4,)


def test_fewer_shards_than_workers_or_ranks(tmp_path):
    make_shards(tmp_path, 2, 4)
    s = stream(tmp_path, rank=0, world=2, batch_size=1)
    assert len(keys_of(make_loader(s, 4))) == 4  # workers capped at one shard each
    with pytest.raises(UserError, match="cannot be split over 3 processes"):
        stream(tmp_path, rank=0, world=3)


def test_bad_samples_are_skipped_and_counted(tmp_path):
    big = io.BytesIO()
    Image.new("RGB", (3000, 3000)).save(big, "PNG")
    good = {}
    for i in range(3):
        good |= {f"g{i}.jpg": jpeg(i), f"g{i}.txt": b"fine"}
    truncated = jpeg(7, 64)
    bad = {
        "corrupt.jpg": truncated[: len(truncated) // 2],
        "corrupt.txt": b"x",
        "html.jpg": b"<html><body>404</body></html>",
        "html.txt": b"x",
        "nocap.jpg": jpeg(8),
        "emptycap.jpg": jpeg(9),
        "emptycap.txt": b"  \n",
        "huge.png": big.getvalue(),
        "huge.txt": b"x",
        "pickle.pkl": b"\x80\x04K\x01.",
        "pickle.txt": b"no image here",
    }
    write_tar(tmp_path / "00000.tar", good | bad)
    # a truncated tar: cut in the middle of a member
    full = io.BytesIO()
    with tarfile.open(fileobj=full, mode="w") as tar:
        for i in range(4):
            data = jpeg(100 + i, 64)
            info = tarfile.TarInfo(f"t{i}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "00001.tar").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    s = stream(tmp_path, train=False, max_pixels=1_000_000)
    loader = make_loader(s, 0)
    batches = list(loader)
    assert sorted(k for b in batches for k in b.keys) == ["g0", "g1", "g2"]
    skipped = batches[-1].skipped
    for reason in (
        "corrupt_image",
        "not_an_image",
        "missing_caption",
        "empty_caption",
        "too_many_pixels",
        "no_image",
        "unreadable_tar",
    ):
        assert skipped.get(reason, 0) >= 1, (reason, skipped)


def test_resampled_mixes_sources_by_weight(tmp_path):
    a = make_shards(tmp_path / "a", 2, 5, prefix="a")
    b = make_shards(tmp_path / "b", 2, 5, prefix="b")
    data = DataConfig(
        train_shards=[str(tmp_path / "a"), str(tmp_path / "b")],
        train_weights=[3.0, 1.0],
        resampled=True,
        batch_size=10,
        shuffle_buffer=4,
    )
    s = build_stream(data, FakeModel(), data.train_shards, train=True, seed=0)
    it = iter(make_loader(s, 0))
    keys = [k for _ in range(40) for k in next(it).keys]  # more than both sources hold: it never ends
    share_a = sum(k.startswith("a") for k in keys) / len(keys)
    assert 0.6 < share_a < 0.9
    assert len(a) == len(b) == 2


@pytest.mark.parametrize("workers,resampled", [(0, False), (2, False), (2, True)])
def test_resume_continues_the_exact_stream(tmp_path, workers, resampled):
    make_shards(tmp_path, 4, 9)
    full = [b.keys for b in itertools.islice(make_loader(stream(tmp_path, resampled=resampled), workers), 7)]
    s = stream(tmp_path, resampled=resampled)
    state = StreamState()
    it = iter(make_loader(s, workers))
    for _ in range(3):
        state.record(next(it), s.num_workers)
    del it
    restored = StreamState.from_dict(json.loads(json.dumps(state.to_dict())))
    rest = [b.keys for b in itertools.islice(make_loader(stream(tmp_path, resampled=resampled), workers, restored), 4)]
    assert rest == full[3:7]


def test_augmentation_is_seeded_per_sample(tmp_path):
    make_shards(tmp_path, 1, 8)
    one = {k: img for b in make_loader(stream(tmp_path, shuffle_buffer=0), 0) for k, img in zip(b.keys, b.images)}
    two = {k: img for b in make_loader(stream(tmp_path, shuffle_buffer=5), 0) for k, img in zip(b.keys, b.images)}
    common = set(one) & set(two)
    assert common and all(torch.equal(one[k], two[k]) for k in common)


def _count_reads(monkeypatch) -> dict[str, int]:
    """Count the raw samples the stream reads and the samples it re-reads by seeking (workers=0: in-process)."""
    import mmcl.data.shards as shards_mod

    counts = {"read": 0, "seek": 0}
    read, read_at = shards_mod.read_samples, shards_mod.read_sample_at

    def counting_read(*args, **kwargs):
        for raw in read(*args, **kwargs):
            counts["read"] += 1
            yield raw

    def counting_read_at(*args, **kwargs):
        counts["seek"] += 1
        return read_at(*args, **kwargs)

    monkeypatch.setattr(shards_mod, "read_samples", counting_read)
    monkeypatch.setattr(shards_mod, "read_sample_at", counting_read_at)
    return counts


def _state_after(s, workers: int, batches: int) -> StreamState:
    state = StreamState()
    it = iter(make_loader(s, workers))
    for _ in range(batches):
        state.record(next(it), s.num_workers)
    del it
    return StreamState.from_dict(json.loads(json.dumps(state.to_dict())))


@pytest.mark.parametrize("resampled", [False, True])
def test_resume_seeks_instead_of_replaying(tmp_path, monkeypatch, resampled):
    make_shards(tmp_path, 6, 10)
    full = [b.keys for b in itertools.islice(make_loader(stream(tmp_path, resampled=resampled), 0), 12)]
    restored = _state_after(stream(tmp_path, resampled=resampled), 0, 9)  # 36 samples in, 8 more in the buffer
    assert restored.positions[0]["consumed"] == 36 and len(restored.positions[0]["buffer"]) == 8
    counts = _count_reads(monkeypatch)
    rest = [b.keys for b in itertools.islice(make_loader(stream(tmp_path, resampled=resampled), 0, restored), 3)]
    assert rest == full[9:12]
    # replaying would read the 44 samples up to the position again; seeking re-reads the 8 buffered ones and
    # then reads on from the saved offset (12 new samples for 3 batches of 4, and the sample the position names)
    assert counts["seek"] == 8 and counts["read"] <= 13


def test_checkpoints_without_positions_still_resume_by_replay(tmp_path):
    make_shards(tmp_path, 4, 9)
    full = [b.keys for b in itertools.islice(make_loader(stream(tmp_path), 2), 7)]
    restored = _state_after(stream(tmp_path), 2, 3)
    old = restored.to_dict()
    del old["positions"]  # a checkpoint written before positions existed
    rest = [b.keys for b in itertools.islice(make_loader(stream(tmp_path), 2, StreamState.from_dict(old)), 4)]
    assert rest == full[3:7]


def test_resume_while_draining_the_buffer_at_the_end_of_an_epoch(tmp_path):
    make_shards(tmp_path, 2, 10)
    full = [b.keys for b in make_loader(stream(tmp_path, shuffle_buffer=16), 0)]  # 5 full batches
    restored = _state_after(stream(tmp_path, shuffle_buffer=16), 0, 3)  # 12 of 20 out: the buffer is draining
    assert restored.positions[0]["draining"]
    rest = [b.keys for b in make_loader(stream(tmp_path, shuffle_buffer=16), 0, restored)]
    assert rest == full[3:5] and sorted(k for b in full for k in b) == sorted(k for b in full[:3] + rest for k in b)


def test_resume_refuses_a_shard_that_changed(tmp_path):
    make_shards(tmp_path, 2, 10)
    restored = _state_after(stream(tmp_path), 0, 2)
    make_shards(tmp_path, 2, 7, prefix="x")  # rewritten: other keys at other offsets
    with pytest.raises(UserError, match="changed since the checkpoint"):
        next(iter(make_loader(stream(tmp_path), 0, restored)))
