"""Towers holding the two halves of a `transformers` CLIPModel or SiglipModel (`kind: hf_clip`).

The image tower keeps transformers' `vision_model` (+ CLIP's `visual_projection`), the text tower its
`text_model` (+ CLIP's `text_projection`), under the same names, so an HF state dict maps to mmcl's by
a prefix (`vision_model.*` -> `image.vision_model.*`, `text_model.*` -> `text.text_model.*`) and the
towers compute exactly `get_image_features` / `get_text_features`. The architecture comes from the
folder's `config.json` (`model.image.hf_name` / `model.text.hf_name`); weights come from
`model.init_from` or from an mmcl checkpoint.

Text: CLIP's causal text model pools its first EOS, so rows are cut to the batch's longest and padded
tokens are masked. SigLIP's bidirectional text model pools the last position and was trained on
rows padded to `max_position_embeddings` without a mask (the HF pipeline pads to max_length): the
tower pads each row to that length and passes no mask, as transformers' own usage does.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmcl.config import ImageTowerConfig, TextTowerConfig
from mmcl.models.lock import lock_layer_stack
from mmcl.registry import IMAGE_TOWERS, TEXT_TOWERS
from mmcl.utils import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class HFFamily:
    """How one transformers dual encoder is laid out."""

    model_cls: str  # transformers class of the whole model
    vision_cls: str
    text_cls: str
    projections: bool  # CLIP: bias-free visual/text projections; SigLIP: none (heads inside the towers)
    pad_text_to_max: bool  # SigLIP: rows padded to max_position_embeddings, no mask
    mean: tuple[float, ...]  # image processor defaults when the folder has no preprocessor_config.json
    std: tuple[float, ...]
    resize_mode: str  # CLIPImageProcessor: 'shortest' (+ centre crop); SiglipImageProcessor: 'squash'


FAMILIES: dict[str, HFFamily] = {
    "clip": HFFamily("CLIPModel", "CLIPVisionModel", "CLIPTextModel", True, False, CLIP_MEAN, CLIP_STD, "shortest"),
    "siglip": HFFamily(
        "SiglipModel", "SiglipVisionModel", "SiglipTextModel", False, True, (0.5,) * 3, (0.5,) * 3, "squash"
    ),
}


@functools.lru_cache(maxsize=8)
def _load_config(path: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"'{path}': not a transformers model folder ({str(e).splitlines()[0]})") from None


def hf_config(path: str) -> tuple[Any, HFFamily]:
    """(the transformers config of the CLIP/SigLIP model at `path`, its family)."""
    cfg = _load_config(str(path))
    family = FAMILIES.get(cfg.model_type)
    if family is None:
        raise UserError(
            f"'{path}' holds a transformers '{cfg.model_type}' model; mmcl imports {', '.join(FAMILIES)} dual encoders"
        )
    return cfg, family


def hf_embed_dim(cfg: Any, family: HFFamily) -> int:
    """The joint embedding width of a CLIP (projection_dim) or SigLIP (vision width) config."""
    return int(cfg.projection_dim) if family.projections else int(cfg.vision_config.hidden_size)


def _transformers_cls(name: str) -> type:
    import transformers

    return getattr(transformers, name)


def _check_dim(path: str, embed_dim: int, expected: int) -> None:
    if embed_dim != expected:
        raise UserError(f"model.embed_dim={embed_dim} but the transformers model at '{path}' embeds to {expected}")


_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling values transformers saves


def processor_preprocess(pre: dict[str, Any], image_size: int, where: str) -> dict[str, Any]:
    """mmcl's preprocessing dict (`mmcl.data.transforms.resolve_preprocess` keys) of a transformers image
    processor config (`preprocessor_config.json`): CLIPImageProcessor's `size.shortest_edge` + centre crop is
    `shortest`; SiglipImageProcessor's `size.height/width` without a crop is `squash`."""
    out: dict[str, Any] = {}
    size = pre.get("size") or {}
    if isinstance(size, int):
        size = {"shortest_edge": size}
    crop = pre.get("do_center_crop", False) and pre.get("crop_size")
    if "shortest_edge" in size:
        out["resize_mode"], out["resize_size"] = "shortest", int(size["shortest_edge"])
    elif "height" in size and "width" in size:
        if size["height"] != size["width"]:
            raise UserError(f"{where}: non-square resize {size['height']}x{size['width']} is not supported")
        out["resize_mode"], out["resize_size"] = "squash", int(size["height"])
    if crop:
        crop = crop if isinstance(crop, dict) else {"height": crop, "width": crop}
        if crop.get("height") != crop.get("width") or int(crop["height"]) != image_size:
            raise UserError(f"{where}: crop_size {crop} does not match the model's {image_size} px input")
    elif out.get("resize_mode") == "shortest" and out["resize_size"] != image_size:
        raise UserError(f"{where}: resizes the shorter side to {out['resize_size']} px without a crop to {image_size}")
    if "resample" in pre:
        mode = _PIL_RESAMPLE.get(int(pre["resample"]))
        if mode is None:
            raise UserError(f"{where}: resample={pre['resample']} is not supported (bicubic, bilinear, nearest)")
        out["interpolation"] = mode
    if pre.get("do_normalize", True) is False:
        out["mean"], out["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    elif "image_mean" in pre and "image_std" in pre:
        out["mean"] = tuple(float(v) for v in pre["image_mean"])
        out["std"] = tuple(float(v) for v in pre["image_std"])
    return out


def hf_preprocess(path: str, family: HFFamily, image_size: int) -> dict[str, Any]:
    """The preprocessing of the folder's image processor (`preprocessor_config.json`), or the family's defaults
    (CLIP: shorter side + centre crop; SigLIP: squash), as a `resolve_preprocess` dict."""
    from mmcl.data.transforms import resolve_preprocess

    defaults = {"resize_mode": family.resize_mode}
    file = Path(path) / "preprocessor_config.json"
    if not file.is_file():
        return resolve_preprocess(image_size, family.mean, family.std, defaults)
    try:
        pre = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{file}: not a readable image processor config ({e})") from None
    return resolve_preprocess(
        image_size, family.mean, family.std, defaults, processor_preprocess(pre, image_size, str(file))
    )


@IMAGE_TOWERS.register("hf_clip")
class HFVisionTower(nn.Module):
    """transformers' CLIP/SigLIP vision model (+ CLIP's `visual_projection`).

    Shapes: images (B, 3, S, S) normalised with `mean`/`std` -> (B, embed_dim), equal to the HF model's
    `get_image_features(pixel_values=images).pooler_output`.
    """

    def __init__(self, cfg: ImageTowerConfig, embed_dim: int) -> None:
        super().__init__()
        if not cfg.hf_name:
            raise UserError("model.image.kind is 'hf_clip' but model.image.hf_name is empty")
        hf, family = hf_config(cfg.hf_name)
        vision = hf.vision_config
        _check_dim(cfg.hf_name, embed_dim, hf_embed_dim(hf, family))
        if cfg.image_size != vision.image_size:
            raise UserError(f"model.image.image_size={cfg.image_size} but '{cfg.hf_name}' takes {vision.image_size} px")
        self.cfg = cfg
        self.vision_model = _transformers_cls(family.vision_cls)._from_config(vision, dtype=torch.float32)
        if family.projections:
            self.visual_projection = nn.Linear(vision.hidden_size, embed_dim, bias=False)
        self.preprocess = hf_preprocess(cfg.hf_name, family, int(vision.image_size))  # its image processor's
        self.mean, self.std = self.preprocess["mean"], self.preprocess["std"]
        self.locked = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=images).pooler_output  # (B, W)
        return self.visual_projection(pooled) if hasattr(self, "visual_projection") else pooled

    def lock(self, unlocked_layers: int = 0) -> None:
        """Freeze the vision model except its last `unlocked_layers` blocks (with the final norm and, for
        SigLIP, the pooling head); CLIP's projection stays trainable."""
        n = len(self.vision_model.encoder.layers)
        lock_layer_stack(self.vision_model.named_parameters(), "encoder.layers", n, unlocked_layers)
        self.locked = True

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        _set_hf_checkpointing(self.vision_model, enable)


