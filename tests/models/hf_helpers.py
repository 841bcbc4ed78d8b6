"""Tiny random transformers CLIPModel / SiglipModel folders, written offline (tests and the README guide).

python tests/models/hf_helpers.py OUT [clip|siglip]   # writes OUT with save_pretrained
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def write_tiny_hf(out: str | Path, family: str = "clip", seed: int = 0) -> Path:
    """A random 32 px CLIPModel or SiglipModel (width 32, 2 layers) + CLIP BPE tokenizer + image processor."""
    import transformers

    from mmcl.models.hf_export import clip_bpe_tokenizer

    torch.manual_seed(seed)
    out = Path(out)
    text = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 64 if family == "siglip" else 32}  # fmt: skip
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}  # fmt: skip
    # SigLIP's own tokenizer returns no mask (its text model pools the last, padded, position)
    extra = {"model_input_names": ["input_ids"]} if family == "siglip" else {}
    tokenizer = clip_bpe_tokenizer(text["max_position_embeddings"], **extra)
    if family == "clip":
        text.update(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
        cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
        model = transformers.CLIPModel(cfg)
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        text.update(projection_size=32, pad_token_id=49407, eos_token_id=49407)
        cfg = transformers.SiglipConfig(text_config=text, vision_config=vision)
        model = transformers.SiglipModel(cfg)
        with torch.no_grad():  # SiglipModel draws them from randn
            model.logit_scale.fill_(2.3)
            model.logit_bias.fill_(-3.0)
        processor = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    return out


if __name__ == "__main__":
    print(write_tiny_hf(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "clip"))
