"""The image tower of the dual encoder and the builders of both towers (text towers: `mmcl.models.text_towers`).

- `ImageTower`: any timm model (`timm.create_model(name, num_classes=0)`) + a linear projection.
  CLIP's ViTs are timm's `vit_*_clip_*` models (pre-norm, class token, final norm), sized by
  `timm_kwargs`; timm's attention uses fused `F.scaled_dot_product_attention`. Maps images to
  (B, embed_dim) unnormalised features, or per-token features with `forward_tokens`.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmcl.config import ImageTowerConfig, TextTowerConfig
from mmcl.data.text import Tokenizer
from mmcl.models.lock import lock_timm
from mmcl.registry import IMAGE_TOWERS, TEXT_TOWERS
from mmcl.utils import UserError

log = logging.getLogger("mmcl.models")


def _create_timm(cfg: ImageTowerConfig, num_classes: int | None) -> nn.Module:
    import timm

    kwargs = dict(cfg.timm_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if cfg.patch_dropout:
        kwargs["patch_drop_rate"] = cfg.patch_dropout  # FLIP: timm's ViTs drop patches in training only
    try:
        try:
            return timm.create_model(cfg.timm_name, pretrained=cfg.pretrained, **{"img_size": cfg.image_size, **kwargs})
        except TypeError as e:
            if "img_size" not in str(e):
                raise
            return timm.create_model(cfg.timm_name, pretrained=cfg.pretrained, **kwargs)  # CNNs take any size
    except TypeError as e:
        if "patch_drop_rate" in str(e):
            raise UserError(f"model.image.patch_dropout needs a ViT; {cfg.timm_name} has no patch tokens") from None
        raise
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise UserError(f"model.image.timm_name: {e}") from None
        raise


def _class_token_shortcut_ok(trunk: nn.Module) -> bool:
    """Whether `trunk` is a plain timm ViT pooling its class token (the CLIP layout), whose last block
    can be computed for the class token alone."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    return (
        type(trunk) is VisionTransformer
        and trunk.global_pool == "token"
        and trunk.has_class_token
        and getattr(trunk, "attn_pool", None) is None
        and len(trunk.blocks) > 0
        and all(type(b) is Block and type(b.attn) is Attention for b in trunk.blocks)
    )


