"""transformers interop, outward: an mmcl CLIP as a `transformers` folder (`mmcl export hf RUN OUT`).

Two kinds of mmcl model have a transformers equivalent:
- models with `hf_clip` towers (imported from a CLIPModel / SiglipModel folder): written back as that
  class by the prefix renaming of `mmcl.models.hf_compat`, with the source folder's tokenizer;
- native mmcl CLIPs whose image tower is a CLIP-layout timm ViT (the one `mmcl export open_clip` takes)
  and whose text tower is CLIP's causal transformer with CLIP's BPE: written as a `CLIPModel`:

    image.trunk.patch_embed.proj / cls_token / pos_embed   vision_model.embeddings.patch_embedding /
                                                             class_embedding (W) / position_embedding (N, W)
    image.trunk.norm_pre / norm                            vision_model.pre_layrnorm / post_layernorm
    image.trunk.blocks.i.norm1 / norm2 / attn.proj         vision_model.encoder.layers.i.layer_norm1 /
                                                             layer_norm2 / self_attn.out_proj
    image.trunk.blocks.i.attn.qkv (3W, W)                  ...self_attn.q_proj / k_proj / v_proj (W, W)
    image.trunk.blocks.i.mlp.fc1 / fc2                     ...mlp.fc1 / fc2
    image.proj.weight                                      visual_projection.weight
    text.token_embedding / positional_embedding            text_model.embeddings.token_embedding /
                                                             position_embedding
    text.transformer.resblocks.i.ln_1 / ln_2               text_model.encoder.layers.i.layer_norm1 / 2
      .attn.in_proj_* / .attn.out_proj / .mlp.c_fc / c_proj  ...q/k/v_proj, out_proj, mlp.fc1, mlp.fc2
    text.ln_final, text.text_projection (W, D)             text_model.final_layer_norm, text_projection (D, W)
    logit_scale (clamped at max_logit_scale)               logit_scale

A native model trained with SigLIP's loss keeps its bias out of the CLIPModel (softmax probabilities
over candidate labels do not depend on it). Anything else is refused with one line naming the part.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmcl.utils import UserError

_VISION_BLOCK = [("norm1.", "layer_norm1."), ("norm2.", "layer_norm2."), ("attn.proj.", "self_attn.out_proj."),
                 ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2.")]  # fmt: skip
_TEXT_BLOCK = [("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("attn.out_proj.", "self_attn.out_proj."),
               ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2.")]  # fmt: skip


_SIMPLE = {  # mmcl key -> (CLIPModel key, conversion)
    "image.trunk.patch_embed.proj.weight": ("vision_model.embeddings.patch_embedding.weight", lambda t: t),
    "image.trunk.cls_token": ("vision_model.embeddings.class_embedding", lambda t: t.reshape(-1)),
    "image.trunk.pos_embed": ("vision_model.embeddings.position_embedding.weight", lambda t: t[0]),
    "image.proj.weight": ("visual_projection.weight", lambda t: t),
    "text.token_embedding.weight": ("text_model.embeddings.token_embedding.weight", lambda t: t),
    "text.positional_embedding": ("text_model.embeddings.position_embedding.weight", lambda t: t),
    "text.text_projection": ("text_projection.weight", lambda t: t.T),
    "logit_scale": ("logit_scale", lambda t: t.reshape(())),
}


def clip_bpe_tokenizer(context_length: int = 77, **kwargs: Any) -> Any:
    """transformers' `CLIPTokenizer` built offline from open_clip's bundled CLIP BPE (same ids as mmcl's
    `ClipTokenizer`; open_clip names the two specials `<start_of_text>`/`<end_of_text>`, OpenAI and HF
    `<|startoftext|>`/`<|endoftext|>`). `kwargs` go to `CLIPTokenizer`."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(token, token): i for token, i in bpe.encoder.items()}
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length, **kwargs)


