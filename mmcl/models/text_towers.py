"""Text towers of the dual encoder; each maps token ids to (B, embed_dim) unnormalised features.

- `ClipTextTower`: CLIP's causal text transformer with open_clip's parameter names (state dicts load
  both ways without renaming), computed with fused causal SDPA.
- `HFTextTower`: any Hugging Face encoder (`AutoModel`) with cls / mean / eos pooling + a projection.

Both also give per-token features in the joint space (`forward_tokens`, for token-level terms such as FILIP).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmcl.config import TextTowerConfig
from mmcl.data.text import Tokenizer, hf_error, resolve_model_path
from mmcl.models.lock import largest_module_list, lock_layer_stack
from mmcl.registry import TEXT_TOWERS
from mmcl.utils import UserError

log = logging.getLogger("mmcl.models")


def eos_index(text: torch.Tensor, mask: torch.Tensor | None, eos_id: int, pad_id: int) -> torch.Tensor:
    """Position of each row's last real token (the EOS): (B, L) -> (B,) long.

    From `mask` when given; else the first `eos_id`, or the last non-pad token of rows without one.
    """
    if mask is not None:
        return (mask.sum(dim=1) - 1).clamp(min=0).long()
    is_eos = text == eos_id
    first_eos = is_eos.int().argmax(dim=1)
    last_real = ((text != pad_id).sum(dim=1) - 1).clamp(min=0)
    return torch.where(is_eos.any(dim=1), first_eos, last_real)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with `nn.MultiheadAttention`'s parameter layout.

    Same names as open_clip's blocks (`in_proj_weight`, `in_proj_bias`, `out_proj`), computed with
    `F.scaled_dot_product_attention(is_causal=True)` (fused kernels, no materialised mask).
    Shapes: (B, L, W) -> (B, L, W).
    """

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise UserError(f"text width {width} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, w // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, W/H) each
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(x.transpose(1, 2).reshape(b, n, w))

    def forward_at(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The output at one position per row only (causal): x (B, L, W), idx (B,) -> (B, W)."""
        b, n, w = x.shape
        head_dim = w // self.heads
        q = F.linear(x[torch.arange(b, device=x.device), idx], self.in_proj_weight[:w], self.in_proj_bias[:w])
        kv = F.linear(x, self.in_proj_weight[w:], self.in_proj_bias[w:]).view(b, n, 2, self.heads, head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, W/H) each
        visible = torch.arange(n, device=x.device)[None, :] <= idx[:, None]  # (B, L) causal row of the query
        p = self.dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(
            q.view(b, self.heads, 1, head_dim), k, v, attn_mask=visible[:, None, None], dropout_p=p
        )
        return self.out_proj(o.reshape(b, w))


class TextBlock(nn.Module):
    """Pre-norm residual block (open_clip's `ResidualAttentionBlock` layout): attention, then GELU MLP.

    `dropout` (0 = off, CLIP's setting) drops attention weights and both residual branches, as BERT /
    GPT-2 do; SimCSE (Gao et al. 2021) uses it as the only noise between two views of a caption.
    Dropout layers hold no parameters: checkpoints and open_clip interop are unchanged.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.drop = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(hidden, width))])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.mlp(self.ln_2(x)))

    def forward_at(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """`forward(x)[arange(B), idx]` computing only those rows' queries and MLP: (B, L, W) -> (B, W)."""
        y = x[torch.arange(x.shape[0], device=x.device), idx] + self.drop(self.attn.forward_at(self.ln_1(x), idx))
        return y + self.drop(self.mlp(self.ln_2(y)))


class TextTransformer(nn.Module):
    """The block stack (named `transformer.resblocks` as in open_clip)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList([TextBlock(width, heads, mlp_ratio, dropout) for _ in range(layers)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, W) -> (B, L, W); with `idx` (B,) the last block runs for those positions only -> (B, W)."""
        use_checkpoint = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        last = len(self.resblocks) - 1
        for i, block in enumerate(self.resblocks):
            if i == last and idx is not None:
                fn, args = block.forward_at, (x, idx)
            else:
                fn, args = block, (x,)
            x = checkpoint(fn, *args, use_reentrant=False) if use_checkpoint else fn(*args)
        if idx is not None and last < 0:
            x = x[torch.arange(x.shape[0], device=x.device), idx]
        return x


@TEXT_TOWERS.register("clip")
class ClipTextTower(nn.Module):
    """CLIP's text encoder (Radford et al. 2021): token + learned position embeddings, a causal
    pre-norm transformer, final LayerNorm, the EOS token's state (or the masked mean) @ projection.

    Because attention is causal, tokens after a row's EOS cannot change its pooled state: each batch
    is cut to its longest row before the transformer, and with EOS pooling the last block computes
    the EOS positions only (the same output, less work). Shapes: text (B, L) ids, text_mask (B, L)
    or None -> (B, embed_dim).
    """

    def __init__(self, cfg: TextTowerConfig, embed_dim: int, tokenizer: Tokenizer) -> None:
        super().__init__()
        if cfg.pooling not in ("eos", "mean"):
            raise UserError(f"model.text.pooling '{cfg.pooling}' needs a bidirectional tower; CLIP's is causal")
        if tokenizer.vocab_size > cfg.vocab_size:
            raise UserError(
                f"tokenizer '{cfg.tokenizer}' has {tokenizer.vocab_size} tokens but the text tower's vocabulary "
                f"has {cfg.vocab_size} (token ids >= vocab size): set model.text.vocab_size={tokenizer.vocab_size}"
            )
        self.cfg = cfg
        self.pooling = cfg.pooling
        self.eos_id, self.pad_id, self.bos_id = tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id
        self.context_length = cfg.context_length
        self.width = cfg.width  # of the per-token states (`token_states`)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = TextTransformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.dropout)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, embed_dim))
        self.locked = False
        self._init_parameters()

    def _init_parameters(self) -> None:
        """open_clip's `TextTransformer.init_parameters` (scaled normal init by depth and width)."""
        width, layers = self.cfg.width, self.cfg.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        idx = eos_index(text, text_mask, self.eos_id, self.pad_id)  # (B,)
        if not torch.compiler.is_compiling():  # data-dependent length: keep shapes static under compile
            text = text[:, : int(idx.max()) + 1]
        n = text.shape[1]
        if n > self.context_length:
            raise ValueError(f"text of {n} tokens is longer than the context length {self.context_length}")
        x = self.token_embedding(text) + self.positional_embedding[:n]  # (B, L, W)
        if self.pooling == "eos":
            pooled = self.ln_final(self.transformer(x, idx))  # (B, W); LayerNorm is per token: pool first
        else:
            x = self.transformer(x)
            keep = (torch.arange(n, device=x.device)[None, :] <= idx[:, None]).to(x.dtype)  # (B, L)
            pooled = (self.ln_final(x) * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
        return pooled @ self.text_projection

    def token_states(self, text: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Every position's final state (after `ln_final`, before pooling), for token-level objectives
        (masked-token prediction): (B, L) ids -> (B, n, W), n = the batch's longest row. Causal: the state
        at position i sees tokens 0..i only."""
        idx = eos_index(text, text_mask, self.eos_id, self.pad_id)
        text = text[:, : int(idx.max()) + 1]
        x = self.token_embedding(text) + self.positional_embedding[: text.shape[1]]  # (B, n, W)
        return self.ln_final(self.transformer(x))

    def forward_tokens(
        self, text: torch.Tensor, text_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token's final state through the projection the pooled (EOS) state takes, for token-level
        objectives (FILIP): (B, L) -> ((B, L, embed_dim) unnormalised, zeros at padding; (B, L) bool mask).

        The mask keeps the real tokens up to the EOS but not a leading BOS: in a causal tower its state sees
        only itself, the same vector for every caption.
        """
        n = text.shape[1]
        idx = eos_index(text, text_mask, self.eos_id, self.pad_id)  # (B,)
        states = self.token_states(text, text_mask) @ self.text_projection  # (B, longest, D)
        tokens = F.pad(states, (0, 0, 0, n - states.shape[1]))
        pos = torch.arange(n, device=text.device)[None, :]
        mask = pos <= idx[:, None]
        if self.bos_id is not None:
            mask &= ~((pos == 0) & (text[:, :1] == self.bos_id) & (idx[:, None] > 0))
        return tokens * mask[..., None].to(tokens.dtype), mask

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding (vocab_size, W): what a masked-token head ties its decoder to."""
        return self.token_embedding

    def lock(self, unlocked_layers: int = 0) -> None:
        """Freeze embeddings and blocks except the last `unlocked_layers` (with the final norm); the
        projection stays trainable."""
        params = [(n, p) for n, p in self.named_parameters() if n != "text_projection"]
        lock_layer_stack(params, "transformer.resblocks", self.cfg.layers, unlocked_layers)
        self.locked = True

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable


@TEXT_TOWERS.register("hf")
class HFTextTower(nn.Module):
    """A Hugging Face encoder (`AutoModel.from_pretrained(hf_name)`) with pooling and a projection.

    Pooling: 'cls' (first token), 'mean' (over real tokens), 'eos' (last real token). Rows are cut to
    the batch's longest before the encoder (padding is masked out, so the output is unchanged).
    Shapes: text (B, L) ids, text_mask (B, L) or None -> (B, embed_dim).
    """

    def __init__(self, cfg: TextTowerConfig, embed_dim: int, tokenizer: Tokenizer) -> None:
        super().__init__()
        from transformers import AutoModel

        self.cfg = cfg
        self.pooling = cfg.pooling
        self.pad_id = tokenizer.pad_id
        path = resolve_model_path(cfg.hf_name)
        try:
            # float32 weights whatever the checkpoint's dtype: mixed precision comes from autocast
            self.model = AutoModel.from_pretrained(path, dtype=torch.float32, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise UserError(f"model.text.hf_name '{cfg.hf_name}': {hf_error(cfg.hf_name, e)}") from None
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None  # unused: it would get no gradient (and DDP would complain)
        vocab = self.model.get_input_embeddings().num_embeddings
        if tokenizer.vocab_size > vocab:
            raise UserError(
                f"tokenizer '{cfg.tokenizer}' has {tokenizer.vocab_size} tokens but {cfg.hf_name} has {vocab} "
                f"(token ids >= vocab size): use the model's own tokenizer (model.text.tokenizer=auto)"
            )
        width = self.width = self.model.config.hidden_size  # of the per-token states (`token_states`)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=width**-0.5)
        self.locked = False

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = text_mask if text_mask is not None else (text != self.pad_id).long()
        lengths = mask.sum(dim=1)
        if not torch.compiler.is_compiling():
            n = int(lengths.max())
            text, mask = text[:, :n], mask[:, :n]
        h = self.model(input_ids=text, attention_mask=mask).last_hidden_state  # (B, L, W)
        if self.pooling == "cls":
            pooled = h[:, 0]
        elif self.pooling == "mean":
            m = mask.to(h.dtype)[..., None]
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
        else:
            pooled = h[torch.arange(h.shape[0], device=h.device), (lengths - 1).clamp(min=0)]
        return self.proj(pooled)

    def token_states(self, text: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's last hidden state at every position: (B, L) ids -> (B, n, W), n = the longest row."""
        mask = text_mask if text_mask is not None else (text != self.pad_id).long()
        n = int(mask.sum(dim=1).max())
        return self.model(input_ids=text[:, :n], attention_mask=mask[:, :n]).last_hidden_state

    def forward_tokens(
        self, text: torch.Tensor, text_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every real token's last hidden state through the projection (FILIP): (B, L) -> ((B, L, embed_dim)
        unnormalised, zeros at padding; (B, L) bool mask of the real tokens)."""
        mask = (text_mask if text_mask is not None else (text != self.pad_id).long()).bool()
        states = self.proj(self.token_states(text, mask.long()))  # (B, longest, D)
        tokens = F.pad(states, (0, 0, 0, text.shape[1] - states.shape[1]))
        return tokens * mask[..., None].to(tokens.dtype), mask

    def get_input_embeddings(self) -> nn.Embedding:
        """The encoder's token embedding: what a masked-token head ties its decoder to."""
        return self.model.get_input_embeddings()

    def lock(self, unlocked_layers: int = 0) -> None:
        """Freeze the encoder except its last `unlocked_layers` layers; the projection stays trainable."""
        name, layers = largest_module_list(self.model) if unlocked_layers > 0 else ("", nn.ModuleList())
        lock_layer_stack(self.model.named_parameters(), name, len(layers), unlocked_layers)
        self.locked = True

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_disable()
