"""`model.init_from`: start a model from pretrained weights, whatever library wrote them.

Accepted sources (`resolve_source` tells them apart):
- an mmcl run, `final/` or `checkpoints/step_*` folder (weights already in mmcl's names);
- an open_clip checkpoint file (`.pt`/`.pth`/`.bin`/`.safetensors`), or a folder in open_clip's hub
  layout (`open_clip_config.json` + `open_clip_model.safetensors` or `open_clip_pytorch_model.bin`);
- a transformers `CLIPModel` / `SiglipModel` folder (`config.json` + weights, as `save_pretrained` writes);
- on a machine with the Hugging Face hub, `hf-hub:ORG/NAME` (an open_clip hub repo) or `hf:ORG/NAME`
  (a transformers repo), downloaded with `huggingface_hub.snapshot_download` and read as above.

`pretrained_model_config(source)` gives the ModelConfig of the architecture the weights belong to;
`load_pretrained(model, source)` loads them, strictly: a missing, unexpected or mis-shaped tensor is a
one-line error naming it (and both shapes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mmcl.config import ModelConfig, from_dict, load_yaml
from mmcl.run_folder import hub_hint
from mmcl.utils import UserError

# open_clip's hub file names (open_clip.constants / factory), preferred first
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                     "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")  # fmt: skip
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@dataclass(frozen=True)
class Source:
    """Where pretrained weights are: `kind` is 'mmcl', 'open_clip' or 'hf'; `path` the folder or file."""

    kind: str
    path: Path


def _download(name: str) -> Path:
    """A hub repo's files (users' machines; nothing in the tests reaches for the hub)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name))
    except Exception as e:  # noqa: BLE001  (offline, unknown repo, auth: one message)
        raise UserError(f"cannot download '{name}' from the Hugging Face hub ({str(e).splitlines()[0]})") from None


def resolve_source(source: str | Path) -> Source:
    """Classify `source` (see the module docstring); hub names are downloaded first."""
    from mmcl.models.hf_compat import is_hf_folder

    text = str(source)
    if text.startswith("hf-hub:"):
        return resolve_source(_download(text[len("hf-hub:") :]))
    if text.startswith("hf:"):
        return Source("hf", _download(text[len("hf:") :]))
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise UserError(f"{path}: not a weights file ({', '.join(WEIGHT_SUFFIXES)})")
        if path.suffix == ".safetensors" and (path.parent / "config.yaml").is_file():
            return Source("mmcl", path.parent)
        return Source("open_clip", path)
    if path.is_dir():
        if (path / OPEN_CLIP_CONFIG).is_file():
            return Source("open_clip", path)
        if is_hf_folder(path):
            return Source("hf", path)
        from mmcl.run_folder import find_weights

        return Source("mmcl", find_weights(path)[0].parent)
    raise UserError(f"model.init_from '{text}': no such file or folder{hub_hint(text)}")


def is_foreign(source: str | Path) -> bool:
    """Whether `source` names a transformers or open_clip model (hub prefix or folder), not an mmcl run."""
    from mmcl.models.hf_compat import is_hf_folder

    text = str(source)
    if text.startswith(("hf:", "hf-hub:")):
        return True
    path = Path(text).expanduser()
    return path.is_dir() and ((path / OPEN_CLIP_CONFIG).is_file() or is_hf_folder(path))


def _open_clip_weights(folder: Path) -> Path:
    for name in OPEN_CLIP_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"{folder}: an open_clip folder without weights (looked for {', '.join(OPEN_CLIP_WEIGHTS)})")


def pretrained_model_config(source: str | Path) -> ModelConfig:
    """The mmcl ModelConfig of the architecture stored at `source`, with `init_from` pointing at it.

    An open_clip file carries no architecture: give its folder (with `open_clip_config.json`), or a
    model preset and `model.init_from=FILE`.
    """
    src = resolve_source(source)
    if src.kind == "hf":
        from mmcl.models.hf_compat import model_config_from_hf

        cfg = model_config_from_hf(src.path)
    elif src.kind == "open_clip":
        if src.path.is_file():
            raise UserError(
                f"{src.path}: an open_clip weights file does not say its architecture; give its folder "
                f"(with {OPEN_CLIP_CONFIG}) or a model preset with model.init_from={src.path}"
            )
        from mmcl.models.openclip_compat import model_config_from_open_clip

        cfg = model_config_from_open_clip(src.path / OPEN_CLIP_CONFIG)
    else:
        from mmcl.run_folder import find_weights

        raw = load_yaml(find_weights(src.path)[1])
        cfg = from_dict(ModelConfig, raw.get("model", {}), "model")
    cfg.init_from = str(src.path.resolve()) if src.path.exists() else str(src.path)
    return cfg


def read_pretrained(source: str | Path) -> dict[str, torch.Tensor]:
    """The weights at `source` in mmcl's parameter names."""
    src = resolve_source(source)
    if src.kind == "hf":
        from mmcl.models.hf_compat import hf_to_mmcl, read_hf_state_dict

        return hf_to_mmcl(read_hf_state_dict(src.path))
    if src.kind == "open_clip":
        from mmcl.models.openclip_compat import _read_state_dict, open_clip_to_mmcl

        file = src.path if src.path.is_file() else _open_clip_weights(src.path)
        return open_clip_to_mmcl(_read_state_dict(file))
    from mmcl.models.weights_file import read_weights

    return read_weights(src.path / "model.safetensors")


def load_checked(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """`model.load_state_dict(state, strict=True)` with a one-line error naming what does not fit."""
    expected = model.state_dict()
    for key in sorted(set(expected) & set(state)):
        if state[key].shape != expected[key].shape:
            raise UserError(
                f"{where}: tensor '{key}' has shape {tuple(state[key].shape)} in the checkpoint but "
                f"{tuple(expected[key].shape)} in the model"
            )
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = [f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
                 for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]  # fmt: skip
        raise UserError(f"{where}: the checkpoint does not match the model's architecture: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


def load_pretrained(model: nn.Module, source: str | Path) -> None:
    """Load the weights at `source` into `model` (strict, shapes checked)."""
    state = read_pretrained(source)
    if getattr(model, "logit_bias", None) is not None and "logit_bias" not in state:
        state["logit_bias"] = model.logit_bias.detach().clone()  # a CLIP checkpoint fine-tuned with SigLIP's loss
    load_checked(model, state, f"model.init_from '{source}'")
