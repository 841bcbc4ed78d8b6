"""Checkpoints that survive a bad disk: fsync before rename, a manifest checked on resume, no unsafe unpickling."""

from __future__ import annotations

import errno
import io
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch

from mmcl.cli import main
from mmcl.config import load_experiment
from mmcl.engine import checkpoint as ckpt
from mmcl.engine.trainer import train

TINY = [
    "model.preset=clip-tiny",
    "train.trackers=[none]",
    "train.progress=false",
    "train.warmup_steps=1",
    "data.batch_size=16",
    "data.num_workers=0",
    "data.shuffle_buffer=16",
    "train.ckpt_every=2",
    "train.keep_checkpoints=3",
]


def _args(shards: Path, out: Path, steps: int) -> list[str]:
    return [*TINY, f"data.train_shards=[{shards / 'train'}]", f"train.output_dir={out}", f"train.steps={steps}"]


@pytest.fixture(scope="module")
def trained_run(demo_shards, tmp_path_factory) -> Path:
    """A run with checkpoints at steps 2 and 4 (copied per test: tests damage them)."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train(load_experiment(None, _args(demo_shards, out, 4)))
    return out


@pytest.fixture
def run(trained_run, tmp_path) -> Path:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


def test_every_file_and_the_folder_are_fsynced_before_the_rename(demo_shards, tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst) -> None:
        events.append(("rename", f"{src} -> {dst}"))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    out = tmp_path / "run"
    train(load_experiment(None, _args(demo_shards, out, 2)))
    final = out / "checkpoints" / "step_0000002"
    tmp = str(ckpt.tmp_dir_for(out / "checkpoints", 2).resolve())
    renamed = [i for i, (kind, what) in enumerate(events) if kind == "rename" and what.startswith(tmp)]
    assert len(renamed) == 1
    before = {what for kind, what in events[: renamed[0]] if kind == "fsync"}
    for path in final.iterdir():  # fsynced under its own name or the temporary one it was renamed from
        names = {what[len(tmp) + 1 :] for what in before if what.startswith(f"{tmp}/")}
        assert path.name in names or any(n.startswith(f".{path.name}.") for n in names), f"{path.name} not fsynced"
    assert tmp in before, "the checkpoint folder was not fsynced before the rename"
    after = {what for kind, what in events[renamed[0] :] if kind == "fsync"}
    assert str(final.parent.resolve()) in after, "the parent folder was not fsynced after the rename"
    assert ckpt.verify_checkpoint(final) is None


def test_manifest_lists_every_file_with_size_and_hash(run):
    import json

    newest = ckpt.list_checkpoints(run / "checkpoints")[-1]
    files = json.loads((newest / "manifest.json").read_text())["files"]
    assert set(files) == {p.name for p in newest.iterdir()} - {"manifest.json"}
    assert files["model.safetensors"]["size"] == (newest / "model.safetensors").stat().st_size


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(run, demo_shards, caplog):
    newest = run / "checkpoints" / "step_0000004"
    weights = newest / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as f:
        f.truncate(size // 2)
    with caplog.at_level(logging.INFO, logger="mmcl"):
        result = train(load_experiment(None, _args(demo_shards, run, 6)))
    assert result.step == 6
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "damaged" in r.getMessage()]
    assert warning and f"model.safetensors is {size // 2} bytes, the manifest says {size}" in warning[0]
    assert "falling back to step_0000002" in warning[0]
    assert any("resumed from" in r.getMessage() and "step_0000002" in r.getMessage() for r in caplog.records)


def test_flipped_byte_is_caught_by_the_hash(run):
    newest = run / "checkpoints" / "step_0000004"
    data = bytearray((newest / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / "optimizer.pt").write_bytes(bytes(data))
    assert ckpt.verify_checkpoint(newest) == "optimizer.pt does not match its SHA-256 in the manifest"
    assert ckpt.newest_valid_checkpoint(run / "checkpoints").name == "step_0000002"


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _hostile_pickle(marker: Path) -> bytes:
    payload = _Payload()
    payload.marker = str(marker)
    buf = io.BytesIO()
    torch.save({"state": {0: payload}, "param_groups": []}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("name", ["optimizer.pt", "rank0_rng.pt"])
def test_hostile_pickle_is_refused_in_one_line(run, demo_shards, tmp_path, capsys, name):
    marker = tmp_path / "pwned"
    newest = run / "checkpoints" / "step_0000004"
    (newest / name).write_bytes(_hostile_pickle(marker))
    ckpt.write_manifest(newest)  # a consistent manifest: the file looks intact, only its content is hostile
    rc = main(["train", "-", *_args(demo_shards, run, 6)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"mmcl train: error: {newest / name}: not a safe checkpoint")
    assert "weights_only" not in err
    assert not marker.exists()


def test_hostile_pickle_without_a_matching_manifest_is_passed_over(run, tmp_path):
    marker = tmp_path / "pwned"
    newest = run / "checkpoints" / "step_0000004"
    (newest / "optimizer.pt").write_bytes(_hostile_pickle(marker))
    assert ckpt.newest_valid_checkpoint(run / "checkpoints").name == "step_0000002"
    assert not marker.exists()


def test_safe_torch_load_never_suggests_the_unsafe_load(tmp_path):
    path = tmp_path / "evil.pt"
    path.write_bytes(_hostile_pickle(tmp_path / "pwned"))
    with pytest.raises(ValueError) as e:
        ckpt.safe_torch_load(path)
    assert "not a safe checkpoint" in str(e.value) and "weights_only" not in str(e.value)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(pickle.UnpicklingError):  # the check above is meaningful: torch itself refuses it
        torch.load(path, weights_only=True)


# ---------------------------------------------------------------- what a checkpoint holds is checked, not trusted


def _resume(run: Path, demo_shards: Path, capsys, steps: int = 6) -> tuple[int, str]:
    rc = main(["train", "-", *_args(demo_shards, run, steps)])
    return rc, capsys.readouterr().err


def _resumed_from(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "resumed from" in r.getMessage()]


def test_deleted_manifest_makes_the_checkpoint_incomplete(run, demo_shards, caplog):
    newest = run / "checkpoints" / "step_0000004"
    (newest / "manifest.json").unlink()
    assert ckpt.verify_checkpoint(newest) is not None
    with caplog.at_level(logging.INFO, logger="mmcl"):
        result = train(load_experiment(None, _args(demo_shards, run, 6)))
    assert result.step == 6
    warning = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "step_0000004" in r.getMessage()
    ]
    assert warning and "no manifest.json" in warning[0] and "falling back to step_0000002" in warning[0]
    assert "step_0000002" in _resumed_from(caplog)[0]


def test_deleted_manifest_and_truncated_optimizer_fall_back(run, demo_shards, caplog, capsys):
    newest = run / "checkpoints" / "step_0000004"
    (newest / "manifest.json").unlink()
    opt = newest / "optimizer.pt"
    with opt.open("r+b") as f:
        f.truncate(opt.stat().st_size // 3)
    with caplog.at_level(logging.INFO, logger="mmcl"):
        rc, err = _resume(run, demo_shards, capsys)
    assert rc == 0, err
    assert "Traceback" not in err
    assert "step_0000002" in _resumed_from(caplog)[0]


def test_truncated_rank_state_under_a_recomputed_manifest_falls_back(run, demo_shards, caplog, capsys):
    newest = run / "checkpoints" / "step_0000004"
    rank = newest / "rank0.json"
    rank.write_bytes(rank.read_bytes()[: rank.stat().st_size // 2])
    ckpt.write_manifest(newest)  # the manifest agrees: only the content is wrong
    assert "rank0.json" in ckpt.verify_checkpoint(newest)
    with caplog.at_level(logging.INFO, logger="mmcl"):
        rc, err = _resume(run, demo_shards, capsys)
    assert rc == 0 and "Traceback" not in err
    assert "step_0000002" in _resumed_from(caplog)[0]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"step": 99999}, "step 99999 does not match the folder name step_0000004"),
        ({"step": "4"}, "step is not an integer"),
        ({"step": -4}, "step -4"),
        ({"num_processes": 0}, "num_processes"),
    ],
)
def test_implausible_trainer_state_is_refused(run, demo_shards, caplog, capsys, change, problem):
    import json

    newest = run / "checkpoints" / "step_0000004"
    state = json.loads((newest / "trainer.json").read_text())
    (newest / "trainer.json").write_text(json.dumps({**state, **change}))
    ckpt.write_manifest(newest)
    assert problem in ckpt.verify_checkpoint(newest)
    with caplog.at_level(logging.INFO, logger="mmcl"):
        rc, err = _resume(run, demo_shards, capsys)
    assert rc == 0 and "Traceback" not in err
    assert "step_0000002" in _resumed_from(caplog)[0]
    assert json.loads((run / "checkpoints" / "step_0000006" / "trainer.json").read_text())["step"] == 6


def test_a_checkpoint_past_the_configured_steps_is_one_line(run, demo_shards, capsys):
    rc, err = _resume(run, demo_shards, capsys, steps=3)  # the newest checkpoint is step 4
    assert rc == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("mmcl train: error: ") and "step_0000004" in line and "train.steps=3" in line


# ---------------------------------------------------------------- a full or read-only disk during a checkpoint


@pytest.mark.parametrize(
    ("err", "fails", "says"),
    [(errno.ENOSPC, "optimizer.pt", "no space left on "), (errno.EROFS, "rank0_rng.pt", "read-only file system")],
)
def test_disk_full_during_a_checkpoint_is_one_line_and_leaves_no_tmp(
    run, demo_shards, capsys, monkeypatch, err, fails, says
):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith(fails):  # half the file reaches the disk, then the device refuses the rest
            real_save(obj, f, *args, **kwargs)
            with open(f, "r+b") as fh:
                fh.truncate(Path(f).stat().st_size // 2)
            raise OSError(err, os.strerror(err), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    rc, err_text = _resume(run, demo_shards, capsys)
    assert rc == 2 and "Traceback" not in err_text
    line = err_text.strip().splitlines()[-1]
    assert line.startswith("mmcl train: error: ") and says in line, line
    if err == errno.ENOSPC:
        needed = sum(p.stat().st_size for p in (run / "checkpoints" / "step_0000004").iterdir()) / 1e6
        mb = float(line.split("needed ~")[1].split(" MB")[0])
        assert 0.5 * needed <= mb <= 2 * needed, line
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")][-1] == "step_0000004"
    assert ckpt.verify_checkpoint(run / "checkpoints" / "step_0000004") is None


def test_an_fsdp_checkpoint_resumed_without_fsdp_is_one_line(tmp_path):
    """FSDP writes its optimizer as safetensors + JSON (mmcl.engine.fsdp); a DDP resume says so in one line."""
    import torch

    from mmcl.engine.checkpoint import load_optimizer
    from mmcl.utils import UserError

    (tmp_path / "optimizer.safetensors").write_bytes(b"")
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(UserError, match="written by an FSDP run"):
        load_optimizer(opt, tmp_path)
