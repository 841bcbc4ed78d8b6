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
resume the newest checkpoint is checked against its manifest; a damaged one is
passed over for the previous complete one, with a warning naming the problem.
Nothing is unpickled beyond tensors and numbers (`torch.load(weights_only=True)`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmcl.utils import UserError, atomic_write_text, fsync_dir, fsync_path

log = logging.getLogger("mmcl.train")

STEP_PREFIX = "step_"
MANIFEST = "manifest.json"
TASK_STATE = "task_state.safetensors"  # the task's own state: loss terms' heads, queues, buffers


def step_dir(root: Path, step: int) -> Path:
    return root / f"{STEP_PREFIX}{step:07d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Published checkpoints (a manifest, or trainer.json for older ones), oldest first; not verified."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)]
    marked = (p for p in done if (p / MANIFEST).is_file() or (p / "trainer.json").is_file())
    return sorted(marked, key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


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
    save_file(state, str(tmp), metadata={"format": "pt", "producer": "mmcl"})
    fsync_path(tmp)
    tmp.replace(path)
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
    plain, tensors = rng_state()
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
    """Weights, optimizer and trainer state; then the manifest of every file in `tmp_dir` (rank files included)."""
    save_model(model, tmp_dir / "model.safetensors")
    if task_state:  # the loss terms' heads, queues, momentum encoders, counters
        save_file({k: v.detach().cpu().contiguous() for k, v in task_state.items()}, str(tmp_dir / TASK_STATE))
    torch.save(optimizer.state_dict(), tmp_dir / "optimizer.pt")
    atomic_write_text(tmp_dir / "trainer.json", json.dumps(trainer_state, indent=1))
    write_manifest(tmp_dir)  # last: marks complete


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
    """None if every file matches `manifest.json` (size, then SHA-256), else what is wrong, in a few words.

    Checkpoints written before manifests existed (no manifest, but trainer.json) are accepted as they are.
    """
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return None if (ckpt / "trainer.json").is_file() else "no manifest.json"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"manifest.json is unreadable ({type(e).__name__})"
    for name, want in files.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{name} is {size} bytes, the manifest says {want['size']}"
        if _sha256(path) != want["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def newest_valid_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint under `root` that passes `verify_checkpoint`; each damaged newer one is warned about."""
    found = list_checkpoints(root)
    for i, candidate in enumerate(reversed(found)):
        problem = verify_checkpoint(candidate)
        if problem is None:
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
    optimizer.load_state_dict(safe_torch_load(ckpt / "optimizer.pt"))
