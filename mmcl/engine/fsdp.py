"""Checkpoints of a task sharded by FSDP (Accelerate's `distributed_type: FSDP`, fsdp_version 2), with the
promises of `mmcl.engine.checkpoint`: the same layout, atomic, manifest last, fallback, nothing pickled.

Under FSDP each process holds a slice of every parameter and of its optimizer moments. A checkpoint
gathers them into one full, unsharded state on rank 0 (`torch.distributed.checkpoint.state_dict` with
`full_state_dict=True, cpu_offload=True`: one parameter at a time to the CPU, so rank 0 needs the model's
size in RAM, not the GPU), which writes the files that a DDP or single-process run writes, except the
optimizer, which is stored as tensors plus JSON instead of `optimizer.pt`:

    model.safetensors              the model's full weights (inference, export and DDP runs read it as is)
    task_state.safetensors         the loss terms' own state, when they have any
    optimizer.safetensors          every optimizer tensor, key 'state/PARAM_NAME/SLOT' (exp_avg, step, ...)
    optimizer.json                 param groups (hyper-parameters, parameters by name) and non-tensor slots
    trainer.json, rank{R}.*, manifest.json   as in `mmcl.engine.checkpoint`

`prepare` (called before the optimizer is built and the model wrapped) makes a task shardable: FSDP2 shards
only tensors with a dimension, and CLIP's temperature and SigLIP's bias are 0-dim parameters, so each is
stored as a (1,) parameter behind a parametrization (the model still reads a 0-dim tensor: `Task.step`
relies on it), and the image tower's class-token shortcut, which bypasses the last block's `forward` where
FSDP2 gathers its weights, is turned off. The files keep the plain names and 0-dim shapes, so they are the
same as a DDP run's.

Parameters are named by their fully qualified names, not positions, so the files do not depend on how the
model was wrapped or sharded: a checkpoint written on 8 GPUs resumes on 4 (the data position is per rank and
still needs the same number of processes, as for DDP). Loading reads the full state on every rank and
each rank keeps its own slice (`set_model_state_dict` / `set_optimizer_state_dict`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmcl.engine import checkpoint as ckpt
from mmcl.utils import UserError, atomic_write_text, fsync_path

OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"


class _AsVector(nn.Module):
    """Parametrization: a 0-dim parameter kept as a (1,) one (FSDP2 cannot shard 0-dim tensors)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(())

    def right_inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(1)


def vectorize_scalars(module: nn.Module) -> list[str]:
    """Store every 0-dim parameter of `module` as a (1,) parameter read back as 0-dim; returns their names.

    Call it before building the optimizer and before wrapping with FSDP (the parameters are new objects).
    """
    from torch.nn.utils import parametrize

    names = []
    for prefix, mod in list(module.named_modules()):
        for name, param in list(mod.named_parameters(recurse=False)):
            if param.ndim == 0:
                parametrize.register_parametrization(mod, name, _AsVector(), unsafe=True)
                names.append(f"{prefix}.{name}" if prefix else name)
    return names


def prepare(module: nn.Module) -> list[str]:
    """Make an mmcl task shardable by FSDP2 (before building the optimizer and wrapping); returns what changed.

    - 0-dim parameters (temperature, bias) -> `vectorize_scalars`;
    - image towers' class-token shortcut (the last ViT block run for the class token only, through the
      block's submodules) is turned off: FSDP2 gathers a wrapped block's weights in the block's own
      `forward`, which the shortcut does not call. The full last block costs about 1/depth more compute.
    """
    changed = [f"{name} as (1,)" for name in vectorize_scalars(module)]
    for name, mod in module.named_modules():
        if getattr(mod, "class_token_shortcut", False):
            mod.class_token_shortcut = False
            changed.append(f"{name}: class-token shortcut off")
    return changed