def _split_qkv(prefix: str, weight: torch.Tensor, bias: torch.Tensor | None, out: dict[str, torch.Tensor]) -> None:
    for name, w in zip(("q_proj", "k_proj", "v_proj"), weight.chunk(3)):
        out[f"{prefix}self_attn.{name}.weight"] = w.contiguous()
    if bias is not None:
        for name, b in zip(("q_proj", "k_proj", "v_proj"), bias.chunk(3)):
            out[f"{prefix}self_attn.{name}.bias"] = b.contiguous()


def native_to_hf(model: nn.Module) -> dict[str, torch.Tensor]:
    """A native mmcl CLIP's state dict in `CLIPModel` names (see the module docstring)."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    block = re.compile(r"(image\.trunk\.blocks|text\.transformer\.resblocks)\.(\d+)\.(.*)")
    for key, value in sd.items():
        if key.endswith(("attn.qkv.bias", "attn.in_proj_bias")):
            continue  # written with the weight
        m = block.fullmatch(key)
        if m:
            vision = m.group(1).startswith("image")
            prefix = f"{'vision' if vision else 'text'}_model.encoder.layers.{m.group(2)}."
            sub = m.group(3)
            if sub in ("attn.qkv.weight", "attn.in_proj_weight"):
                bias_key = key.replace("weight", "bias")
                _split_qkv(prefix, value, sd.get(bias_key), out)
                continue
            for a, b in _VISION_BLOCK if vision else _TEXT_BLOCK:
                if sub.startswith(a):
                    sub = b + sub[len(a) :]
                    break
            out[prefix + sub] = value
            continue
        if key in _SIMPLE:
            name, fn = _SIMPLE[key]
            out[name] = (value.clamp(max=model.max_log_scale) if key == "logit_scale" else fn(value)).contiguous()
        elif key == "logit_bias":
            continue  # no CLIPModel equivalent; softmax over candidates does not depend on it
        else:
            for a, b in (("image.trunk.norm_pre.", "vision_model.pre_layrnorm."),
                         ("image.trunk.norm.", "vision_model.post_layernorm."),
                         ("text.ln_final.", "text_model.final_layer_norm.")):  # fmt: skip
                if key.startswith(a):
                    out[b + key[len(a) :]] = value.contiguous()
                    break
            else:
                raise UserError(f"this model cannot be exported to transformers: no CLIPModel tensor for '{key}'")
    return out


def _native_hf_config(model: nn.Module) -> Any:
    from transformers import CLIPConfig

    trunk, tcfg = model.image.trunk, model.text.cfg
    width, heads = trunk.embed_dim, trunk.blocks[0].attn.num_heads
    tok = model.tokenizer
    return CLIPConfig(
        projection_dim=model.cfg.embed_dim,
        logit_scale_init_value=math.log(model.cfg.init_logit_scale),
        text_config={
            "vocab_size": tcfg.vocab_size, "hidden_size": tcfg.width, "num_attention_heads": tcfg.heads,
            "intermediate_size": int(tcfg.width * tcfg.mlp_ratio), "num_hidden_layers": tcfg.layers,
            "max_position_embeddings": tcfg.context_length, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
            "projection_dim": model.cfg.embed_dim, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
            "pad_token_id": tok.eos_id,
        },
        vision_config={
            "hidden_size": width, "num_attention_heads": heads, "num_hidden_layers": len(trunk.blocks),
            "intermediate_size": trunk.blocks[0].mlp.fc1.out_features, "image_size": int(trunk.patch_embed.img_size[0]),
            "patch_size": int(trunk.patch_embed.patch_size[0]), "hidden_act": "gelu", "layer_norm_eps": 1e-5,
            "projection_dim": model.cfg.embed_dim,
        },
    )  # fmt: skip


def _native_parts(model: nn.Module) -> tuple[Any, Any, Any]:
    """(CLIPModel, tokenizer, image processor) for a native mmcl CLIP; one-line error naming a part without
    a transformers equivalent."""
    from transformers import CLIPModel

    from mmcl.data.text import ClipTokenizer
    from mmcl.models.openclip_compat import _check_exportable

    try:
        _check_exportable(model)  # the same layout open_clip needs: CLIP ViT, causal EOS text tower, CLIP BPE
    except UserError as e:
        detail = str(e).split(": ", 1)[-1]
        raise UserError(f"no transformers CLIPModel equivalent: {detail}") from None
    if not isinstance(model.tokenizer, ClipTokenizer):
        raise UserError("no transformers CLIPModel equivalent: the tokenizer is not CLIP's BPE")
    hf = CLIPModel(_native_hf_config(model)).eval()
    try:
        hf.load_state_dict(native_to_hf(model), strict=True)
    except RuntimeError as e:
        raise UserError(f"the converted weights do not load into CLIPModel: {str(e).splitlines()[0]}") from None
    return hf, clip_bpe_tokenizer(model.text.cfg.context_length), image_processor(model.preprocess_cfg())


_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}  # PIL.Image.Resampling, as transformers saves it


def image_processor(pre: dict[str, Any], siglip: bool = False) -> Any:
    """The transformers image processor doing what mmcl's `preprocess_cfg()` does: 'shortest' = resize the
    shorter side + centre crop (`CLIPImageProcessor`), 'squash' = resize to a square, no crop
    (`SiglipImageProcessor` for SigLIP models, as their source ships; `CLIPImageProcessor` otherwise)."""
    import transformers

    size, resize = int(pre["image_size"]), int(pre.get("resize_size") or pre["image_size"])
    common = {"resample": _RESAMPLE[pre.get("interpolation", "bicubic")], "image_mean": list(pre["mean"]),
              "image_std": list(pre["std"])}  # fmt: skip
    crop = {"do_center_crop": True, "crop_size": {"height": size, "width": size}}
    if pre.get("resize_mode", "shortest") == "shortest":
        return transformers.CLIPImageProcessor(size={"shortest_edge": resize}, **crop, **common)
    if siglip and resize == size:
        return transformers.SiglipImageProcessor(size={"height": size, "width": size}, **common)
    if resize == size:
        crop = {"do_center_crop": False}
    return transformers.CLIPImageProcessor(size={"height": resize, "width": resize}, **crop, **common)


def _hf_tower_parts(model: nn.Module) -> tuple[Any, Any, Any]:
    """(CLIPModel or SiglipModel, tokenizer, image processor) for a model with `hf_clip` towers."""
    import transformers

    from mmcl.models.hf_compat import mmcl_to_hf
    from mmcl.models.hf_towers import HFDualTextTower, hf_config

    if not isinstance(model.text, HFDualTextTower):
        raise UserError(f"no transformers equivalent: the text tower is {type(model.text).__name__}, not hf_clip")
    source = model.image.cfg.hf_name
    if model.text.cfg.hf_name != source:
        raise UserError("no transformers equivalent: the image and text towers come from different folders")
    cfg, family = hf_config(source)
    hf = getattr(transformers, family.model_cls)(cfg).eval()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    try:
        hf.load_state_dict(mmcl_to_hf(state, siglip=not family.projections), strict=True)
    except RuntimeError as e:
        raise UserError(f"the weights do not load into {family.model_cls}: {str(e).splitlines()[0]}") from None
    tokenizer = transformers.AutoTokenizer.from_pretrained(model.text.cfg.tokenizer or source)
    return hf, tokenizer, image_processor(model.preprocess_cfg(), siglip=not family.projections)


def export_hf(model: nn.Module, out_dir: str | Path) -> Path:
    """Write `model` as a transformers folder (model, tokenizer, image processor) in `out_dir`."""
    from mmcl.models.clip import CLIP
    from mmcl.models.hf_towers import HFVisionTower

    if not isinstance(model, CLIP):
        raise UserError(f"no transformers equivalent: only CLIP-style dual encoders export, not {type(model).__name__}")
    model = model.cpu().float().eval()
    parts = _hf_tower_parts(model) if isinstance(model.image, HFVisionTower) else _native_parts(model)
    hf, tokenizer, processor = parts
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
