"""The shard writer: img2dataset layout, splitting, resume, failures, sources, CLI."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmcl.data.sources import FolderSource, RawSample, SyntheticSource, TableSource
from mmcl.data.synthetic import CLASSNAMES, generate
from mmcl.data.writer import write_shards, write_synthetic_shards
from mmcl.utils import UserError

JSON_FIELDS = {
    "key",
    "status",
    "error_message",
    "caption",
    "url",
    "width",
    "height",
    "original_width",
    "original_height",
    "exif",
    "sha256",
}
STATS_FIELDS = {
    "count",
    "successes",
    "failed_to_download",
    "failed_to_resize",
    "duration",
    "start_time",
    "end_time",
    "status_dict",
}


def read_dir(out: Path) -> list[dict]:
    """All samples of a shard folder via plain `webdataset.WebDataset`, in shard order."""
    import webdataset as wds

    shards = sorted(str(p) for p in out.glob("*.tar"))
    return list(wds.WebDataset(shards, shardshuffle=False))


def file_state(out: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.iterdir())}


def test_synthetic_round_trip_img2dataset_layout(tmp_path):
    out = tmp_path / "shards"
    summary = write_synthetic_shards(out, 150, image_size=32, maxcount=64, progress=False)
    assert summary.shards == ["00000.tar", "00001.tar", "00002.tar"] == summary.written_shards
    assert summary.samples == summary.inputs == 150 and summary.failed == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["00000.tar", "00001.tar", "00002.tar", "00000_stats.json", "00001_stats.json"]
                           + ["00002_stats.json", "sizes.json", "classnames.txt"])  # fmt: skip
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 64, "00001.tar": 64, "00002.tar": 22}
    assert (out / "classnames.txt").read_text().splitlines() == CLASSNAMES

    samples = read_dir(out)
    assert len(samples) == 150
    for n, sample in enumerate(samples):
        shard, idx = divmod(n, 64)
        key = f"{shard:05d}{idx:04d}"
        assert sample["__key__"] == key
        assert set(sample) >= {"jpg", "txt", "json"}
        truth = generate(n, image_size=32)
        meta = json.loads(sample["json"])
        assert set(meta) >= JSON_FIELDS
        assert meta["key"] == key and meta["status"] == "success" and meta["error_message"] is None
        assert sample["txt"].decode() == meta["caption"] == truth.caption
        assert (meta["width"], meta["height"], meta["original_width"], meta["original_height"]) == (32, 32, 32, 32)
        assert meta["sha256"] == hashlib.sha256(sample["jpg"]).hexdigest()
        assert (meta["label"], meta["classname"], meta["attributes"]) == (
            truth.label,
            truth.classname,
            truth.attributes,
        )
        assert meta["url"] == f"synthetic/train/0/{n}"
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.format == "JPEG" and image.size == (32, 32)

    for i, n in enumerate([64, 64, 22]):
        stats = json.loads((out / f"{i:05d}_stats.json").read_text())
        assert set(stats) >= STATS_FIELDS
        assert stats["count"] == stats["successes"] == n and stats["status_dict"] == {"success": n}
        assert stats["failed_to_download"] == stats["failed_to_resize"] == 0
        assert stats["end_time"] >= stats["start_time"]
    # plain tarfile sees the img2dataset member layout
    with tarfile.open(out / "00002.tar") as tar:
        assert tar.getnames()[:3] == ["000020000.jpg", "000020000.json", "000020000.txt"]
        assert len(tar.getnames()) == 3 * 22


def test_output_is_deterministic_for_any_worker_count(tmp_path):
    write_synthetic_shards(tmp_path / "a", 70, image_size=32, maxcount=32, progress=False)
    summary = write_synthetic_shards(tmp_path / "b", 70, image_size=32, maxcount=32, progress=False, num_workers=2)
    assert summary.samples == 70
    for name in ["00000.tar", "00001.tar", "00002.tar", "sizes.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_maxsize_splits_shards_below_the_limit(tmp_path):
    source = SyntheticSource(60, image_size=32)
    summary = write_shards(source, tmp_path, maxcount=1000, maxsize=60_000, image_format="png", progress=False)
    tars = [tmp_path / s for s in summary.shards]
    assert len(tars) > 2
    assert all(t.stat().st_size <= 60_000 for t in tars)
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sum(sizes.values()) == 60
    captions = [s["txt"].decode() for s in read_dir(tmp_path)]
    assert captions == [generate(i, image_size=32).caption for i in range(60)]  # order kept across shards
    # stats chain the input ranges
    first = [json.loads((tmp_path / f"{s[:5]}_stats.json").read_text())["first_input"] for s in summary.shards]
    assert first == [0] + list(itertools_accumulate([sizes[s] for s in summary.shards]))[:-1]

    # a sample bigger than maxsize still gets written, one per shard
    big = write_shards(
        SyntheticSource(3, image_size=64), tmp_path / "big", maxsize=1000, image_format="png", progress=False
    )
    assert len(big.shards) == 3 and big.samples == 3


def itertools_accumulate(values):
    total = 0
    for v in values:
        total += v
        yield total


loads_seen: list[int] = []  # inputs that CountingSource loaded


def counting_sample(i: int) -> RawSample:
    loads_seen.append(i)
    s = generate(i, image_size=32)
    return RawSample(f"gen/{i}", s.caption, image=s.image, meta={"label": s.label})


class CountingSource:
    """Synthetic samples whose loads are recorded (num_workers=0 runs them in this process)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def describe(self) -> dict:
        return {"type": "counting", "n": self.n}

    def __iter__(self):
        for i in range(self.n):
            yield RawSample(f"gen/{i}", loader=partial(counting_sample, i))