def after_wrap(module: nn.Module) -> list[str]:
    """After FSDP2 wrapped the blocks (`accelerator.prepare`): blocks whose `forward_at` the tower calls instead of
    `forward` (the text tower's last block, for the pooled position only) gather their weights there too."""
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    names = []
    for name, mod in module.named_modules():
        if isinstance(mod, FSDPModule) and callable(getattr(mod, "forward_at", None)):
            register_fsdp_forward_method(mod, "forward_at")
            names.append(name)
    return names


def _vectorized(module: nn.Module) -> dict[str, str]:
    """{state-dict name of each vectorized scalar's (1,) parameter: its plain name}."""
    out = {}
    for prefix, mod in module.named_modules():
        for name, plist in getattr(mod, "parametrizations", {}).items():
            if isinstance(plist[0], _AsVector):
                dot = f"{prefix}." if prefix else ""
                out[f"{dot}parametrizations.{name}.original"] = f"{dot}{name}"
    return out


def _plain_names(state: dict[str, Any], vectorized: dict[str, str], squeeze: bool) -> dict[str, Any]:
    """Rename (1,) parameters to their plain names and make them 0-dim (squeeze) or the reverse."""
    names = vectorized if squeeze else {v: k for k, v in vectorized.items()}
    out = {}
    for key, value in state.items():
        new = names.get(key, key)
        if new != key and isinstance(value, torch.Tensor):
            value = value.reshape(()) if squeeze else value.reshape(1)
        out[new] = value
    return out


def _plain_optimizer(state: dict[str, Any], vectorized: dict[str, str], squeeze: bool) -> dict[str, Any]:
    names = vectorized if squeeze else {v: k for k, v in vectorized.items()}
    slots_out = {}
    for name, slots in state["state"].items():
        if name in names:
            shape = () if squeeze else (1,)
            # the step counter is 0-dim already; the moments are copies of the parameter's shape
            slots = {s: v.reshape(shape) if isinstance(v, torch.Tensor) and s != "step" else v
                     for s, v in slots.items()}  # fmt: skip
        slots_out[names.get(name, name)] = slots
    groups = [{**g, "params": [names.get(n, n) for n in g["params"]]} for g in state["param_groups"]]
    return {"state": slots_out, "param_groups": groups}


def is_sharded(module: nn.Module) -> bool:
    """True if `module` has FSDP-sharded parameters (FSDP2's DTensors) or is wrapped by FSDP1."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in module.parameters()):
        return True
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in module.modules())


def _options(**kwargs: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def gather_full_state(task: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The task's and the optimizer's full, unsharded state on rank 0 (CPU tensors); empty dicts elsewhere.

    A collective: every process must call it, in the same order.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    optimizer = getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps torch's
    options = _options(cpu_offload=True)
    vectorized = _vectorized(task)
    model_state = get_model_state_dict(task, options=options)
    optim_state = get_optimizer_state_dict(task, optimizer, options=options)
    if not model_state:  # not rank 0
        return {}, {}
    return _plain_names(model_state, vectorized, True), _plain_optimizer(optim_state, vectorized, True)


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict keyed by parameter name -> (tensors for safetensors, the rest for JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, slots in state["state"].items():
        if "/" in name:
            raise ValueError(f"parameter name {name!r} has a '/': it cannot key the optimizer file")
        for slot, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{name}/{slot}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[slot] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `flatten_optimizer` (JSON lists of hyper-parameters go back to tuples, as torch keeps them)."""
    state: dict[str, dict[str, Any]] = {name: dict(slots) for name, slots in meta["scalars"].items()}
    for key, value in tensors.items():
        _, name, slot = key.split("/")
        state.setdefault(name, {})[slot] = value
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in meta["param_groups"]]  # fmt: skip
    return {"state": state, "param_groups": groups}


