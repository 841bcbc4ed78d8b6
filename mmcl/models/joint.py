"""Joint model: CLIP dual encoder + SimVLM PrefixLM captioner on ONE shared image tower.

One forward pass of the image tower serves both objectives: its pooled output goes
through the CLIP projection (contrastive: zero-shot, retrieval) and its token
features, projected to d_model, are the image tokens of the PrefixLM encoder
(captioning, prefix completion). This is the CoCa idea (Yu et al. 2022, "CoCa:
Contrastive Captioners are Image-Text Foundation Models") with SimVLM's
bidirectional-prefix encoder-decoder as the captioner instead of CoCa's
unimodal/multimodal decoder split.

The CLIP text tower and the T5 decoder share the tokenizer (`model.text.tokenizer`),
so the decoder's vocabulary is the text tower's. `decoder.image_stem` is unused
here: the captioner reads the shared tower.

    feats  = tower.forward_features(images)         (B, N, C) or (B, C, h, w)
    x      = normalize(proj(forward_head(feats)))   (B, D)            as CLIP.encode_image
    tokens = TowerTokens(feats)                     (B, N, d_model)   PrefixLM image tokens
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmcl.config import ModelConfig
from mmcl.models.clip import CLIP
from mmcl.models.image_stem import TowerTokens
from mmcl.models.prefix_lm import PrefixLM
from mmcl.registry import MODELS
from mmcl.utils import UserError


class JointModel(CLIP):
    """A `CLIP` (towers, logit_scale, encode_image/encode_text, preprocess_cfg) plus `lm`, a
    `PrefixLM` whose image tokens come from the CLIP image tower, and `caption()`.

    Being a CLIP subclass, it serves everything written for dual encoders (zero-shot, retrieval,
    open_clip export of the towers) unchanged.
    """

    default_terms = ("clip", "caption")  # the loss terms when loss.terms is empty
    can_caption = True  # and embeddings, as CLIP (`mmcl.inference.Encoder`)

    def __init__(self, cfg: ModelConfig, split_seed: int = 0) -> None:
        super().__init__(cfg)
        width = self.image.trunk.num_features
        d_model = cfg.decoder.d_model  # a from-scratch T5's width; a hf_name decoder fixes its own
        self.lm = PrefixLM(cfg, tokenizer=self.tokenizer, image_stem=TowerTokens(width, d_model), split_seed=split_seed)
        if self.lm.d_model != d_model:  # hf_name decoder: rebuild the adapter at the decoder's width
            self.lm.image_stem = TowerTokens(width, self.lm.d_model)
        self.train()

    def image_features_and_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of the shared tower: unnormalised CLIP image features (B, D), PrefixLM tokens (B, N, d_model)."""
        trunk = self.image.trunk
        feats = trunk.forward_features(images)
        pooled = trunk.forward_head(feats, pre_logits=True)  # == trunk(images) for num_classes=0
        return self.image.proj(pooled), self.lm.image_stem(feats)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the captioner's image tokens (B, N, d_model)."""
        return self.lm.image_stem(self.image.trunk.forward_features(images))

    def forward(
        self,
        images: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        prefix_ids: torch.Tensor | None = None,
        prefix_mask: torch.Tensor | None = None,
        lm_labels: torch.Tensor | None = None,
        text_only: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Contrastive features and, when the caption splits are given, PrefixLM logits.

        Returns:
            {'image_features' (B, D), 'text_features' (B, D) when `text` is given, 'logit_scale' (),
            'logit_bias' () for SigLIP} + {'logits' (B, T, V), 'labels' (B, T), 'prefix_len' (B,)}
            when `lm_labels` is given (see `PrefixLM.forward`).
        """
        scale, bias = self.scale_and_bias()
        # Order matters for exact dropout replay in gradient accumulation: image tower, text tower,
        # then the decoder, as in a contrastive-only pass.
        image_features, tokens = self.image_features_and_tokens(images)
        out = {"image_features": F.normalize(image_features, dim=-1), "logit_scale": scale}
        if text is not None:
            out["text_features"] = self.encode_text(text, text_mask)
        if bias is not None:
            out["logit_bias"] = bias
        if lm_labels is not None:
            out.update(self.lm(None, prefix_ids, prefix_mask, lm_labels, text_only, image_tokens=tokens))
        return out

    @torch.no_grad()
    def caption(self, images: torch.Tensor, prefix: str | list[str] | None = None, **generate_kwargs) -> list[str]:
        """Caption images (or complete prefixes); keyword arguments as in `PrefixLM.caption`."""
        if images is None:
            raise UserError("the joint model captions images: caption() got none")
        was_training = self.training
        self.eval()
        try:
            tokens = self.image_tokens(images.to(self.lm.device))
            return self.lm.caption(None, prefix, image_tokens=tokens, **generate_kwargs)
        finally:
            self.train(was_training)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.lm.set_grad_checkpointing(enable)


@MODELS.register("joint")
def build_joint(cfg: ModelConfig) -> JointModel:
    return JointModel(cfg)
