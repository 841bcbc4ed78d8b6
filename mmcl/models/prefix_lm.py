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
LM), fed with `inputs_embeds`. The loader workers tokenize and split the raw
captions (`mmcl.data.views.CaptionSplitView`, asked for by the `caption` loss
term); the model takes token tensors. The split is a pure function of (sample
key, split_seed), so a resumed run cuts every caption as the uninterrupted one did.

Shapes: images (B, 3, H, W) -> image tokens (B, N, D); prefix (B, P); encoder
input (B, N + P, D); decoder targets (B, T), T <= decoder.max_text_len.

Precision: train T5 in bf16 or fp32, not fp16 (its activations overflow fp16).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from mmcl.config import DecoderConfig, ModelConfig
from mmcl.data.text import Tokenizer, build_tokenizer
from mmcl.data.views import IGNORE_INDEX, pad_ids
from mmcl.models.image_stem import build_image_stem
from mmcl.registry import MODELS
from mmcl.utils import UserError

log = logging.getLogger("mmcl.models")


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

    default_terms: tuple[str, ...] = ("caption",)  # the loss terms when loss.terms is empty
    can_encode: bool = False  # what inference may ask of it (`mmcl.inference.Encoder`): captions only
    can_caption: bool = True

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
        from mmcl.data.transforms import resolve_preprocess

        stem = self.image_stem
        return resolve_preprocess(self.cfg.image.image_size, stem.mean, stem.std, self.cfg.image.preprocess)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*
        action = "enable" if enable else "disable"
        fn = getattr(self.seq2seq, f"activation_checkpointing_{action}", None)
        (fn or getattr(self.seq2seq, f"gradient_checkpointing_{action}"))()
        if hasattr(self.image_stem, "set_grad_checkpointing"):
            self.image_stem.set_grad_checkpointing(enable)

    # ------------------------------------------------------------------ encoder input

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> image tokens (B, N, d_model)."""
        return self.image_stem(images)

    def encoder_inputs(
        self,
        image_tokens: torch.Tensor | None,
        prefix_ids: torch.Tensor,
        prefix_mask: torch.Tensor,
        text_only: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[image tokens ; embedded prefix] (B, N + P, D) and its attention mask (B, N + P), 1 = attend.

        Args:
            image_tokens: (B, N, D) or None (a text-only batch).
            prefix_ids, prefix_mask: (B, P) right-padded prefix tokens (P may be 0).
            text_only: (B,) bool; text-only samples mask out their image tokens.
        """
        device = self.device
        b = prefix_ids.shape[0]
        parts, masks = [], []
        if image_tokens is not None:
            if image_tokens.shape[0] != b:
                raise ValueError(f"{image_tokens.shape[0]} images for {b} captions")
            parts.append(image_tokens)
            keep = ~text_only.to(device=device, dtype=torch.bool)
            masks.append(keep[:, None].expand(b, image_tokens.shape[1]).long())
        if prefix_ids.shape[1] > 0:
            embeds = self.seq2seq.get_input_embeddings()(prefix_ids.to(device))  # (B, P, D)
            if parts:
                embeds = embeds.to(parts[0].dtype)
            parts.append(embeds)
            masks.append(prefix_mask.to(device=device, dtype=torch.long))
        if not parts:
            raise UserError("nothing to encode: no images and no text prefix")
        x, mask = torch.cat(parts, 1), torch.cat(masks, 1)
        mask[mask.sum(1) == 0, 0] = 1  # a sample with nothing to attend to (empty text-only): keep rows finite
        return x, mask

    # ------------------------------------------------------------------ training forward

    def decoder_inputs(self, labels: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: labels (B, T) (IGNORE_INDEX where none) -> decoder inputs [start, y_0 .. y_{T-2}]."""
        inputs = torch.full_like(labels, self.tokenizer.pad_id)
        inputs[:, 0] = self.start_id
        prev = labels[:, :-1]
        inputs[:, 1:] = torch.where(prev == IGNORE_INDEX, self.tokenizer.pad_id, prev)
        return inputs

    def forward(
        self,
        images: torch.Tensor | None = None,
        prefix_ids: torch.Tensor | None = None,
        prefix_mask: torch.Tensor | None = None,
        lm_labels: torch.Tensor | None = None,
        text_only: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Teacher-forced PrefixLM on captions the loader already split and tokenized
        (`mmcl.data.views.CaptionSplitView`).

        Args:
            images: (B, 3, H, W) normalised images, or None for a text-only batch.
            prefix_ids, prefix_mask: (B, P) encoder prefix tokens after the image tokens.
            lm_labels: (B, T) decoder targets (suffix + EOS), IGNORE_INDEX where there is none.
            text_only: (B,) bool, samples trained without their image (default: none).
            image_tokens: precomputed (B, N, d_model) image tokens (a joint model's shared tower).

        Returns:
            {'logits': (B, T, V), 'labels': (B, T), 'prefix_len': (B,) prefix lengths in tokens}.
        """
        if prefix_ids is None or prefix_mask is None or lm_labels is None:
            raise UserError(
                "PrefixLM needs the loader's caption splits (prefix_ids, prefix_mask, lm_labels): train it "
                "with the 'caption' loss term"
            )
        self._check_precision(images)
        if image_tokens is None and images is not None:
            image_tokens = self.encode_images(images)
        if text_only is None:
            text_only = torch.zeros(prefix_ids.shape[0], dtype=torch.bool)
        enc, enc_mask = self.encoder_inputs(image_tokens, prefix_ids, prefix_mask, text_only)
        labels = lm_labels.to(self.device)
        dec_in = self.decoder_inputs(labels)
        out = self.seq2seq(inputs_embeds=enc, attention_mask=enc_mask, decoder_input_ids=dec_in, use_cache=False)
        return {"logits": out.logits, "labels": labels, "prefix_len": prefix_mask.sum(1).to(labels.device)}

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
            ids, ids_mask = pad_ids(prefixes, self.tokenizer.pad_id)
            enc, mask = self.encoder_inputs(image_tokens, ids, ids_mask, torch.full((b,), not has_images))
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