def _class_token_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm `Block.forward` for the class token only: (B, N, C) -> (B, 1, C).

    The pooled output of a class-token ViT depends on the last block only through the class token's
    query: keys and values are needed for every token, the query, attention output, projection and
    MLP for one. Same result as `block(x)[:, :1]`, ~80% less work in the last block.
    """
    attn = block.attn
    b, n, _ = x.shape
    h = block.norm1(x)
    dim, heads, head_dim = attn.attn_dim, attn.num_heads, attn.head_dim
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(h[:, :1], weight[:dim], None if bias is None else bias[:dim])
    kv = F.linear(h, weight[dim:], None if bias is None else bias[dim:])
    q = q.view(b, 1, heads, head_dim).transpose(1, 2)  # (B, H, 1, Dh)
    k, v = kv.view(b, n, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, Dh) each
    q, k = attn.q_norm(q), attn.k_norm(k)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    o = attn.norm(o.transpose(1, 2).reshape(b, 1, dim))
    if getattr(attn, "gate", None) is not None:
        o = o * attn.gate(h[:, :1]).sigmoid()
    y = x[:, :1] + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(o))))
    return y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))


def clip_init_vit(trunk: nn.Module) -> None:
    """Re-initialise a from-scratch timm ViT as OpenAI CLIP / open_clip initialise their visual transformer.

    open_clip leaves the visual blocks at PyTorch's defaults (`nn.MultiheadAttention`: Xavier-uniform
    packed qkv with zero biases; `nn.Linear`/`nn.Conv2d`: Kaiming-uniform) and draws the class and
    position embeddings from N(0, width^-1/2). timm's ViT init (truncated N(0, 0.02), class token
    1e-6) is tuned for long supervised runs: on the built-in 40-class data a 9M-parameter CLIP trained
    117 steps reaches 6% zero-shot top-1 from timm's init and 20% from this one (bench/results/recipe.md).
    """
    scale = trunk.embed_dim**-0.5
    for module in trunk.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
            module.reset_parameters()
    for block in trunk.blocks:
        nn.init.xavier_uniform_(block.attn.qkv.weight)
        for bias in (block.attn.qkv.bias, block.attn.proj.bias):
            if bias is not None:
                nn.init.zeros_(bias)
    if trunk.cls_token is not None:
        nn.init.normal_(trunk.cls_token, std=scale)
    if trunk.pos_embed is not None:
        nn.init.normal_(trunk.pos_embed, std=scale)


def attention_pool(trunk: nn.Module, cfg: ImageTowerConfig) -> nn.Module:
    """timm's `AttentionPool2d` (CLIP's ModifiedResNet pool) over a CNN trunk's last feature map.

    Global average pooling is blind to where a feature fired; CLIP's pool attends from the map's mean to
    every position with a learned 2-D position embedding, so "a red square left of a circle" and its swap
    can pool differently. Output width = the trunk's (the tower's projection follows), no own projection.
    Shapes: (B, C, h, w) with h = w = image_size / the trunk's stride -> (B, C).
    """
    from timm.layers import AttentionPool2d

    info = getattr(trunk, "feature_info", None)
    if not info or getattr(trunk, "patch_embed", None) is not None:
        raise UserError(f"model.image.pool=attention needs a CNN with a 2-D feature map; {cfg.timm_name} is not one")
    width, stride = trunk.num_features, info[-1]["reduction"]
    if width % cfg.pool_heads:
        raise UserError(f"model.image.pool_heads={cfg.pool_heads} does not divide the trunk's width {width}")
    side = max(1, -(-cfg.image_size // stride))  # ceil: a padded conv rounds up
    return AttentionPool2d(width, feat_size=side, out_features=0, num_heads=cfg.pool_heads)


def _attention_pool_values(pool: nn.Module, fmap: torch.Tensor) -> torch.Tensor:
    """Each position's value through timm's `AttentionPool2d` (no attention): (B, C, h, w) -> (B, h*w, C_out).

    The pool's output is `proj(sum_k a_hk v_k)` per head h (k over the mean token and the positions); these
    are the positions' `proj(v_k)`.
    """
    from timm.layers import resample_abs_pos_embed

    b, _, h, w = fmap.shape
    pos = resample_abs_pos_embed(pool.pos_embed.unsqueeze(0), (h, w), old_size=pool.feat_size, num_prefix_tokens=1)
    x = fmap.flatten(2).transpose(1, 2) + pos[:, 1:]  # (B, h*w, C): the positions, without the mean query token
    if pool.qkv is None:
        v = pool.v(x)
    else:
        dim = pool.embed_dim
        v = F.linear(x, pool.qkv.weight[2 * dim :], None if pool.qkv.bias is None else pool.qkv.bias[2 * dim :])
    return pool.proj(v)


@IMAGE_TOWERS.register("timm")
class ImageTower(nn.Module):
    """A timm backbone and a bias-free linear projection to the joint embedding.

    With `pretrained` weights whose classifier already maps to `embed_dim` (timm's OpenAI/LAION CLIP
    towers), that classifier becomes the projection. For class-token ViTs the last block runs for the
    class token only (`_class_token_block`); other models run `trunk(images)`.

    Shapes: images (B, 3, H, W) normalised with `mean`/`std` -> (B, embed_dim).
    """

    def __init__(self, cfg: ImageTowerConfig, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.trunk = self._create_trunk(cfg, None if cfg.pretrained else 0)
        self.attn_pool = attention_pool(self.trunk, cfg) if cfg.pool == "attention" else None
        head = None
        if cfg.pretrained:
            classifier = self.trunk.get_classifier()
            if isinstance(classifier, nn.Linear) and classifier.out_features == embed_dim:
                head = classifier
            self.trunk.reset_classifier(0)
        width = self.trunk.num_features
        self.proj = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=width**-0.5)
        if head is not None:
            self.proj.weight.data.copy_(head.weight.data)
            if head.bias is not None and head.bias.abs().max() > 0:
                log.warning("the pretrained head of %s has a bias; the projection drops it", cfg.timm_name)
        import timm.data

        data_cfg = timm.data.resolve_data_config({}, model=self.trunk)
        self.mean = tuple(float(v) for v in data_cfg["mean"])
        self.std = tuple(float(v) for v in data_cfg["std"])
        self.locked = False
        self.class_token_shortcut = self.attn_pool is None and _class_token_shortcut_ok(self.trunk)
        if not cfg.pretrained and cfg.init == "clip" and self.class_token_shortcut:
            clip_init_vit(self.trunk)
        if cfg.freeze_patch_embed:
            self.freeze_patch_embed()

    def freeze_patch_embed(self) -> None:
        """MoCo v3's stability trick: the patch projection stays at its (random) init, out of the optimizer."""
        patch_embed = getattr(self.trunk, "patch_embed", None)
        if not isinstance(patch_embed, nn.Module):
            raise UserError(f"model.image.freeze_patch_embed needs a ViT; {self.cfg.timm_name} has no patch_embed")
        patch_embed.requires_grad_(False)

    def _create_trunk(self, cfg: ImageTowerConfig, num_classes: int | None) -> nn.Module:
        return _create_timm(cfg, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.attn_pool is not None:  # (B, C, h, w) feature map -> attention pool -> (B, C)
            return self.proj(self.attn_pool(self.trunk.forward_features(images)))
        if not self.class_token_shortcut:
            return self.proj(self.trunk(images))  # (B, C) pooled -> (B, embed_dim)
        trunk = self.trunk
        x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(images))))  # (B, N, C)
        *blocks, last = trunk.blocks
        use_checkpoint = trunk.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in blocks:
            x = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
        x = (
            checkpoint(_class_token_block, last, x, use_reentrant=False)
            if use_checkpoint
            else _class_token_block(last, x)
        )
        return self.proj(trunk.forward_head(trunk.norm(x), pre_logits=True))  # (B, 1, C) -> (B, embed_dim)

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Per-position features in the pooled output's space, for token-level objectives (FILIP):
        (B, 3, H, W) -> (B, N, embed_dim) unnormalised; the pooled path (`forward`) is untouched.

        ViT: the patch tokens after the final norm, through the projection the pooled token takes.
        CNN: the final map's h*w positions through the projection (average pooling: their mean is exactly
        the pooled output). With the attention pool, each position's value through the pool (map + its 2-D
        position embedding -> value projection -> the pool's output projection), then the projection, as
        MaskCLIP (Zhou et al. 2022) takes CLIP's ModifiedResNet's dense features: the pooled vector is, head
        by head, an attention-weighted average of these values (and of the mean query token's own), so tokens
        and pooled output share one space; a separate linear map would start in another space and train only
        through the token term. (A ViT with an average-pooling head gets its `fc_norm` per token.)
        """
        trunk = self.trunk
        if getattr(trunk, "patch_embed", None) is not None:  # ViT (timm, hybrid): (B, prefix + N, C)
            x = trunk.forward_features(images)[:, getattr(trunk, "num_prefix_tokens", 0) :]
            return self.proj(getattr(trunk, "fc_norm", nn.Identity())(x))
        fmap = trunk.forward_features(images)  # (B, C, h, w)
        if self.attn_pool is None:
            return self.proj(fmap.flatten(2).transpose(1, 2))
        return self.proj(_attention_pool_values(self.attn_pool, fmap))

    def lock(self, unlocked_layers: int = 0) -> None:
        """Freeze the backbone except its last `unlocked_layers` layer groups; the projection stays trainable."""
        lock_timm(self.trunk, unlocked_layers)
        self.locked = True

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)


def build_image_tower(cfg: ImageTowerConfig, embed_dim: int) -> nn.Module:
    """The image tower registered for `cfg.kind`: `ImageTower` ('timm'), `mmcl.models.hf_towers` ('hf_clip'),
    `mmcl.models.hybrid_tower` ('hybrid')."""
    return IMAGE_TOWERS.get(cfg.kind)(cfg, embed_dim)


def build_text_tower(cfg: TextTowerConfig, embed_dim: int, tokenizer: Tokenizer) -> nn.Module:
    """The text tower registered for `cfg.kind`: `mmcl.models.text_towers`' `ClipTextTower` ('clip') and
    `HFTextTower` ('hf'), `mmcl.models.hf_towers` ('hf_clip')."""
    if cfg.kind in ("hf", "hf_clip") and not cfg.hf_name:
        raise UserError(f"model.text.kind is '{cfg.kind}' but model.text.hf_name is empty")
    return TEXT_TOWERS.get(cfg.kind)(cfg, embed_dim, tokenizer)
