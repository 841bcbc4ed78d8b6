"""Step checkpoints written atomically, the last K kept, restored without unpickling code.

Layout of `checkpoints/step_0000200/`:
  model.safetensors     the model's weights (what inference and export read)
  optimizer.pt          optimizer state: tensors and numbers only (loaded weights_only=True)
  trainer.json          step, counters, metric history length
  rank{R}.json          that process's data position and Python/NumPy RNG states
  rank{R}_rng.pt        that process's torch RNG states (uint8 tensors, weights_only)
  manifest.json         size and SHA-256 of every file above; written last
A directory is first written as `.step_0000200.tmp`, every file and the directory
are fsynced, and only then is it renamed into place (and the parent fsynced), so
neither a crash nor a power loss leaves a half checkpoint that looks whole. On
resume the newest checkpoint is checked against its manifest (none: incomplete) and what it holds is parsed
and range-checked (the step matches the folder name); a damaged one is passed over for the previous complete
one, with a warning naming the problem. A full or read-only disk while writing one removes the temporary
folder and says so in one line.
Nothing is unpickled beyond tensors and numbers (`torch.load(weights_only=True)`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import pickle
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmcl.run_folder import MANIFEST, STEP_PREFIX, latest_checkpoint, list_checkpoints, step_dir  # noqa: F401
from mmcl.utils import UserError, atomic_write_text, fsync_dir, fsync_path

log = logging.getLogger("mmcl.train")

TASK_STATE = "task_state.safetensors"  # the task's own state: loss terms' heads, queues, buffers


def save_model(model: nn.Module, path: Path) -> None:
    """Weights as safetensors (shared tensors cloned: safetensors refuses aliases)."""
    state = {}
    seen: dict[int, str] = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        key = t.untyped_storage().data_ptr() if t.numel() else id(t)
        state[name] = t.clone() if key in seen else t.contiguous()
        seen.setdefault(key, name)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(state, str(tmp), metadata={"format": "pt", "producer": "mmcl"})
        fsync_path(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def safe_torch_load(path: Path) -> Any:
    """`torch.load` of tensors and plain data only; any other pickled object is refused in one line.

    torch's own message for a refused global suggests `weights_only=False`, i.e. running the file's code:
    that advice is never passed on.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (random bytes escape as a dozen types: IndexError, OSError, ...)
        hostile = isinstance(e, pickle.UnpicklingError) and "GLOBAL" in str(e)  # an import asked: not random bytes
        kind = (
            "holds pickled objects other than tensors and numbers"
            if hostile
            else f"cannot be read ({type(e).__name__})"
        )
        raise UserError(f"{path}: not a safe checkpoint: it {kind}; refusing to load it") from None


def load_model_weights(model: nn.Module, path: Path, strict: bool = True) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"no model weights at {path}")
    try:
        state = load_file(str(path))
    except Exception as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{path}: not a readable safetensors file ({reason})") from None
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if wrong:
        k = wrong[0]
        raise UserError(
            f"{path}: weights do not match the model config ({k} is {tuple(state[k].shape)} in the file, "
            f"{tuple(own[k].shape)} in the model)"
        )
    if strict and (missing or unexpected):
        raise UserError(
            f"{path}: weights do not match the model config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.load_state_dict(state, strict=False)


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    py = random.getstate()
    np_state = np.random.get_state()
    plain = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *map(_plain, np_state[2:])],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return plain, tensors


def _plain(v):
    return v.item() if hasattr(v, "item") else v


def set_rng_state(plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def write_rank_state(tmp_dir: Path, rank: int, data_state: dict[str, Any]) -> None:
    """This process's data position and RNG states (a full or read-only disk: `tmp_dir` removed, one line)."""
    plain, tensors = rng_state()
    with disk_errors(tmp_dir, _tensor_bytes(tensors)):
        torch.save(tensors, tmp_dir / f"rank{rank}_rng.pt")
        atomic_write_text(tmp_dir / f"rank{rank}.json", json.dumps({"data": data_state, "rng": plain}))


def read_rank_state(ckpt: Path, rank: int) -> dict[str, Any]:
    path = ckpt / f"rank{rank}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{ckpt} has no state for process {rank}: was it written by a run with a different number of processes?"
        )
    state = json.loads(path.read_text())
    state["rng_tensors"] = safe_torch_load(ckpt / f"rank{rank}_rng.pt")
    return state


def tmp_dir_for(root: Path, step: int) -> Path:
    return root / f".{STEP_PREFIX}{step:07d}.tmp"