def test_resume_rewrites_only_missing_shards(tmp_path):
    out = tmp_path / "out"
    write_shards(CountingSource(90), out, maxcount=20, progress=False)
    before = file_state(out)
    # simulate a crash: shard 4 (the last) gone, shard 2's stats never written, a temp file left behind
    (out / "00004.tar").unlink()
    (out / "00004_stats.json").unlink()
    (out / "00002_stats.json").unlink()
    (out / ".00003.tar.abcd1234.tmp").write_bytes(b"half a shard")
    loads_seen.clear()
    summary = write_shards(CountingSource(90), out, maxcount=20, progress=False)
    assert summary.kept_shards == ["00000.tar", "00001.tar", "00003.tar"]
    assert summary.written_shards == ["00002.tar", "00004.tar"]
    assert loads_seen == list(range(40, 60)) + list(range(80, 90))  # kept shards' inputs not touched
    assert summary.samples == 90 and summary.inputs == 90
    after = file_state(out)
    for name in ["00000.tar", "00001.tar", "00003.tar", "00000_stats.json", "00003_stats.json"]:
        assert after[name] == before[name], name  # same bytes and mtime: not rewritten
    for name in ["00002.tar", "00004.tar", "sizes.json"]:
        assert after[name][1] == before[name][1], name  # rewritten identically
    assert not any(name.endswith(".tmp") for name in after)

    loads_seen.clear()
    assert write_shards(CountingSource(90), out, maxcount=20, progress=False).written_shards == []
    assert loads_seen == []


class CrashingSource(CountingSource):
    """Raises after `crash_at` inputs, as a killed or failing run would stop."""

    def __init__(self, n: int, crash_at: int):
        super().__init__(n)
        self.crash_at = crash_at

    def __iter__(self):
        for i, sample in enumerate(super().__iter__()):
            if i == self.crash_at:
                raise RuntimeError("simulated crash")
            yield sample


