"""open_clip interop: its model configs, checkpoints in, checkpoints out.

open_clip's native ViT-CLIP is timm's CLIP-layout ViT (pre-norm, class token, final norm) plus a
projection, and mmcl's `ClipTextTower` keeps open_clip's text parameter names, so the conversion is a
renaming of the vision keys (as timm's `_convert_openai_clip`) and a transpose of the projection:

    visual.conv1.weight                        image.trunk.patch_embed.proj.weight
    visual.class_embedding (W)                 image.trunk.cls_token (1, 1, W)
    visual.positional_embedding (N, W)         image.trunk.pos_embed (1, N, W)
    visual.ln_pre / ln_post                    image.trunk.norm_pre / norm
    visual.transformer.resblocks.i.ln_1/ln_2   image.trunk.blocks.i.norm1/norm2
      .attn.in_proj_* / .attn.out_proj         .attn.qkv.* / .attn.proj
      .mlp.c_fc / .mlp.c_proj                  .mlp.fc1 / .mlp.fc2
    visual.proj (W, D)                         image.proj.weight (D, W)
    token_embedding, positional_embedding,     text.<same name>   (CustomTextCLIP: text.<name> already)
      transformer.*, ln_final, text_projection
    logit_scale, logit_bias                    logit_scale, logit_bias

Supported: native open_clip ViT configs with GELU (not `quick_gelu`), standard pooling, no layer scale
/ attentional pooler / HF or timm towers; anything else is refused with the reason. Runs whose towers came
from a transformers CLIPModel export through `mmcl.models.hf_openclip`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmcl.config import ImageTowerConfig, ModelConfig, TextTowerConfig
from mmcl.utils import UserError, atomic_write_bytes, atomic_write_text

_BLOCK_SWAPS = [  # (open_clip, timm) inside a vision block
    ("ln_1.", "norm1."),
    ("ln_2.", "norm2."),
    ("attn.in_proj_weight", "attn.qkv.weight"),
    ("attn.in_proj_bias", "attn.qkv.bias"),
    ("attn.out_proj.", "attn.proj."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
]
_TOP_SWAPS = [("conv1.", "patch_embed.proj."), ("ln_pre.", "norm_pre."), ("ln_post.", "norm.")]

# open_clip config keys whose value must stay at the default for the conversion to be exact
_VISION_DEFAULTS: dict[str, Any] = {
    "ls_init_value": None, "attentional_pool": False, "no_ln_pre": False, "pos_embed_type": "learnable",
    "final_ln_after_pool": False, "pool_type": "tok", "act_kwargs": None, "norm_kwargs": None,
    "block_type": None, "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
    "scale_attn_inner": False, "scale_attn": False, "scale_fc": False, "timm_model_name": None,
}  # fmt: skip
_TEXT_DEFAULTS: dict[str, Any] = {
    "hf_model_name": None, "hf_tokenizer_name": None, "tokenizer_mode": None, "tokenizer_kwargs": None,
    "ls_init_value": None, "embed_cls": False, "pad_id": 0, "no_causal_mask": False,
    "final_ln_after_pool": False, "proj_bias": False, "proj_type": "linear", "act_kwargs": None,
    "norm_kwargs": None, "block_type": None, "qk_norm": False, "scaled_cosine_attn": False,
    "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
}  # fmt: skip
_IGNORED = {"output_tokens", "eos_id", "attn_pooler_queries", "attn_pooler_heads", "timm_model_pretrained",
            "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path", "hf_model_pretrained",
            "hf_proj_type", "hf_pooler_type"}  # fmt: skip
_TOP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "cast_dtype", "custom_text", "init_logit_scale",
             "init_logit_bias", "nonscalar_logit_scale", "output_dict"}  # fmt: skip
_TIMM_CLIP_VIT = "vit_base_patch32_clip_224"  # CLIP layout; sizes come from timm_kwargs


def _check_defaults(cfg: dict[str, Any], defaults: dict[str, Any], known: set[str], where: str) -> None:
    bad = []
    for key, value in cfg.items():
        if key in defaults:
            if value is not None and value != defaults[key] and not (key == "block_type" and value == "default"):
                bad.append(f"{key}={value!r}")
        elif key not in known and key not in _IGNORED:
            bad.append(f"{key} (unknown key)")
    if bad:
        raise UserError(f"open_clip {where} settings not supported by mmcl: {', '.join(bad)}")


def _preprocess_from_open_clip(pre: dict[str, Any]) -> dict[str, Any]:
    """mmcl's `model.image.preprocess` of an open_clip `preprocess_cfg` (size, mean, std, interpolation,
    resize_mode); 'longest' (letterbox padding) has no mmcl equivalent."""
    out: dict[str, Any] = {}
    mode = pre.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise UserError(f"open_clip preprocess_cfg resize_mode '{mode}' is not supported (shortest, squash)")
    if "resize_mode" in pre:
        out["resize_mode"] = mode
    if pre.get("interpolation"):
        if pre["interpolation"] not in ("bicubic", "bilinear", "nearest"):
            raise UserError(f"open_clip preprocess_cfg interpolation '{pre['interpolation']}' is not supported")
        out["interpolation"] = pre["interpolation"]
    for key in ("mean", "std"):
        if key in pre:
            out[key] = [float(v) for v in pre[key]]
    return out


def model_config_from_open_clip(cfg_json: dict[str, Any] | str | Path) -> ModelConfig:
    """An mmcl ModelConfig with the architecture of an open_clip model config (dict or JSON file;
    `open_clip_config.json` files with a `model_cfg` entry work too)."""
    if isinstance(cfg_json, (str, Path)):
        path = Path(cfg_json)
        try:
            cfg_json = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: cannot read the open_clip config ({e})") from None
    preprocess = _preprocess_from_open_clip(cfg_json.get("preprocess_cfg") or {})
    cfg = dict(cfg_json.get("model_cfg", cfg_json))
    if cfg.get("quick_gelu"):
        raise UserError("open_clip quick_gelu models are not supported (mmcl towers use exact GELU)")
    _check_defaults(cfg, {"quick_gelu": False, "multimodal_cfg": None}, _TOP_KEYS, "model")
    try:
        vision, text = dict(cfg["vision_cfg"]), dict(cfg["text_cfg"])
        embed_dim = int(cfg["embed_dim"])
    except KeyError as e:
        raise UserError(f"not an open_clip model config: missing {e}") from None
    _check_defaults(vision, _VISION_DEFAULTS, {"layers", "width", "head_width", "mlp_ratio", "patch_size",
                                               "image_size", "patch_dropout"}, "vision_cfg")  # fmt: skip
    _check_defaults(text, _TEXT_DEFAULTS, {"context_length", "vocab_size", "width", "heads", "layers",
                                           "mlp_ratio", "pool_type"}, "text_cfg")  # fmt: skip
    if not isinstance(vision.get("layers", 12), int):
        raise UserError("open_clip ModifiedResNet image towers (vision_cfg.layers is a list) are not supported")
    if text.get("pool_type", "argmax") not in ("argmax", "eos"):
        raise UserError(f"open_clip text pool_type '{text['pool_type']}' is not supported (argmax/eos only)")
    image_size = vision.get("image_size", 224)
    if not isinstance(image_size, int):
        if len(set(image_size)) != 1:
            raise UserError(f"non-square image_size {image_size} is not supported")
        image_size = image_size[0]
    width = vision.get("width", 768)
    timm_kwargs: dict[str, Any] = {
        "patch_size": vision.get("patch_size", 16),
        "embed_dim": width,
        "depth": vision.get("layers", 12),
        "num_heads": width // vision.get("head_width", 64),
        "mlp_ratio": float(vision.get("mlp_ratio", 4.0)),
    }
    if vision.get("patch_dropout"):
        timm_kwargs["patch_drop_rate"] = float(vision["patch_dropout"])  # training only; keeps the class token
    return ModelConfig(
        arch="clip",
        embed_dim=embed_dim,
        image=ImageTowerConfig(
            timm_name=_TIMM_CLIP_VIT, timm_kwargs=timm_kwargs, image_size=image_size, preprocess=preprocess
        ),
        text=TextTowerConfig(
            kind="clip",
            tokenizer="clip",
            pooling="eos",
            context_length=text.get("context_length", 77),
            vocab_size=text.get("vocab_size", 49408),
            width=text.get("width", 512),
            heads=text.get("heads", 8),
            layers=text.get("layers", 12),
            mlp_ratio=float(text.get("mlp_ratio", 4.0)),
        ),
        init_logit_scale=math.exp(cfg["init_logit_scale"]) if "init_logit_scale" in cfg else 1 / 0.07,
        init_logit_bias=cfg.get("init_logit_bias"),
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from mmcl.models.weights_file import read_weights

    return read_weights(path)  # one line for a hostile or broken file, never "try weights_only=False"


def open_clip_to_mmcl(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an open_clip state dict (CLIP or CustomTextCLIP layout) to mmcl's CLIP keys."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]  # open_clip training checkpoint
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")  # saved from DDP
        if key == "attn_mask":
            continue
        if key.startswith("visual."):
            sub = key[len("visual.") :]
            if sub == "proj":
                out["image.proj.weight"] = value.T.contiguous()
                continue
            if sub == "class_embedding":
                out["image.trunk.cls_token"] = value.reshape(1, 1, -1)
                continue
            if sub == "positional_embedding":
                out["image.trunk.pos_embed"] = value.unsqueeze(0)
                continue
            if sub.startswith("transformer.resblocks."):
                sub = "blocks." + sub[len("transformer.resblocks.") :]
                for a, b in _BLOCK_SWAPS:
                    sub = sub.replace(a, b)
            for a, b in _TOP_SWAPS:
                if sub.startswith(a):
                    sub = b + sub[len(a) :]
            out["image.trunk." + sub] = value
        elif key in ("logit_scale", "logit_bias"):
            out[key] = value.reshape(())
        else:
            out[key if key.startswith("text.") else "text." + key] = value
    return out


def mmcl_to_open_clip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an mmcl CLIP state dict to open_clip's native CLIP keys (inverse of `open_clip_to_mmcl`)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == "image.proj.weight":
            out["visual.proj"] = value.T.contiguous()
        elif key == "image.trunk.cls_token":
            out["visual.class_embedding"] = value.reshape(-1).contiguous()
        elif key == "image.trunk.pos_embed":
            out["visual.positional_embedding"] = value[0].contiguous()
        elif key.startswith("image.trunk."):
            sub = key[len("image.trunk.") :]
            if sub.startswith("blocks."):
                sub = "transformer.resblocks." + sub[len("blocks.") :]
                for a, b in _BLOCK_SWAPS:
                    sub = sub.replace(b, a)
            for a, b in _TOP_SWAPS:
                if sub.startswith(b):
                    sub = a + sub[len(b) :]
            out["visual." + sub] = value.contiguous()
        elif key.startswith("text."):
            out[key[len("text.") :]] = value.contiguous()
        else:
            out[key] = value.contiguous()
    return out


def load_open_clip_state_dict(model: nn.Module, state_dict_or_path: dict[str, torch.Tensor] | str | Path) -> None:
    """Load open_clip weights (a state dict, a `.pt`/`.pth`/`.bin` file or a `.safetensors` file) into an
    mmcl CLIP built with `model_config_from_open_clip` of the same config."""
    where = "open_clip state dict"
    if isinstance(state_dict_or_path, (str, Path)):
        where = str(state_dict_or_path)
        state_dict_or_path = _read_state_dict(Path(state_dict_or_path))
    converted = open_clip_to_mmcl(state_dict_or_path)
    if getattr(model, "logit_bias", None) is not None and "logit_bias" not in converted:
        converted["logit_bias"] = torch.zeros(())  # a CLIP checkpoint fine-tuned as SigLIP (as open_clip does)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong = [f"{k} {tuple(converted[k].shape)} vs {tuple(expected[k].shape)}"
             for k in set(expected) & set(converted) if converted[k].shape != expected[k].shape]  # fmt: skip
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong))
            if keys
        )
        raise UserError(f"{where} does not match the model's architecture ({detail})")
    model.load_state_dict(converted, strict=True)


def _check_exportable(model: nn.Module) -> None:
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer import VisionTransformer

    from mmcl.data.text import ClipTokenizer
    from mmcl.models.clip import CLIP
    from mmcl.models.text_towers import ClipTextTower

    if not isinstance(model, CLIP):
        raise UserError(f"only CLIP models export to open_clip, not {type(model).__name__}")
    if hasattr(model, "lm"):
        raise UserError(
            "this model cannot be exported to open_clip: its captioning decoder (lm.*, a joint model) has no "
            "open_clip CLIP equivalent"
        )
    trunk = getattr(model.image, "trunk", None)
    if trunk is None:
        raise UserError(f"this model cannot be exported to open_clip: the image tower is {type(model.image).__name__}")
    reasons = []
    if not isinstance(trunk, VisionTransformer):
        reasons.append(f"the image tower is {type(trunk).__name__}, not a ViT")
    else:
        if not isinstance(trunk.patch_embed, PatchEmbed):  # a hybrid tower's conv stem (timm HybridEmbed)
            reasons.append("the ViT embeds patches with a conv stem; open_clip's ViT has a linear patch embedding")
        block = trunk.blocks[0]
        act = getattr(block.mlp, "act", None)
        if not (isinstance(act, nn.GELU) and act.approximate == "none"):
            reasons.append(f"ViT activation {act} is not exact GELU")
        if trunk.global_pool != "token" or not trunk.has_class_token or trunk.num_reg_tokens or trunk.no_embed_class:
            reasons.append("the ViT does not pool a class token (CLIP layout)")
        if isinstance(trunk.norm_pre, nn.Identity) or not isinstance(trunk.fc_norm, nn.Identity):
            reasons.append("the ViT is not pre-norm with a final norm (CLIP layout)")
        if any(isinstance(m, nn.LayerNorm) and m.eps != 1e-5 for m in trunk.modules()):
            reasons.append("LayerNorm eps is not 1e-5")
    if not isinstance(model.text, ClipTextTower) or model.text.pooling != "eos":
        reasons.append("the text tower is not CLIP's transformer with EOS pooling")
    if not isinstance(model.tokenizer, ClipTokenizer):
        reasons.append("the tokenizer is not CLIP's BPE")
    if reasons:
        raise UserError("this model cannot be exported to open_clip: " + "; ".join(reasons))


def open_clip_model_config(model: nn.Module) -> dict[str, Any]:
    """The open_clip model config (JSON-able dict) of an exportable mmcl CLIP."""
    _check_exportable(model)
    trunk, tcfg = model.image.trunk, model.text.cfg
    width = trunk.embed_dim
    heads = trunk.blocks[0].attn.num_heads
    cfg: dict[str, Any] = {
        "embed_dim": model.cfg.embed_dim,
        "vision_cfg": {
            "image_size": int(trunk.patch_embed.img_size[0]),
            "patch_size": int(trunk.patch_embed.patch_size[0]),
            "width": width,
            "layers": len(trunk.blocks),
            "head_width": width // heads,
            "mlp_ratio": trunk.blocks[0].mlp.fc1.out_features / width,
        },
        "text_cfg": {
            "context_length": tcfg.context_length,
            "vocab_size": tcfg.vocab_size,
            "width": tcfg.width,
            "heads": tcfg.heads,
            "layers": tcfg.layers,
            "mlp_ratio": tcfg.mlp_ratio,
        },
    }
    if model.logit_bias is not None:
        cfg["init_logit_bias"] = float(model.logit_bias.detach())
    return cfg


def export_open_clip(model: nn.Module, out_dir: str | Path, name: str | None = None) -> tuple[Path, Path]:
    """Write an mmcl CLIP as an open_clip model; returns (model config JSON, weights).

    `out_dir` receives `open_clip_model.safetensors`, `open_clip_config.json` (model + preprocessing,
    for `open_clip.create_model_and_transforms("local-dir:OUT")`) and `NAME.json` (the bare model
    config, for `open_clip.add_model_config("OUT/NAME.json"); open_clip.create_model("NAME",
    pretrained="OUT/open_clip_model.safetensors")`). NAME defaults to the folder's name. The weights
    are checked to load strictly into open_clip's CLIP before anything is written.
    """
    from open_clip.model import CLIP as OpenClipCLIP
    from safetensors.torch import save

    from mmcl.models.hf_towers import HFVisionTower

    out_dir = Path(out_dir)
    name = name or re.sub(r"[^A-Za-z0-9_.-]+", "-", out_dir.resolve().name) or "mmcl-clip"
    if isinstance(model.image, HFVisionTower) and not hasattr(model, "lm"):  # towers from a transformers CLIPModel
        from mmcl.models.hf_openclip import hf_tower_open_clip_weights

        model_cfg, weights = hf_tower_open_clip_weights(model)
    else:
        model_cfg = open_clip_model_config(model)
        weights = mmcl_to_open_clip({k: v.detach().cpu() for k, v in model.state_dict().items()})
    try:
        OpenClipCLIP(**model_cfg).load_state_dict(weights, strict=True)
    except RuntimeError as e:  # torch's message spans lines: keep all of it on one
        detail = " ".join(str(e).split())
        raise UserError(f"the converted weights do not load into open_clip: {detail}") from None
    pre = model.preprocess_cfg()
    if pre["resize_size"] and pre["resize_size"] != pre["image_size"]:
        raise UserError(
            f"open_clip's preprocessing cannot resize to {pre['resize_size']} px before a {pre['image_size']} px crop"
        )
    preprocess = {"size": pre["image_size"], "mean": list(pre["mean"]), "std": list(pre["std"]),
                  "interpolation": pre["interpolation"], "resize_mode": pre["resize_mode"]}  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = out_dir / "open_clip_model.safetensors"
    config_path = out_dir / f"{name}.json"
    atomic_write_bytes(weights_path, save(weights, metadata={"format": "pt", "exported_by": "mmcl"}))
    atomic_write_text(out_dir / "open_clip_config.json",
                      json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2))  # fmt: skip
    atomic_write_text(config_path, json.dumps(model_cfg, indent=2))
    return config_path, weights_path
