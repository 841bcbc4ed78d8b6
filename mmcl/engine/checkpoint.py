"""Step checkpoints written atomically, the last K kept, restored without unpickling code.

Layout of `checkpoints/step_0000200/`:
  model.safetensors     the model's weights (what inference and export read)
  optimizer.pt          optimizer state: tensors and numbers only (loaded weights_only=True)
  trainer.json          step, counters, metric history length
  rank{R}.json          that process's data position and Python/NumPy RNG states
  rank{R}_rng.pt        that process's torch RNG states (uint8 tensors, weights_only)
A directory is first written as `.step_0000200.tmp` and renamed when complete,
so a crash never leaves a half checkpoint that looks whole.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmcl.utils import UserError, atomic_write_text

STEP_PREFIX = "step_"
TASK_STATE = "task_state.safetensors"  # the task's own state: loss terms' heads, queues, buffers


def step_dir(root: Path, step: int) -> Path:
    return root / f"{STEP_PREFIX}{step:07d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)]
    return sorted((p for p in done if (p / "trainer.json").is_file()), key=lambda p: p.name)


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
    tmp.replace(path)


def load_model_weights(model: nn.Module, path: Path, strict: bool = True) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"no model weights at {path}")
    try:
        state = load_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if wrong:
        k = wrong[0]
        raise ValueError(
            f"{path}: weights do not match the model config ({k} is {tuple(state[k].shape)} in the file, "
            f"{tuple(own[k].shape)} in the model)"
        )
    if strict and (missing or unexpected):
        raise ValueError(
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
    state["rng_tensors"] = torch.load(ckpt / f"rank{rank}_rng.pt", weights_only=True)
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
    save_model(model, tmp_dir / "model.safetensors")
    if task_state:  # the loss terms' heads, queues, momentum encoders, counters
        save_file({k: v.detach().cpu().contiguous() for k, v in task_state.items()}, str(tmp_dir / TASK_STATE))
    torch.save(optimizer.state_dict(), tmp_dir / "optimizer.pt")
    atomic_write_text(tmp_dir / "trainer.json", json.dumps(trainer_state, indent=1))  # last: marks complete


def publish(tmp_dir: Path, final: Path, keep: int) -> None:
    """Rename the finished temp dir into place, then drop all but the newest `keep` checkpoints."""
    if final.exists():
        shutil.rmtree(final)
    tmp_dir.rename(final)
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
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu"))
