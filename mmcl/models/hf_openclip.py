"""transformers CLIPModel -> open_clip CLIP: the export of an mmcl run with `hf_clip` towers (`mmcl export open_clip`).

open_clip's native CLIP is OpenAI's layout, which transformers' `CLIPModel` renames (open_clip's
`convert.py` and transformers' `convert_clip_original_pytorch_to_hf.py` read the other way):

    vision_model.embeddings.patch_embedding      visual.conv1
    vision_model.embeddings.class_embedding      visual.class_embedding
    vision_model.embeddings.position_embedding   visual.positional_embedding (N, W)
    vision_model.pre_layrnorm / post_layernorm   visual.ln_pre / ln_post
    *.encoder.layers.i.layer_norm1 / 2           *.transformer.resblocks.i.ln_1 / ln_2
    *.self_attn.q_proj / k_proj / v_proj         *.attn.in_proj_weight / bias (concatenated, (3W, W))
    *.self_attn.out_proj / mlp.fc1 / mlp.fc2     *.attn.out_proj / mlp.c_fc / mlp.c_proj
    visual_projection.weight (D, W)              visual.proj (W, D)
    text_model.embeddings.token_embedding        token_embedding
    text_model.embeddings.position_embedding     positional_embedding (L, W)
    text_model.final_layer_norm                  ln_final
    text_projection.weight (D, W)                text_projection (W, D)

It holds when the text model pools the EOS token that is also the largest id (CLIP's BPE, whose EOS is
49407: open_clip pools the argmax id) and both towers use one activation (quick_gelu or gelu) and
LayerNorm eps 1e-5. SigLIP (no open_clip equivalent of transformers' SiglipModel) is refused in one line.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from mmcl.utils import UserError

_LAYER = [("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("self_attn.out_proj.", "attn.out_proj."),
          ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj.")]  # fmt: skip
_SIMPLE = {
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "logit_scale": "logit_scale",
    "logit_bias": "logit_bias",  # a CLIP fine-tuned with SigLIP's loss (open_clip's init_logit_bias)
}
_PREFIXES = [("vision_model.pre_layrnorm.", "visual.ln_pre."), ("vision_model.post_layernorm.", "visual.ln_post."),
             ("text_model.final_layer_norm.", "ln_final.")]  # fmt: skip
_CHECK_TEXT = "a photo of 2 red circles, left of a Blue square!"


def open_clip_config_from_hf(model: nn.Module) -> dict[str, Any]:
    """open_clip's model config of an mmcl CLIP with `hf_clip` towers from a transformers CLIPModel;
    a one-line error naming the part without an open_clip equivalent."""
    from mmcl.models.hf_towers import hf_config

    cfg, family = hf_config(model.image.cfg.hf_name)
    if not family.projections:
        raise UserError(
            f"no open_clip equivalent: the towers are a transformers {family.model_cls} (open_clip's SigLIP models "
            "are timm + custom text towers); export it with `mmcl export hf` instead"
        )
    vision, text = cfg.vision_config, cfg.text_config
    acts = {vision.hidden_act, text.hidden_act}
    if not acts <= {"quick_gelu", "gelu"} or len(acts) != 1:
        raise UserError(f"no open_clip equivalent: activations {sorted(acts)} (open_clip: one of quick_gelu, gelu)")
    if {vision.layer_norm_eps, text.layer_norm_eps} != {1e-5}:
        raise UserError("no open_clip equivalent: LayerNorm eps is not 1e-5")
    _check_tokenizer(model, int(text.max_position_embeddings))
    return {
        "embed_dim": int(cfg.projection_dim),
        "quick_gelu": acts == {"quick_gelu"},
        "vision_cfg": {
            "image_size": int(vision.image_size),
            "patch_size": int(vision.patch_size),
            "width": int(vision.hidden_size),
            "layers": int(vision.num_hidden_layers),
            "head_width": int(vision.hidden_size) // int(vision.num_attention_heads),
            "mlp_ratio": vision.intermediate_size / vision.hidden_size,
        },
        "text_cfg": {
            "context_length": int(text.max_position_embeddings),
            "vocab_size": int(text.vocab_size),
            "width": int(text.hidden_size),
            "heads": int(text.num_attention_heads),
            "layers": int(text.num_hidden_layers),
            "mlp_ratio": text.intermediate_size / text.hidden_size,
        },
    }


def _check_tokenizer(model: nn.Module, context_length: int) -> None:
    """open_clip's default tokenizer is CLIP's BPE: the model's own must give the same ids."""
    import open_clip

    ours, mask = model.tokenizer([_CHECK_TEXT])
    theirs = open_clip.tokenize([_CHECK_TEXT], context_length=context_length)
    n = int(mask[0].sum())
    if ours.shape[1] < n or not torch.equal(ours[0, :n], theirs[0, :n]) or int(ours[0, :n].max()) != 49407:
        raise UserError(
            "no open_clip equivalent: the tokenizer is not CLIP's BPE with EOS 49407 (open_clip pools the largest id)"
        )


def hf_to_open_clip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPModel state dict in open_clip's native CLIP names (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    layer = re.compile(r"(vision|text)_model\.encoder\.layers\.(\d+)\.(.*)")
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            continue
        m = layer.fullmatch(key)
        if m:
            prefix = f"{'visual.' if m.group(1) == 'vision' else ''}transformer.resblocks.{m.group(2)}."
            sub = m.group(3)
            if sub.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
                if sub.startswith("self_attn.q_proj."):
                    kind = sub.rsplit(".", 1)[1]  # weight / bias
                    parts = [state_dict[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
                    out[f"{prefix}attn.in_proj_{kind}"] = torch.cat(parts).contiguous()
                continue
            for a, b in _LAYER:
                if sub.startswith(a):
                    out[prefix + b + sub[len(a) :]] = value.contiguous()
                    break
            else:
                raise UserError(f"no open_clip equivalent of the transformers tensor '{key}'")
            continue
        if key in _SIMPLE:
            out[_SIMPLE[key]] = value.reshape(()) if key.startswith("logit_") else value.contiguous()
        elif key in ("visual_projection.weight", "text_projection.weight"):
            out["visual.proj" if key.startswith("visual") else "text_projection"] = value.T.contiguous()
        else:
            for a, b in _PREFIXES:
                if key.startswith(a):
                    out[b + key[len(a) :]] = value.contiguous()
                    break
            else:
                raise UserError(f"no open_clip equivalent of the transformers tensor '{key}'")
    return out


def hf_tower_open_clip_weights(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(open_clip model config, open_clip state dict) of an mmcl CLIP with transformers CLIP towers."""
    from mmcl.models.hf_compat import mmcl_to_hf

    config = open_clip_config_from_hf(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if "logit_bias" in state:
        config["init_logit_bias"] = float(state["logit_bias"])
    return config, hf_to_open_clip(mmcl_to_hf(state, siglip=False))
