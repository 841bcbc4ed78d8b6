"""SimVLM PrefixLM: image tokens + a text prefix -> bidirectional encoder -> decoder writes the rest.

Wang et al. 2021, "SimVLM: Simple Visual Language Model Pretraining with Weak
Supervision" (arXiv:2108.10904). A caption x of T tokens is cut at a random
T_p; the encoder sees [image tokens ; x_<T_p] with full (bidirectional)
attention and the decoder is trained on

    L_PrefixLM = - sum_{i=T_p}^{T} log P(x_i | x_[T_p, i), x_<T_p, image)        (SimVLM eq. 2)

so one model both captions (T_p = 0) and completes a caption it was given the
start of. SimVLM also mixes in text-only documents (no image tokens).

Here: the image stem is a timm CNN's first stages or linear patches
(`image_stem.py`); the encoder-decoder is HF transformers' T5, built from
scratch from `DecoderConfig` sizes or loaded by `decoder.hf_name` (any seq2seq
LM), fed with `inputs_embeds`. The model tokenizes and splits the raw
captions itself; the split is a pure function of (sample key, split_seed), so a
resumed run cuts every caption exactly as the uninterrupted one did.

Shapes: images (B, 3, H, W) -> image tokens (B, N, D); prefix (B, P); encoder
input (B, N + P, D); decoder targets (B, T), T <= decoder.max_text_len.

Precision: train T5 in bf16 or fp32, not fp16 (its activations overflow fp16).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch
from torch import nn

from mmcl.config import DecoderConfig, ModelConfig
from mmcl.data.text import Tokenizer, build_tokenizer
from mmcl.models.image_stem import build_image_stem
from mmcl.registry import MODELS
from mmcl.utils import UserError

log = logging.getLogger("mmcl.models")
IGNORE_INDEX = -100  # label value ignored by the loss (HF / torch cross-entropy convention)


@dataclass
class PrefixSplit:
    """One caption cut for PrefixLM training.

    prefix: token ids given to the encoder after the image tokens.
    target: token ids the decoder must produce (suffix + EOS); empty = no loss for this sample.
    text_only: the sample is trained without its image (SimVLM's text-only documents).
    """

    prefix: list[int]
    target: list[int]
    text_only: bool = False


def _uniforms(key: str, seed: int, n: int) -> list[float]:
    """`n` numbers in [0, 1) that depend only on (seed, key): stable across processes and resumes."""
    digest = hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8 * n).digest()
    return [int.from_bytes(digest[8 * i : 8 * i + 8], "little") / 2**64 for i in range(n)]


def build_seq2seq(dcfg: DecoderConfig, vocab_size: int, pad_id: int, eos_id: int) -> nn.Module:
    """An HF encoder-decoder LM: `dcfg.hf_name` if set, else T5 built from scratch with `dcfg`'s sizes."""
    if dcfg.hf_name:
        from transformers import AutoModelForSeq2SeqLM

        from mmcl.data.text import hf_error, resolve_model_path

        path = resolve_model_path(dcfg.hf_name)  # never a model folder's own code (auto_map, module paths)
        try:
            return AutoModelForSeq2SeqLM.from_pretrained(path, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise UserError(
                f"decoder.hf_name '{dcfg.hf_name}': cannot load a seq2seq model ({hf_error(path, e)})"
            ) from None
    from transformers import T5Config, T5ForConditionalGeneration

    if dcfg.d_model % dcfg.num_heads:
        raise UserError(f"decoder.d_model={dcfg.d_model} is not divisible by decoder.num_heads={dcfg.num_heads}")
    config = T5Config(
        vocab_size=vocab_size,
        d_model=dcfg.d_model,
        d_kv=dcfg.d_model // dcfg.num_heads,
        d_ff=dcfg.d_ff,
        num_heads=dcfg.num_heads,
        num_layers=dcfg.encoder_layers,
        num_decoder_layers=dcfg.decoder_layers,
        dropout_rate=dcfg.dropout,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        decoder_start_token_id=pad_id,  # T5 convention: the decoder starts from <pad>
    )
    return T5ForConditionalGeneration(config)


class PrefixLM(nn.Module):
    """SimVLM-style PrefixLM captioner (see the module docstring).

    Args:
        cfg: model config; uses `decoder`, `image` (stem) and `text.tokenizer`.
        tokenizer: the mmcl Tokenizer; built from `cfg.text` when None.
        image_stem: module mapping images (B, 3, H, W) -> tokens (B, N, d_model); built from cfg when None.
        split_seed: varies the prefix/suffix cuts (the cut of a sample depends on its key and this seed).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        tokenizer: Tokenizer | None = None,
        image_stem: nn.Module | None = None,
        split_seed: int = 0,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.dcfg = cfg.decoder
        self.split_seed = split_seed
        self.tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg.text)
        self._check_split_config()
        tok = self.tokenizer
        self.seq2seq = build_seq2seq(self.dcfg, tok.vocab_size, tok.pad_id, tok.eos_id)
        model_vocab = self.seq2seq.get_input_embeddings().num_embeddings
        if tok.vocab_size > model_vocab or max(tok.pad_id, tok.eos_id) >= model_vocab:
            raise UserError(
                f"tokenizer '{cfg.text.tokenizer}' has {tok.vocab_size} tokens but the decoder's vocabulary has "
                f"{model_vocab}: use the tokenizer the decoder was trained with"
            )
        self.d_model = self.seq2seq.get_input_embeddings().embedding_dim
        start = getattr(self.seq2seq.config, "decoder_start_token_id", None)
        if start is None:  # transformers 5 keeps it in the generation config of loaded models
            start = getattr(getattr(self.seq2seq, "generation_config", None), "decoder_start_token_id", None)
        self.start_id = tok.pad_id if start is None else int(start)
        self.image_stem = image_stem if image_stem is not None else build_image_stem(cfg, self.d_model)
        self._warned_fp16 = False

    def _check_split_config(self) -> None:
        d = self.dcfg
        if not 0.0 <= d.min_prefix_frac <= d.max_prefix_frac <= 1.0:
            raise UserError(
                f"need 0 <= decoder.min_prefix_frac ({d.min_prefix_frac}) <= decoder.max_prefix_frac "
                f"({d.max_prefix_frac}) <= 1"
            )
        for name in ("empty_prefix_prob", "text_only_ratio"):
            if not 0.0 <= getattr(d, name) <= 1.0:
                raise UserError(f"decoder.{name}={getattr(d, name)} must be in [0, 1]")
        if d.max_text_len < 2:
            raise UserError(f"decoder.max_text_len={d.max_text_len} must be >= 2 (a token and EOS)")

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def preprocess_cfg(self) -> dict:
        """Image size and normalisation the data pipeline must produce for this model."""
        stem = self.image_stem
        return {"image_size": self.cfg.image.image_size, "mean": tuple(stem.mean), "std": tuple(stem.std)}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*
        action = "enable" if enable else "disable"
        fn = getattr(self.seq2seq, f"activation_checkpointing_{action}", None)
        (fn or getattr(self.seq2seq, f"gradient_checkpointing_{action}"))()
        if hasattr(self.image_stem, "set_grad_checkpointing"):
            self.image_stem.set_grad_checkpointing(enable)

    # ------------------------------------------------------------------ prefix / suffix split

    def split_caption(self, caption: str, key: str, has_image: bool = True) -> PrefixSplit:
        """Tokenize and cut one caption (deterministic in `key` and `split_seed`).

        Captions longer than `max_text_len - 1` tokens are truncated (the EOS needs a slot). An
        empty caption gets no target (no loss). A sample is text-only when it has no image or, with
        probability `text_only_ratio`, by draw; a text-only caption keeps at least one prefix token
        (the encoder needs an input). Otherwise the prefix is empty with probability
        `empty_prefix_prob` (plain captioning), else floor(f * n) tokens with f uniform in
        [min_prefix_frac, max_prefix_frac], at most n - 1 so something is left to predict.
        """
        d = self.dcfg
        ids = self.tokenizer.encode(caption.strip())[: d.max_text_len - 1]
        n = len(ids)
        u_empty, u_frac, u_text = _uniforms(key, self.split_seed, 3)
        text_only = not has_image or (u_text < d.text_only_ratio and n > 0)
        if n == 0:
            return PrefixSplit([], [], text_only)
        frac = d.min_prefix_frac + u_frac * (d.max_prefix_frac - d.min_prefix_frac)
        if text_only:
            k = n if n == 1 else min(max(int(frac * n), 1), n - 1)
        elif u_empty < d.empty_prefix_prob:
            k = 0
        else:
            k = min(int(frac * n), n - 1)
        return PrefixSplit(ids[:k], ids[k:] + [self.tokenizer.eos_id], text_only)

    def split_batch(self, captions: list[str], keys: list[str] | None, has_images: bool) -> list[PrefixSplit]:
        """`split_caption` for a batch; keys default to the captions themselves."""
        if not has_images and self.dcfg.text_only_ratio == 0:
            first = f" (sample '{keys[0]}')" if keys else ""
            raise UserError(
                f"a batch without images{first} reached an image-captioning model: set "
                "decoder.text_only_ratio > 0 to train on text-only samples"
            )
        keys = list(keys) if keys else list(captions)
        if len(keys) != len(captions):
            raise ValueError(f"{len(keys)} keys for {len(captions)} captions")
        return [self.split_caption(c, k, has_images) for c, k in zip(captions, keys)]

    # ------------------------------------------------------------------ encoder input

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> image tokens (B, N, d_model)."""
        return self.image_stem(images)

    def encoder_inputs(
        self, image_tokens: torch.Tensor | None, prefixes: list[list[int]], text_only: list[bool]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[image tokens ; embedded prefix] (B, N + P, D) and its attention mask (B, N + P), 1 = attend.

        Prefixes are right-padded; text-only samples mask out their image tokens.
        """
        device = self.device
        b = len(prefixes)
        parts, masks = [], []
        if image_tokens is not None:
            if image_tokens.shape[0] != b:
                raise ValueError(f"{image_tokens.shape[0]} images for {b} captions")
            parts.append(image_tokens)
            keep = torch.tensor([not t for t in text_only], device=device)
            masks.append(keep[:, None].expand(b, image_tokens.shape[1]).long())
        p = max((len(x) for x in prefixes), default=0)
        if p > 0:
            ids = torch.full((b, p), self.tokenizer.pad_id, dtype=torch.long)
            mask = torch.zeros(b, p, dtype=torch.long)
            for i, x in enumerate(prefixes):
                ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
                mask[i, : len(x)] = 1
            embeds = self.seq2seq.get_input_embeddings()(ids.to(device))  # (B, P, D)
            if parts:
                embeds = embeds.to(parts[0].dtype)
            parts.append(embeds)
            masks.append(mask.to(device))
        if not parts:
            raise UserError("nothing to encode: no images and no text prefix")
        x, mask = torch.cat(parts, 1), torch.cat(masks, 1)
        mask[mask.sum(1) == 0, 0] = 1  # a sample with nothing to attend to (empty text-only): keep rows finite
        return x, mask

    # ------------------------------------------------------------------ training forward

    def decoder_targets(self, targets: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: decoder inputs [start, y_0 .. y_{T-2}] and labels y padded with IGNORE_INDEX."""
        t = max(max((len(x) for x in targets), default=0), 1)
        labels = torch.full((len(targets), t), IGNORE_INDEX, dtype=torch.long)
        for i, y in enumerate(targets):
            labels[i, : len(y)] = torch.tensor(y, dtype=torch.long)
        inputs = torch.full_like(labels, self.tokenizer.pad_id)
        inputs[:, 0] = self.start_id
        prev = labels[:, :-1]
        inputs[:, 1:] = torch.where(prev == IGNORE_INDEX, self.tokenizer.pad_id, prev)
        return inputs.to(self.device), labels.to(self.device)

    def forward(
        self,
        images: torch.Tensor | None,
        captions: list[str],
        keys: list[str] | None = None,
        image_tokens: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Split, tokenize and run teacher-forced.

        Args:
            images: (B, 3, H, W) normalised images, or None for a text-only batch.
            captions: B raw caption strings.
            keys: B sample keys seeding the prefix cuts (default: the captions).
            image_tokens: precomputed (B, N, d_model) image tokens (a joint model's shared tower).

        Returns:
            {'logits': (B, T, V), 'labels': (B, T) with IGNORE_INDEX where there is no target,
            'prefix_len': (B,) prefix lengths in tokens}.
        """
        self._check_precision(images)
        has_images = images is not None or image_tokens is not None
        splits = self.split_batch(captions, keys, has_images)
        if image_tokens is None and images is not None:
            image_tokens = self.encode_images(images)
        enc, enc_mask = self.encoder_inputs(image_tokens, [s.prefix for s in splits], [s.text_only for s in splits])
        dec_in, labels = self.decoder_targets([s.target for s in splits])
        out = self.seq2seq(inputs_embeds=enc, attention_mask=enc_mask, decoder_input_ids=dec_in, use_cache=False)
        prefix_len = torch.tensor([len(s.prefix) for s in splits], device=labels.device)
        return {"logits": out.logits, "labels": labels, "prefix_len": prefix_len}

    def _check_precision(self, images: torch.Tensor | None) -> None:
        if self._warned_fp16 or images is None or images.device.type != "cuda":
            return
        if torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.float16:
            log.warning("T5 overflows in fp16 (NaN losses): train PrefixLM in bf16 or fp32")
            self._warned_fp16 = True

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def caption(
        self,
        images: torch.Tensor | None,
        prefix: str | list[str] | None = None,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        num_beams: int = 1,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        use_cache: bool = True,
        image_tokens: torch.Tensor | None = None,
    ) -> list[str]:
        """Caption a batch of images, or complete the given prefixes (output = prefix + completion).

        Args:
            images: (B, 3, H, W) normalised images; None only for text-only completion of `prefix`
                (models trained with text_only_ratio > 0).
            prefix: one string for all images, one per image, or None (plain captioning). A prefix of
                more than `max_text_len - 1` tokens is an error.
            max_new_tokens: longest completion (default `decoder.max_text_len`).
            num_beams, do_sample, temperature, top_p, top_k, repetition_penalty,
            no_repeat_ngram_size, use_cache: as in HF `generate()`; the sampling ones apply only
                with `do_sample=True`.
            image_tokens: precomputed (B, N, d_model) image tokens instead of `images`.
        """
        source = image_tokens if image_tokens is not None else images
        has_images = source is not None
        if has_images:
            b = source.shape[0]
        else:
            b = 1 if isinstance(prefix, str) else len(prefix or [])
        prefixes = self._prefix_ids(prefix, b)
        if not has_images and (self.dcfg.text_only_ratio == 0 or not any(prefixes)):
            raise UserError("caption() needs images (text-only completion needs a prefix and text_only_ratio > 0)")
        was_training = self.training
        self.eval()
        try:
            if image_tokens is None and images is not None:
                image_tokens = self.encode_images(images.to(self.device))
            enc, mask = self.encoder_inputs(image_tokens, prefixes, [not has_images] * b)
            gen = dict(
                max_new_tokens=max_new_tokens or self.dcfg.max_text_len,
                min_new_tokens=min_new_tokens,
                num_beams=num_beams,
                do_sample=do_sample,
                repetition_penalty=repetition_penalty,
                no_repeat_ngram_size=no_repeat_ngram_size,
                use_cache=use_cache,
                pad_token_id=self.tokenizer.pad_id,
                eos_token_id=self.tokenizer.eos_id,
                decoder_start_token_id=self.start_id,
            )
            if do_sample:
                gen.update(temperature=temperature, top_p=top_p, top_k=top_k or None)
            out = self.seq2seq.generate(inputs_embeds=enc, attention_mask=mask, **gen)  # (B, 1 + new)
        finally:
            self.train(was_training)
        texts = [prefix] * b if isinstance(prefix, str) else list(prefix or [""] * b)
        return [self._join(text, ids, row[1:].tolist()) for text, ids, row in zip(texts, prefixes, out)]

    def _prefix_ids(self, prefix: str | list[str] | None, b: int) -> list[list[int]]:
        if prefix is None:
            return [[] for _ in range(b)]
        texts = [prefix] * b if isinstance(prefix, str) else list(prefix)
        if len(texts) != b:
            raise UserError(f"{len(texts)} prefixes for {b} images")
        limit = self.dcfg.max_text_len - 1
        ids = [self.tokenizer.encode(t.strip()) for t in texts]
        for t, x in zip(texts, ids):
            if len(x) > limit:
                raise UserError(
                    f"prefix '{t[:40]}...' has {len(x)} tokens; the model takes at most {limit} "
                    "(decoder.max_text_len - 1)"
                )
        return ids

    def _join(self, prefix_text: str, prefix_ids: list[int], new_ids: list[int]) -> str:
        """prefix + completion, joined at the token level (a prefix may end inside a word)."""
        tok = self.tokenizer
        if tok.eos_id in new_ids:  # generate() pads finished rows after their EOS
            new_ids = new_ids[: new_ids.index(tok.eos_id)]
        new_ids = [i for i in new_ids if i != tok.bos_id]  # not pad: CLIP's pad id 0 is also the token "!"
        if not prefix_ids:
            return tok.decode(new_ids).strip()
        head, full = tok.decode(prefix_ids), tok.decode(prefix_ids + new_ids)
        if full.startswith(head):  # keep the user's own spelling of the prefix
            return (prefix_text.rstrip() + full[len(head) :]).strip()
        return full.strip()


@MODELS.register("prefix_lm")
def build_prefix_lm(cfg: ModelConfig) -> PrefixLM:
    return PrefixLM(cfg)
