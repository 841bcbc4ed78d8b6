"""Index folders that survive kills, failed builds, flipped bytes and a swapped model; `mmcl index` arguments."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmcl.cli import main
from mmcl.index import EmbeddingIndex, build_index, check_model, read_manifest, verify_index
from mmcl.utils import UserError

REPO = Path(__file__).resolve().parents[2]


class TinyEncoder:
    """An `mmcl.inference.Encoder` with real weights: mean RGB of 4 quadrants (12 numbers) through a linear layer.

    Two encoders of different seeds have the same width but different weights: what the model check must tell
    apart. `weights=False` drops the module (an encoder whose weights cannot be fingerprinted).
    """

    def __init__(self, seed: int = 0, dim: int = 8, weights: bool = True) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(12, dim)
        self._proj = self.model
        if not weights:
            del self.model

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        feats = []
        for image in images:
            x = torch.from_numpy(np.asarray(image.convert("RGB").resize((8, 8)), dtype=np.float32) / 255)
            feats.append(torch.cat([q.mean((0, 1)) for q in (x[:4, :4], x[:4, 4:], x[4:, :4], x[4:, 4:])]))
        with torch.no_grad():
            return torch.nn.functional.normalize(self._proj(torch.stack(feats)), dim=-1)


def _images(folder: Path, n: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"img{seed}_{i:03d}.png")
        (folder / f"img{seed}_{i:03d}.txt").write_text(f"picture {i}")
    return folder


def _build(out: Path, sources: list[Path], encoder=None, **kwargs) -> EmbeddingIndex:
    kwargs.setdefault("batch_size", 4)
    return build_index(encoder or TinyEncoder(), [str(s) for s in sources], out, progress=False, **kwargs)


def _hidden(folder: Path) -> list[str]:
    """Temporaries and work folders left in an index folder (names starting with a dot)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


# ---------------------------------------------------------------- nothing stray after a kill or a failure

