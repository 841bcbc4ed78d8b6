"""transformers interop, inward: a local (or hub) CLIPModel / SiglipModel folder as an mmcl CLIP.

`model_config_from_hf(path)` describes the folder as an mmcl `ModelConfig` whose towers are the
`hf_clip` kinds of `mmcl.models.hf_towers`; `hf_to_mmcl` renames the HF state dict by prefix:

    vision_model.*, visual_projection.weight   image.vision_model.*, image.visual_projection.weight
    text_model.*, text_projection.weight       text.text_model.*, text.text_projection.weight
    logit_scale, logit_bias  (SigLIP: (1,))    logit_scale, logit_bias  (())

The outward direction (`mmcl export hf`) is `mmcl.models.hf_export`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from mmcl.config import ImageTowerConfig, ModelConfig, TextTowerConfig
from mmcl.models.hf_towers import hf_config, hf_embed_dim, hf_preprocess
from mmcl.utils import UserError

_TOWER_PREFIXES = {"vision_model.": "image.", "visual_projection.": "image.", "text_model.": "text.",
                   "text_projection.": "text."}  # fmt: skip


def is_hf_folder(path: str | Path) -> bool:
    """Whether `path` is a folder holding a transformers model (`config.json` with a `model_type`)."""
    import json

    file = Path(path) / "config.json"
    if not file.is_file():
        return False
    try:
        return "model_type" in json.loads(file.read_text())
    except (OSError, ValueError):
        return False


def model_config_from_hf(path: str | Path) -> ModelConfig:
    """An mmcl ModelConfig (arch 'clip', `hf_clip` towers) for the transformers CLIP/SigLIP at `path`."""
    path = str(Path(path).resolve()) if Path(path).exists() else str(path)
    cfg, family = hf_config(path)
    vision, text = cfg.vision_config, cfg.text_config
    siglip = not family.projections
    return ModelConfig(
        arch="clip",
        embed_dim=hf_embed_dim(cfg, family),
        image=ImageTowerConfig(
            kind="hf_clip",
            hf_name=path,
            timm_name="",
            image_size=int(vision.image_size),
            # the folder's image processor, recorded so a run (and its exports) keep it
            preprocess=_plain(hf_preprocess(path, family, int(vision.image_size))),
        ),
        text=TextTowerConfig(
            kind="hf_clip",
            hf_name=path,
            tokenizer=path,
            pooling="eos",
            context_length=int(text.max_position_embeddings),
            vocab_size=int(text.vocab_size),
            width=int(text.hidden_size),
            heads=int(text.num_attention_heads),
            layers=int(text.num_hidden_layers),
            mlp_ratio=text.intermediate_size / text.hidden_size,
        ),
        # the checkpoint's values replace these; SigLIP's big_vision recipe does not cap the scale
        init_logit_scale=10.0 if siglip else math.exp(getattr(cfg, "logit_scale_init_value", math.log(1 / 0.07))),
        max_logit_scale=1e4 if siglip else 100.0,
        init_logit_bias=-10.0 if siglip else None,
    )


def _plain(pre: dict) -> dict:
    """A preprocessing dict with lists for tuples (YAML-safe in config.yaml)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in pre.items()}


def hf_to_mmcl(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers CLIPModel / SiglipModel state dict to mmcl's (`hf_clip` towers)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in ("logit_scale", "logit_bias"):
            out[key] = value.reshape(())
            continue
        prefix = next((p for p in _TOWER_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            if key.endswith("position_ids"):  # a buffer older transformers saved
                continue
            raise UserError(f"unexpected tensor '{key}' in a transformers CLIP/SigLIP state dict")
        out[_TOWER_PREFIXES[prefix] + key] = value
    return out


def mmcl_to_hf(state_dict: dict[str, torch.Tensor], siglip: bool) -> dict[str, torch.Tensor]:
    """The inverse of `hf_to_mmcl` (SigLIP's scale and bias back to shape (1,))."""
    out = {}
    for key, value in state_dict.items():
        if key in ("logit_scale", "logit_bias"):
            out[key] = value.reshape(1) if siglip else value.reshape(())
        else:
            out[key.split(".", 1)[1]] = value
    return out


def read_hf_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The float32 state dict of the transformers model at `path` (a folder, or a hub name on a machine with
    the hub), loaded by transformers itself so every saved layout and format it knows works."""
    import transformers

    cfg, family = hf_config(str(path))
    cls = getattr(transformers, family.model_cls)
    try:
        model = cls.from_pretrained(str(path), dtype=torch.float32)
    except Exception as e:  # noqa: BLE001  (a bad weights file surfaces as any of many types, by version)
        if Path(path).is_dir():  # name the file that cannot be read safely, in words of our own
            from mmcl.models.weights_file import check_weights_files

            check_weights_files(path)
        # torch's text for a refused pickle advises weights_only=False (it would run the file's code): never shown
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        reason = type(e).__name__ if "weights_only" in str(e) else first[:200]
        raise UserError(f"'{path}': cannot load the {family.model_cls} weights ({reason})") from None
    return {k: v.detach() for k, v in model.state_dict().items()}