def test_crash_leaves_finished_shards_and_a_rerun_completes(tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_shards(CrashingSource(50, crash_at=27), tmp_path / "out", maxcount=10, progress=False)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json"]  # shard 2 was in progress
    loads_seen.clear()
    summary = write_shards(CountingSource(50), tmp_path / "out", maxcount=10, progress=False)
    assert summary.kept_shards == ["00000.tar", "00001.tar"] and loads_seen == list(range(20, 50))
    write_shards(CountingSource(50), tmp_path / "clean", maxcount=10, progress=False)
    for name in ["00000.tar", "00002.tar", "00004.tar", "sizes.json"]:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()


def test_error_while_writing_stops_the_workers(tmp_path, monkeypatch):
    """A failure in the writing process (disk full, say) must not hang on the busy worker pool."""
    from mmcl.data import writer

    add = writer._ShardWriter.add

    def failing_add(self, item):
        if self.inputs == 5:
            raise OSError("No space left on device")
        add(self, item)

    monkeypatch.setattr(writer._ShardWriter, "add", failing_add)
    with pytest.raises(OSError, match="No space left"):
        write_shards(SyntheticSource(1000, image_size=8), tmp_path, maxcount=100, num_workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the shard in progress was removed


def test_resume_of_a_grown_plain_iterable_loses_nothing(tmp_path):
    def samples(n):
        return [RawSample(f"mem/{i}", f"caption {i}", image=Image.new("RGB", (8, 8), (i, 0, 0))) for i in range(n)]

    write_shards(samples(50), tmp_path, maxcount=64, image_format="png", progress=False)
    summary = write_shards(samples(100), tmp_path, maxcount=64, image_format="png", progress=False)
    assert summary.kept_shards == [] and summary.samples == 100  # the short shard 0 was not the last any more
    assert [s["txt"].decode() for s in read_dir(tmp_path)] == [f"caption {i}" for i in range(100)]


def test_resume_with_maxsize_keeps_the_finished_prefix(tmp_path):
    kw = dict(maxcount=1000, maxsize=40_000, image_format="png", progress=False)
    first = write_shards(CountingSource(40), tmp_path, **kw)
    assert len(first.shards) >= 3
    before = file_state(tmp_path)
    last = first.shards[-1]
    (tmp_path / last).unlink()
    loads_seen.clear()
    again = write_shards(CountingSource(40), tmp_path, **kw)
    assert again.kept_shards == first.shards[:-1] and again.written_shards == [last]
    stats = json.loads((tmp_path / f"{last[:5]}_stats.json").read_text())
    assert loads_seen == list(range(stats["first_input"], 40))
    assert file_state(tmp_path)[first.shards[0]] == before[first.shards[0]]
    assert (tmp_path / last).read_bytes() == before[last][1]


def test_other_options_need_overwrite(tmp_path):
    write_synthetic_shards(tmp_path, 10, image_size=32, maxcount=5, progress=False)
    with pytest.raises(UserError, match=r"00000\.tar was written from another source or with other options"):
        write_synthetic_shards(tmp_path, 10, image_size=32, maxcount=5, quality=50, progress=False)
    with pytest.raises(UserError, match="other options"):
        write_synthetic_shards(tmp_path, 12, image_size=32, maxcount=5, progress=False)
    summary = write_synthetic_shards(
        tmp_path, 12, image_size=32, maxcount=5, quality=50, overwrite=True, progress=False
    )
    assert summary.written_shards == ["00000.tar", "00001.tar", "00002.tar"] and summary.samples == 12


def make_image_folder(root: Path) -> None:
    """Class folders with mixed formats and modes, sidecar captions, and two broken files."""
    (root / "red_things").mkdir(parents=True)
    (root / "blue_things" / "deep").mkdir(parents=True)
    Image.new("RGB", (40, 20), (200, 0, 0)).save(root / "red_things" / "a.jpg")
    Image.new("RGBA", (20, 40), (200, 0, 0, 128)).save(root / "red_things" / "b.png")
    Image.new("L", (30, 30), 90).save(root / "blue_things" / "c.webp")
    Image.new("P", (16, 16)).save(root / "blue_things" / "deep" / "d.png")
    Image.fromarray(np.full((12, 12), 40000, dtype=np.uint16)).save(root / "blue_things" / "deep" / "e16.png")
    (root / "blue_things" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (0, 0, 200)).save(good, "PNG")
    (root / "blue_things" / "truncated.png").write_bytes(good.getvalue()[:60])
    for p in root.rglob("*.*"):
        if p.suffix != ".txt":
            p.with_suffix(".txt").write_text(f"caption of {p.stem}\n")


@pytest.mark.parametrize("workers", [0, 2])
def test_folder_source_with_classes_and_corrupt_files(tmp_path, caplog, workers):
    make_image_folder(tmp_path / "images")
    source = FolderSource(tmp_path / "images", class_from_parent=True)
    assert source.classnames == ["blue things", "red things"]  # top-level folders, as torchvision's ImageFolder
    with caplog.at_level(logging.WARNING, logger="mmcl"):
        summary = write_shards(source, tmp_path / "out", image_size=10, progress=False, num_workers=workers)
    assert summary.samples == 5 and summary.inputs == 7 and summary.failed == 2
    failed = dict(summary.failures)
    assert set(failed) == {str(tmp_path / "images" / "blue_things" / n) for n in ("broken.jpg", "truncated.png")}
    for name in ("broken.jpg", "truncated.png"):
        assert any(name in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    stats = json.loads((tmp_path / "out" / "00000_stats.json").read_text())
    assert (stats["count"], stats["successes"], stats["failed_to_resize"], stats["failed_to_download"]) == (7, 5, 2, 0)
    assert stats["status_dict"] == {"success": 5, "cannot decode image": 2}
    samples = {json.loads(s["json"])["url"].split("images/")[1]: s for s in read_dir(tmp_path / "out")}
    assert sorted(samples) == [
        "blue_things/c.webp",
        "blue_things/deep/d.png",
        "blue_things/deep/e16.png",
        "red_things/a.jpg",
        "red_things/b.png",
    ]
    # 16-bit greyscale is scaled to 8 bits, not clipped to white
    e16 = np.asarray(Image.open(io.BytesIO(samples["blue_things/deep/e16.png"]["jpg"])))
    assert e16.shape == (10, 10, 3) and abs(int(e16.mean()) - 156) <= 2
    meta = {k: json.loads(s["json"]) for k, s in samples.items()}
    assert meta["red_things/a.jpg"]["classname"] == "red things" and meta["red_things/a.jpg"]["label"] == 1
    assert meta["blue_things/deep/d.png"]["classname"] == "blue things" and meta["blue_things/deep/d.png"]["label"] == 0
    assert samples["red_things/a.jpg"]["txt"] == b"caption of a"
    # shorter side -> 10 px, aspect kept; the originals are recorded
    assert (meta["red_things/a.jpg"]["width"], meta["red_things/a.jpg"]["height"]) == (20, 10)
    assert (meta["red_things/a.jpg"]["original_width"], meta["red_things/a.jpg"]["original_height"]) == (40, 20)
    assert (meta["red_things/b.png"]["width"], meta["red_things/b.png"]["height"]) == (10, 20)
    # keys count the failed inputs too (img2dataset): 6 inputs, 4 keys present, the gaps are the failures
    keys = sorted(json.loads(s["json"])["key"] for s in samples.values())
    assert keys == ["000000001", "000000002", "000000003", "000000005", "000000006"]  # inputs 0, 4 are broken


def test_folder_source_errors(tmp_path):
    make_image_folder(tmp_path / "images")
    (tmp_path / "images" / "red_things" / "a.txt").unlink()
    with pytest.raises(UserError, match=r"a\.jpg: no caption file a\.txt"):
        FolderSource(tmp_path / "images")
    assert len(FolderSource(tmp_path / "images", missing_caption="empty")) == 7
    with pytest.raises(UserError, match="does not exist"):
        FolderSource(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        FolderSource(tmp_path / "empty")


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet"])
def test_table_source(tmp_path, fmt):
    import pandas as pd

    (tmp_path / "img").mkdir()
    for i in range(4):
        Image.new("RGB", (24, 24), (60 * i, 0, 0)).save(tmp_path / "img" / f"{i}.png")
    table = pd.DataFrame(
        {
            "file": ["img/0.png", "img/1.png", "img/missing.png", str(tmp_path / "img" / "3.png")],
            "text": ["zero", "one", "gone", "three"],
            "kind": ["dog", "cat", "cat", "dog"],
            "score": [0.5, 0.25, 1.0, 2.0],
        }
    )
    path = tmp_path / f"table.{fmt}"
    if fmt == "parquet":
        table.to_parquet(path)
    else:
        table.to_csv(path, sep="\t" if fmt == "tsv" else ",", index=False)
    source = TableSource(path, image_col="file", caption_col="text", label_col="kind", extra_cols=["score"])
    assert source.classnames == ["cat", "dog"] and len(source) == 4
    summary = write_shards(source, tmp_path / "out", image_format="webp", progress=False)
    assert summary.samples == 3 and summary.failed == 1
    assert summary.failures[0][0] == str(tmp_path / "img" / "missing.png")
    stats = json.loads((tmp_path / "out" / "00000_stats.json").read_text())
    assert stats["failed_to_download"] == 1 and stats["status_dict"]["file not readable"] == 1
    samples = read_dir(tmp_path / "out")
    assert [s["txt"].decode() for s in samples] == ["zero", "one", "three"]
    metas = [json.loads(s["json"]) for s in samples]
    assert [(m["label"], m["classname"], m["score"]) for m in metas] == [
        (1, "dog", 0.5),
        (0, "cat", 0.25),
        (1, "dog", 2.0),
    ]
    assert all("webp" in s for s in samples)
    assert (tmp_path / "out" / "classnames.txt").read_text() == "cat\ndog\n"


def test_table_source_errors(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("path,caption\na.jpg,hello\n")
    with pytest.raises(UserError, match=r"t\.csv: no image column 'file' \(columns: path, caption\)"):
        TableSource(path, image_col="file")
    with pytest.raises(UserError, match=r"t\.csv: no caption column 'text'"):
        TableSource(path, caption_col="text")
    with pytest.raises(UserError, match=r"t\.csv: no label column 'y'"):
        TableSource(path, label_col="y")
    with pytest.raises(UserError, match=r"missing\.csv' not found"):
        TableSource(tmp_path / "missing.csv")
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(UserError, match="unknown table format"):
        TableSource(tmp_path / "t.xlsx")
    path.write_text("path,caption,y\na.jpg,hello,0.5\n")
    with pytest.raises(UserError, match="non-integer"):
        TableSource(path, label_col="y")
    path.write_text("path,caption\na.jpg,hello\nhttps://example.com/b.jpg,web\n")
    with pytest.raises(UserError, match=r"t\.csv: row 1 of 'path' is a URL"):
        TableSource(path)
    path.write_text("path,caption\n")
    with pytest.raises(UserError, match="no rows"):
        TableSource(path)


def test_plain_iterable_and_resize_modes(tmp_path):
    data = io.BytesIO()
    Image.new("RGB", (40, 20), (0, 128, 0)).save(data, "PNG")
    raw = [
        RawSample("mem/0", "bytes", data=data.getvalue()),
        RawSample("mem/1", "pil", image=Image.new("RGB", (20, 40))),
    ]
    for mode, sizes in [("longer", [(10, 5), (5, 10)]), ("center_crop", [(10, 10), (10, 10)])]:
        write_shards(raw, tmp_path / mode, image_size=10, resize_mode=mode, image_format="png", progress=False)
        metas = [json.loads(s["json"]) for s in read_dir(tmp_path / mode)]
        assert [(m["width"], m["height"]) for m in metas] == sizes
        assert [m["url"] for m in metas] == ["mem/0", "mem/1"]
        assert not (tmp_path / mode / "classnames.txt").exists()
    with pytest.raises(UserError, match="unknown image format"):
        write_shards(raw, tmp_path / "x", image_format="gif")
    empty = write_shards([RawSample("mem/2", "no image")], tmp_path / "empty", progress=False)
    assert empty.failed == 1 and empty.failures == [("mem/2", "the sample has no image, path or data")]
    assert json.loads((tmp_path / "empty" / "sizes.json").read_text()) == {"00000.tar": 0}


def test_demo_shards_fixture(demo_shards):
    import webdataset as wds

    assert (demo_shards / "classnames.txt").read_text().splitlines() == CLASSNAMES
    train = json.loads((demo_shards / "train" / "sizes.json").read_text())
    assert train == {f"{i:05d}.tar": 64 for i in range(4)}
    assert sum(json.loads((demo_shards / "val" / "sizes.json").read_text()).values()) == 128
    val = next(iter(wds.WebDataset(str(demo_shards / "val" / "00000.tar"), shardshuffle=False)))
    assert val["txt"].decode() == generate(0, split="val", image_size=32).caption


def test_cli(tmp_path, capsys):
    from mmcl.cli import main

    out = tmp_path / "cli"
    assert (
        main(["shards", "synthetic", str(out), "--n", "20", "--maxcount", "8", "--image-size", "32", "--no-progress"])
        == 0
    )
    assert "wrote 20 samples in 3 shards" in capsys.readouterr().out
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 8, "00001.tar": 8, "00002.tar": 4}
    assert (
        main(["shards", "synthetic", str(out), "--n", "20", "--maxcount", "8", "--image-size", "32", "--no-progress"])
        == 0
    )
    assert "3 kept from an earlier run" in capsys.readouterr().out

    (tmp_path / "t.csv").write_text("path,caption\na.jpg,hello\n")
    assert main(["shards", "table", str(tmp_path / "t.csv"), str(out / "t"), "--image-col", "url"]) == 2
    err = capsys.readouterr().err
    assert "t.csv: no image column 'url'" in err and len(err.strip().splitlines()) == 1

    with pytest.raises(SystemExit) as exit_:
        main(["shards", "table", "--help"])
    assert exit_.value.code == 0
    helptext = capsys.readouterr().out
    assert "--caption-col" in helptext and "--maxsize" in helptext and "relative paths" in helptext


def test_cli_sizes_and_real(tmp_path, capsys):
    from mmcl.cli import main

    out = tmp_path / "photos"
    assert main(["shards", "real", "photos", str(out), "--resize", "32", "--maxsize", "50KB", "--no-progress"]) == 0
    shards = sorted(out.glob("*.tar"))
    assert len(shards) > 1 and all(p.stat().st_size <= 50 * 1024 for p in shards)
    assert os.path.exists(out / "classnames.txt")

    make_image_folder(tmp_path / "images")
    args = ["shards", "folder", str(tmp_path / "images"), str(tmp_path / "f"), "--class-from-parent", "--format", "png"]
    assert main([*args, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 5 samples in 1 shards" in printed and "2 inputs failed" in printed
    assert (tmp_path / "f" / "classnames.txt").read_text() == "blue things\nred things\n"


def test_no_progress_bar_in_a_log_file(tmp_path):
    """`mmcl shards` with stderr redirected (SLURM, nohup, CI): plain log lines, no tqdm carriage returns."""
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "mmcl.cli", "shards", "synthetic", str(tmp_path / "s"), "--n", "40", "--image-size",
         "16", "--maxcount", "20"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stderr and "img/s]" not in proc.stderr, proc.stderr[-2000:]
    assert "40 samples in 2 shards" in proc.stderr


def test_plain_progress_lines_count_and_rate(caplog):
    import logging

    from mmcl.utils import progress_bar

    bar = progress_bar(10, "shards -> out", "img", every_s=0.0)  # stderr is not a terminal under pytest
    with caplog.at_level(logging.INFO, logger="mmcl"):
        bar.update(4)
        bar.update(6)
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("shards -> out: 4/10 img (") and lines[1].startswith("shards -> out: 10/10 img ("), lines