KILL_DURING_SAVE = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import mmcl.index.store
from test_index_faults import TinyEncoder, _build
from pathlib import Path
real = mmcl.index.store.atomic_open
def atomic_open(path, *a, **k):
    if Path(path).name.startswith("meta."):  # the final metadata file: die half-way through writing it
        cm = real(path, *a, **k)
        f = cm.__enter__()
        f.write('{{"half": ')
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, *a, **k)
mmcl.index.store.atomic_open = atomic_open
_build(Path({out!r}), [Path({src!r})])
"""


def test_a_kill_during_the_final_write_leaves_nothing_stray(tmp_path):
    src, out = _images(tmp_path / "src", 10), tmp_path / "index"
    code = KILL_DURING_SAVE.format(tests=str(Path(__file__).parent), out=str(out), src=str(src))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert any(name.startswith(".meta.") and name.endswith(".tmp") for name in os.listdir(out))  # what a kill leaves
    index = _build(out, [src])  # run again: resumes from .build/, finishes
    assert len(index) == 10
    assert _hidden(out) == []
    assert len(EmbeddingIndex.load(out)) == 10


class _InterruptedEncoder(TinyEncoder):
    """Ctrl-C during the third batch: the chunks committed before it stay in `.build/` for the resume."""

    calls = 0

    def encode_images(self, images):
        self.calls += 1
        if self.calls == 3:
            raise KeyboardInterrupt
        return super().encode_images(images)


def test_stale_temporaries_are_ignored_and_removed_by_the_next_build(tmp_path):
    src, out = _images(tmp_path / "src", 10), tmp_path / "index"
    with pytest.raises(KeyboardInterrupt):
        _build(out, [src], _InterruptedEncoder(), chunk_size=4)
    assert json.loads((out / ".build" / "state.json").read_text())["images"] == 8  # kept for the resume
    # what kills leave: a chunk write (never counted in state.json) and a save of another generation
    (out / ".build" / ".emb.000002.npy.k2j3h4.tmp").write_bytes(b"\x93NUMPY half")
    (out / ".index.000007.faiss.tmp").write_bytes(b"half an index")
    (out / ".meta.000007.jsonl.a8b7c6.tmp").write_text('{"half": ')
    assert len(_build(out, [src], chunk_size=4)) == 10
    assert _hidden(out) == []


def test_a_failed_append_leaves_the_index_as_it_was(tmp_path):
    out = tmp_path / "index"
    _build(out, [_images(tmp_path / "a", 6)], chunk_size=2)
    before = read_manifest(out)
    thumbs = sorted(p.name for p in (out / "images").iterdir())
    other = TinyEncoder(seed=1, dim=4, weights=False)  # another width, and nothing to fingerprint it by
    with pytest.raises(UserError, match=r"\(N, 8\)"):
        _build(out, [_images(tmp_path / "b", 6, seed=1)], other, append=True, chunk_size=2)
    assert _hidden(out) == []
    assert sorted(p.name for p in (out / "images").iterdir()) == thumbs
    assert read_manifest(out) == before and len(EmbeddingIndex.load(out)) == 6


def test_a_failed_first_build_leaves_no_folder_state_behind(tmp_path):
    out = tmp_path / "index"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(UserError, match="no readable images"):
        _build(out, [broken], append=True)
    assert not out.exists() or sorted(os.listdir(out)) == []
    assert len(_build(out, [_images(tmp_path / "a", 5)])) == 5  # a plain build needs no --overwrite


def test_a_second_build_into_the_same_folder_is_refused_while_one_runs(tmp_path):
    from mmcl.index import folder_lock

    out = tmp_path / "index"
    out.mkdir()
    with folder_lock(out, wait=False), pytest.raises(UserError, match="another index build"):
        _build(out, [_images(tmp_path / "a", 3)])


@pytest.mark.parametrize(("err", "says"), [(errno.ENOSPC, "no space left on "), (errno.EROFS, "read-only file system")])
def test_a_full_disk_during_a_build_is_one_line_and_resumable(tmp_path, monkeypatch, capsys, err, says):
    src, out = _images(tmp_path / "src", 10), tmp_path / "index"
    real_save, saves = np.save, []

    def save(f, arr, *args, **kwargs):  # the second chunk reaches the disk half-way, then the device refuses
        saves.append(1)
        if len(saves) == 2:
            f.write(b"\x93NUMPY" + bytes(64))
            raise OSError(err, os.strerror(err))
        return real_save(f, arr, *args, **kwargs)

    monkeypatch.setattr(np, "save", save)
    with pytest.raises(UserError) as e:
        _build(out, [src], chunk_size=4)
    assert says in str(e.value) and "\n" not in str(e.value) and str(out) in str(e.value)
    assert [p for p in out.rglob("*.tmp")] == []  # no half-written file anywhere
    assert json.loads((out / ".build" / "state.json").read_text())["images"] == 4  # the first chunk is kept
    monkeypatch.setattr(np, "save", real_save)
    assert len(_build(out, [src], chunk_size=4)) == 10  # space freed: the same command resumes
    assert _hidden(out) == []


# ---------------------------------------------------------------- checksums


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("which", ["index_file", "meta_file"])
def test_a_flipped_byte_is_caught(tmp_path, capsys, which):
    out = tmp_path / "index"
    _build(out, [_images(tmp_path / "a", 6)])
    manifest = read_manifest(out)
    files = manifest["files"]
    assert set(files) == {manifest["index_file"], manifest["meta_file"]}
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in files.values())
    assert verify_index(out) is None
    _flip(out / manifest[which])
    problem = verify_index(out)
    assert problem == f"{manifest[which]} does not match its SHA-256 in the manifest"
    with pytest.raises(UserError, match="SHA-256"):  # small: hashed at every load
        EmbeddingIndex.load(out)
    assert main(["index", "verify", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1] == f"mmcl index: error: {out}: {problem}; rebuild it" and "Traceback" not in err


def test_a_large_index_is_size_checked_at_load_and_hashed_on_verify(tmp_path, monkeypatch, capsys):
    import mmcl.index.files

    out = tmp_path / "index"
    _build(out, [_images(tmp_path / "a", 6)])
    manifest = read_manifest(out)
    monkeypatch.setattr(mmcl.index.files, "HASH_ON_LOAD_MAX", 10)  # as if the files were gigabytes
    _flip(out / manifest["meta_file"])
    assert len(EmbeddingIndex.load(out)) == 6  # sizes agree: not hashed at this size
    assert main(["index", "verify", str(out)]) == 2
    assert "SHA-256" in capsys.readouterr().err
    with (out / manifest["index_file"]).open("r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match=r"is 100 bytes, the manifest says"):
        EmbeddingIndex.load(out)


def test_verify_passes_a_sound_index(tmp_path, capsys):
    out = tmp_path / "index"
    _build(out, [_images(tmp_path / "a", 6)])
    assert main(["index", "verify", str(out)]) == 0
    assert "6 vectors" in capsys.readouterr().out


# ---------------------------------------------------------------- the index knows its model


def test_an_index_is_tied_to_the_model_that_built_it(tmp_path):
    out = tmp_path / "index"
    built_with = TinyEncoder(seed=0)
    _build(out, [_images(tmp_path / "a", 6)], built_with, info={"model": "runs/a"})
    info = read_manifest(out)["info"]
    assert info["model"] == "runs/a" and len(info["model_fingerprint"]) == 64
    assert check_model(out, TinyEncoder(seed=0)) is True  # the same weights, loaded again
    assert check_model(EmbeddingIndex.load(out), built_with) is True
    with pytest.raises(UserError) as e:
        check_model(out, TinyEncoder(seed=1), name="runs/b")  # same width, other weights
    message = str(e.value)
    assert "\n" not in message and str(out) in message and "runs/a" in message and "runs/b" in message
    assert check_model(out, TinyEncoder(seed=1, weights=False)) is False  # cannot tell: no weights to hash


def test_appending_with_another_model_is_refused_before_any_work(tmp_path):
    out = tmp_path / "index"
    _build(out, [_images(tmp_path / "a", 6)], TinyEncoder(seed=0))
    before = read_manifest(out)
    with pytest.raises(UserError, match="another model"):
        _build(out, [_images(tmp_path / "b", 4, seed=1)], TinyEncoder(seed=1), append=True)
    assert read_manifest(out) == before and _hidden(out) == []


def test_fingerprint_ignores_device_and_float_width():
    from mmcl.index import model_fingerprint

    a = TinyEncoder(seed=0)
    b = TinyEncoder(seed=0)
    b.model.half()  # the same weights loaded in float16
    a.model.weight.data = a.model.weight.data.half().float()  # ... and float32 weights that round the same
    assert model_fingerprint(a) == model_fingerprint(b)
    assert model_fingerprint(TinyEncoder(seed=0, weights=False)) is None


# ---------------------------------------------------------------- numeric arguments


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["search", "IDX", "--text", "x", "-k", "-5"], "argument -k: must be an integer >= 1, got '-5'"),
        (["search", "IDX", "--text", "x", "-k", "0"], "argument -k: must be an integer >= 1, got '0'"),
        (["search", "IDX", "--text", "x", "-k", "many"], "argument -k: must be an integer >= 1, got 'many'"),
        (["build", "S", "--out", "O", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
        (["build", "S", "--out", "O", "--chunk-size", "-1"], "argument --chunk-size: must be an integer >= 1"),
        (["build", "S", "--out", "O", "--thumb-size", "0"], "argument --thumb-size: must be an integer >= 1"),
        (["build", "S", "--out", "O", "--ivf-threshold", "0"], "argument --ivf-threshold: must be an integer >= 1"),
        (["build", "S", "--out", "O", "--max-samples", "-1"], "argument --max-samples: must be an integer >= 0"),
        (["build", "S", "--out", "O", "--max-pixels", "0"], "argument --max-pixels: must be an integer >= 1"),
        (
            ["build", "S", "--out", "O", "--target-recall", "1.5"],
            "argument --target-recall: must be a number in (0, 1]",
        ),
        (
            ["build", "S", "--out", "O", "--target-recall", "nan"],
            "argument --target-recall: must be a number in (0, 1]",
        ),
        (["build", "S", "--out", "O", "--memory-budget", "lots"], "argument --memory-budget: "),
    ],
)
def test_numeric_arguments_are_checked_in_one_line(capsys, args, says):
    with pytest.raises(SystemExit) as e:
        main(["index", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert says in err.strip().splitlines()[-1]