def write_main_state(
    tmp_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    task_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Weights, optimizer and trainer state; then the manifest of every file in `tmp_dir` (rank files included).

    Raises:
        UserError: the disk is full or read-only; `tmp_dir` is removed first (a half checkpoint is only waste).
    """
    needed = _tensor_bytes(model.state_dict()) + _tensor_bytes(optimizer.state_dict()["state"])
    needed += _tensor_bytes(task_state or {})
    with disk_errors(tmp_dir, needed):
        save_model(model, tmp_dir / "model.safetensors")
        if task_state:  # the loss terms' heads, queues, momentum encoders, counters
            save_file({k: v.detach().cpu().contiguous() for k, v in task_state.items()}, str(tmp_dir / TASK_STATE))
        torch.save(optimizer.state_dict(), tmp_dir / "optimizer.pt")
        atomic_write_text(tmp_dir / "trainer.json", json.dumps(trainer_state, indent=1))
        write_manifest(tmp_dir)  # last: marks complete


def _tensor_bytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: what writing it needs on disk, give or take headers."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_tensor_bytes(v) for v in state)
    return 0


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) if folder.is_dir() else 0


# write failures that another try will not cure: the message says what the user must change
_DISK_ERRNOS = {errno.ENOSPC: "full", errno.EDQUOT: "full", errno.EROFS: "read-only"}


@contextlib.contextmanager
def disk_errors(tmp_dir: Path, needed: int = 0) -> Iterator[None]:
    """Turn a full or read-only disk while writing the checkpoint folder `tmp_dir` into one line, after removing
    `tmp_dir`. torch's zip writer reports a full disk as a RuntimeError ("file write failed"): counted as full
    when the disk has less free space than the checkpoint needs."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        kind = _DISK_ERRNOS.get(getattr(e, "errno", None) or 0) if isinstance(e, OSError) else None
        root = tmp_dir.parent
        published = list_checkpoints(root)
        needed = max(needed, _folder_bytes(tmp_dir), _folder_bytes(published[-1]) if published else 0)
        if isinstance(e, RuntimeError) and "write failed" in str(e):
            with contextlib.suppress(OSError):
                kind = "full" if shutil.disk_usage(root).free < needed else None
        if kind is None:
            raise
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if kind == "read-only":
            raise UserError(
                f"read-only file system at {_mount_point(root)}: cannot write the checkpoint in {root}"
            ) from None
        raise UserError(
            f"no space left on {_mount_point(root)} (needed ~{max(needed, 1) / 1e6:.0f} MB) while writing a "
            f"checkpoint in {root}; free some space (or lower train.keep_checkpoints) and rerun to resume"
        ) from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """fsync every file of `directory`, then record each one's size and SHA-256 in `manifest.json`."""
    files = {}
    for path in sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST):
        fsync_path(path)
        files[path.name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    atomic_write_text(directory / MANIFEST, json.dumps({"files": files}, indent=1))


def verify_checkpoint(ckpt: Path) -> str | None:
    """None if every file matches `manifest.json` (size, then SHA-256) and the states it holds are plausible,
    else what is wrong, in a few words.

    A checkpoint without a manifest is incomplete (the manifest is written last): every checkpoint this
    format has ever produced carries one, so a missing one means a lost or deleted file, never an old writer.
    A manifest can be recomputed over damaged files, so what resume will read is parsed and range-checked too.
    """
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return "no manifest.json: the checkpoint is incomplete"
    try:
        files = json.loads(manifest.read_text())["files"]
        wanted = {name: (int(want["size"]), str(want["sha256"])) for name, want in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"manifest.json is unreadable ({type(e).__name__})"
    for name, (size_wanted, sha) in wanted.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != size_wanted:
            return f"{name} is {size} bytes, the manifest says {size_wanted}"
        if _sha256(path) != sha:
            return f"{name} does not match its SHA-256 in the manifest"
    return _check_states(ckpt)


def _read_json(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(path.read_text()), None
    except FileNotFoundError:
        return None, f"{path.name} is missing"
    except (ValueError, OSError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None, f"{path.name} is not valid JSON ({type(e).__name__})"


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_states(ckpt: Path) -> str | None:
    """What is wrong with `trainer.json` and the `rank{R}.json` files, or None: they parse, have the fields
    resume reads with sane types and ranges, and the step is the one in the folder name."""
    state, problem = _read_json(ckpt / "trainer.json")
    if problem:
        return problem
    if not isinstance(state, dict):
        return "trainer.json does not hold an object"
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return "trainer.json: step is not an integer"
    if step < 0:
        return f"trainer.json: step {step} is negative"
    named = ckpt.name[len(STEP_PREFIX) :] if ckpt.name.startswith(STEP_PREFIX) else ""
    if named.isdigit() and int(named) != step:
        return f"trainer.json: step {step} does not match the folder name {ckpt.name}"
    procs = state.get("num_processes")
    if not _is_count(procs) or procs < 1:
        return f"trainer.json: num_processes {procs!r} is not a positive integer"
    for counter in ("bad_in_a_row", "bad_total"):
        if counter in state and not _is_count(state[counter]):
            return f"trainer.json: {counter} {state[counter]!r} is not a count"
    for rank in range(procs):
        rank_state, problem = _read_json(ckpt / f"rank{rank}.json")
        if problem:
            return problem
        rng = rank_state.get("rng") if isinstance(rank_state, dict) else None
        if not isinstance(rank_state.get("data") if isinstance(rank_state, dict) else None, dict) or not (
            isinstance(rng, dict)
            and isinstance(rng.get("python"), list)
            and len(rng["python"]) == 3
            and isinstance(rng.get("numpy"), list)
            and len(rng["numpy"]) == 5
        ):
            return f"rank{rank}.json does not hold a data position and RNG states"
        if not (ckpt / f"rank{rank}_rng.pt").is_file():
            return f"rank{rank}_rng.pt is missing"
    return None


def checkpoint_step(ckpt: Path) -> int:
    """The step recorded in a checkpoint that passed `verify_checkpoint`."""
    return int(json.loads((ckpt / "trainer.json").read_text())["step"])


def newest_valid_checkpoint(root: Path, max_step: int | None = None) -> Path | None:
    """The newest checkpoint under `root` that passes `verify_checkpoint`; each damaged newer one is warned about.

    Raises:
        UserError: that checkpoint is past `max_step` (the configured train.steps): resuming it would train
            nothing and report a run that is not the one asked for.
    """
    found = list_checkpoints(root)
    for i, candidate in enumerate(reversed(found)):
        problem = verify_checkpoint(candidate)
        if problem is None:
            step = checkpoint_step(candidate)
            if max_step is not None and step > max_step:
                raise UserError(
                    f"{candidate} is at step {step}, past train.steps={max_step}: raise train.steps to go on "
                    "from it, or choose another train.output_dir"
                )
            return candidate
        older = found[-i - 2].name if i + 1 < len(found) else None
        log.warning(
            "checkpoint %s is damaged (%s): %s",
            candidate,
            problem,
            f"falling back to {older}" if older else "no earlier complete checkpoint; starting from scratch",
        )
    return None


def publish(tmp_dir: Path, final: Path, keep: int) -> None:
    """Rename the finished temp dir into place (after fsyncing it), then drop all but the newest `keep`."""
    fsync_dir(tmp_dir)
    if final.exists():
        shutil.rmtree(final)
    tmp_dir.rename(final)
    fsync_dir(final.parent)
    for old in list_checkpoints(final.parent)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_task_state(task: nn.Module, ckpt: Path) -> None:
    """Restore the task's own state (everything but the model); a checkpoint without it is an error when
    the task has state: re-initialising heads or queues silently would not be the same run."""
    own = task.state_for_checkpoint()
    path = ckpt / TASK_STATE
    if not own:
        return
    if not path.is_file():
        raise UserError(
            f"{ckpt} has no {TASK_STATE} but the loss terms have state ({', '.join(list(own)[:3])}...): "
            "it was written by another objective; resume with the same loss.terms or use a new train.output_dir"
        )
    state = load_file(str(path))
    missing = sorted(set(own) - set(state))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or wrong:
        what = f"missing {missing[:3]}" if missing else f"{wrong[0]} is {tuple(state[wrong[0]].shape)}"
        raise UserError(f"{path}: does not match the loss terms' state ({what})")
    task.load_state_dict({**task.state_dict(), **state})


def load_optimizer(optimizer: torch.optim.Optimizer, ckpt: Path) -> None:
    if not (ckpt / "optimizer.pt").is_file() and (ckpt / "optimizer.safetensors").is_file():
        raise UserError(
            f"{ckpt} was written by an FSDP run (optimizer.safetensors): resume it with the FSDP profile "
            "(accelerate launch --config_file configs/accelerate/fsdp.yaml ...) or start a new train.output_dir"
        )
    optimizer.load_state_dict(safe_torch_load(ckpt / "optimizer.pt"))