def _save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors with aliases cloned (tied weights come out of the full state dict as one tensor twice)."""
    out, seen = {}, set()
    for name, t in state.items():
        t = t.detach().cpu()
        key = t.untyped_storage().data_ptr() if t.numel() else id(t)
        out[name] = t.clone() if key in seen else t.contiguous()
        seen.add(key)
    save_file(out, str(path), metadata={"format": "pt", "producer": "mmcl"})
    fsync_path(path)


def write_main_state(
    tmp_dir: Path, task_state: dict[str, torch.Tensor], optim_state: dict[str, Any], trainer_state: dict[str, Any]
) -> None:
    """Rank 0, into the checkpoint's temp folder: the full state's files, then the manifest (last: marks it complete).

    Args:
        tmp_dir: the temp folder (`checkpoint.tmp_dir_for`), with the ranks' files already in it.
        task_state: the task's full state dict (`gather_full_state`): 'model.*' goes to model.safetensors, the
            rest (loss terms' heads, queues) to task_state.safetensors.
        optim_state: the optimizer's full state dict keyed by parameter name.
        trainer_state: step and counters, as `checkpoint.write_main_state` takes them.
    """
    model = {k.removeprefix("model."): v for k, v in task_state.items() if k.startswith("model.")}
    own = {k: v for k, v in task_state.items() if not k.startswith("model.")}
    _save_tensors(model, tmp_dir / "model.safetensors")
    if own:
        _save_tensors(own, tmp_dir / ckpt.TASK_STATE)
    tensors, meta = flatten_optimizer(optim_state)
    _save_tensors(tensors, tmp_dir / OPTIMIZER_TENSORS)
    atomic_write_text(tmp_dir / OPTIMIZER_META, json.dumps(meta, indent=1))
    atomic_write_text(tmp_dir / "trainer.json", json.dumps(trainer_state, indent=1))
    ckpt.write_manifest(tmp_dir)


def save(
    tmp_dir: Path, task: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any], is_main: bool
) -> None:
    """Every rank: gather the full state (collective); rank 0 writes it (`write_main_state`)."""
    task_state, optim_state = gather_full_state(task, optimizer)
    if is_main:
        write_main_state(tmp_dir, task_state, optim_state, trainer_state)


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{path}: not a readable safetensors file ({reason})") from None


def read_full_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The full task state dict and the optimizer state (by parameter name) of a checkpoint written by `save`."""
    task_state = {f"model.{k}": v for k, v in _read(directory / "model.safetensors").items()}
    if (directory / ckpt.TASK_STATE).is_file():
        task_state.update(_read(directory / ckpt.TASK_STATE))
    if not (directory / OPTIMIZER_META).is_file():
        raise UserError(
            f"{directory} has no {OPTIMIZER_META}: it was not written by an FSDP run (resume it without FSDP, "
            "or start a new train.output_dir)"
        )
    meta = json.loads((directory / OPTIMIZER_META).read_text())
    return task_state, unflatten_optimizer(_read(directory / OPTIMIZER_TENSORS), meta)


def load(task: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Every rank: read the checkpoint's full state and keep this rank's slice of it (model, terms, optimizer)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    optimizer = getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps torch's
    task_state, optim_state = read_full_state(directory)
    own = {_vectorized(task).get(k, k) for k in task.state_dict()}
    missing, unexpected = sorted(own - set(task_state)), sorted(set(task_state) - own)
    if missing or unexpected:
        raise UserError(
            f"{directory}: does not match this model and loss terms (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); resume with the same config or use a new train.output_dir"
        )
    vectorized = _vectorized(task)
    task_state = _plain_names(task_state, vectorized, squeeze=False)
    optim_state = _plain_optimizer(optim_state, vectorized, squeeze=False)
    try:
        set_model_state_dict(task, task_state, options=_options())
    except RuntimeError as e:  # a shape mismatch: the first line names the parameter
        raise UserError(
            f"{directory}: weights do not match the model config ({str(e).splitlines()[0][:200]})"
        ) from None
    set_optimizer_state_dict(task, optimizer, optim_state_dict=optim_state, options=_options())
