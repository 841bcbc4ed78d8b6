"""Reading pretrained weights files safely: safetensors, or torch checkpoints of tensors only.

Every file that cannot be read safely is one `UserError` line naming it: a corrupt or truncated file, random
bytes, a safetensors header that lies, a pickle asking for anything but tensors and plain containers (which
could run code). torch's own message for a refused pickle ends in "weights_only=False will likely succeed",
advice that would run the attacker's code: it is never passed on.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from mmcl.utils import UserError

# suffixes transformers and open_clip write their weights under
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _refuse(path: Path, why: str) -> UserError:
    return UserError(f"{path}: not a readable, safe weights file ({why}); refusing to load it")


_OBJECT_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"}


def _pickle_builds_objects(path: Path, limit: int = 1 << 26) -> bool:
    """Whether `path` is a complete pickle that imports or calls something (read by `pickletools`, which only
    parses: nothing is imported or run). torch refuses some such files before it reaches the import (e.g. a
    protocol-4 FRAME), so its message alone cannot tell a hostile pickle from random bytes."""
    import pickletools

    try:
        with path.open("rb") as f:
            data = f.read(limit)
        names = set()
        for op, _, _ in pickletools.genops(data):
            names.add(op.name)
            if op.name == "STOP":
                return bool(names & _OBJECT_OPCODES)
    except Exception:  # noqa: BLE001  (not a pickle: random or truncated bytes)
        return False
    return False


def _torch_reason(e: BaseException, path: Path) -> str:
    """What went wrong, in words of our own (never torch's text, which may advise weights_only=False)."""
    text = str(e)
    hostile = "Unsupported global" in text or "GLOBAL" in text or _pickle_builds_objects(path)
    if isinstance(e, pickle.UnpicklingError) and hostile:
        return "it asks to unpickle objects other than tensors, which could run code"
    if "zip archive" in text or "central directory" in text or isinstance(e, (EOFError, OSError)):
        return f"corrupt or truncated ({type(e).__name__})"
    return f"not a torch checkpoint of tensors ({type(e).__name__})"


def read_weights(path: str | Path) -> dict[str, Any]:
    """The state dict in the safetensors or torch file `path` (tensors only; CPU).

    Raises:
        UserError: one line naming the file when it cannot be read safely (see the module docstring).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001  (SafetensorError, OSError, ValueError, ... by version)
            raise _refuse(path, f"not a valid safetensors file: {type(e).__name__}") from None
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols: the error line says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)  # never runs the file's code
    except Exception as e:  # noqa: BLE001  (random bytes escape as any of a dozen types)
        raise _refuse(path, _torch_reason(e, path)) from None
    if not isinstance(state, dict):
        raise _refuse(path, f"it holds a {type(state).__name__}, not a state dict")
    return state


def check_weights_files(folder: str | Path) -> None:
    """Read each weights file in `folder` (after a library failed to load it) so that the bad one is named."""
    for file in sorted(Path(folder).iterdir()):
        if file.is_file() and file.suffix in WEIGHT_FILE_SUFFIXES and not file.name.startswith("training_args"):
            read_weights(file)