@TEXT_TOWERS.register("hf_clip")
class HFDualTextTower(nn.Module):
    """transformers' CLIP/SigLIP text model (+ CLIP's `text_projection`).

    Shapes: text (B, L) ids, text_mask (B, L) or None -> (B, embed_dim), equal to the HF model's
    `get_text_features` on the rows its own tokenizer and pipeline would build.
    """

    def __init__(self, cfg: TextTowerConfig, embed_dim: int, tokenizer: Any) -> None:
        super().__init__()
        hf, family = hf_config(cfg.hf_name)
        text = hf.text_config
        _check_dim(cfg.hf_name, embed_dim, hf_embed_dim(hf, family))
        if tokenizer.vocab_size > text.vocab_size:
            raise UserError(
                f"tokenizer '{cfg.tokenizer}' has {tokenizer.vocab_size} tokens but '{cfg.hf_name}' has "
                f"{text.vocab_size}: use the folder's own tokenizer (model.text.tokenizer={cfg.hf_name})"
            )
        self.cfg = cfg
        self.pad_id = tokenizer.pad_id
        self.pad_to = int(text.max_position_embeddings) if family.pad_text_to_max else 0
        self.text_model = _transformers_cls(family.text_cls)._from_config(text, dtype=torch.float32)
        if family.projections:
            self.text_projection = nn.Linear(text.hidden_size, embed_dim, bias=False)
        self.locked = False

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.pad_to:  # SigLIP: fixed-length rows, last position pooled, no mask
            n = text.shape[1]
            if n < self.pad_to:
                text = nn.functional.pad(text, (0, self.pad_to - n), value=self.pad_id)
            pooled = self.text_model(input_ids=text[:, : self.pad_to]).pooler_output
            return pooled
        mask = text_mask if text_mask is not None else (text != self.pad_id).long()
        if not torch.compiler.is_compiling():  # causal: tokens after the longest row change nothing
            n = int(mask.sum(dim=1).max())
            text, mask = text[:, :n], mask[:, :n]
        pooled = self.text_model(input_ids=text, attention_mask=mask).pooler_output  # (B, W)
        return self.text_projection(pooled)

    def lock(self, unlocked_layers: int = 0) -> None:
        """Freeze the text model except its last `unlocked_layers` blocks (with the final norm and, for
        SigLIP, the head); CLIP's projection stays trainable."""
        n = len(self.text_model.encoder.layers)
        lock_layer_stack(self.text_model.named_parameters(), "encoder.layers", n, unlocked_layers)
        self.locked = True

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        _set_hf_checkpointing(self.text_model, enable)


def _set_hf_checkpointing(model: nn.Module, enable: bool) -> None:
    if enable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
