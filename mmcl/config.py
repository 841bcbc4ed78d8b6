"""Typed configs: dataclasses built from YAML, with dotted command-line overrides.

Every config in mmcl is a dataclass. `from_dict` builds one from plain data and
checks every value against the field's type; an unknown key is an error that
names the closest valid key. `apply_overrides` takes `a.b.c=value` strings (the
value is parsed as YAML, so `[1, 2]`, `true` and `1e-3` mean what they look
like) and re-validates the result.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from mmcl.registry import LOSSES
from mmcl.utils import UserError, atomic_write_text

T = TypeVar("T")
log = logging.getLogger("mmcl.config")


class ConfigError(UserError):
    """A config value or key is wrong; the message names where."""


def _suggest(key: str, valid: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    return f" (valid: {', '.join(sorted(valid))})"


def _require_ranges(section: str, checks: dict[str, tuple[bool, str]]) -> None:
    """Raise a ConfigError for the first `field: (ok, what it must be)` that is not ok."""
    for name, (ok, rule) in checks.items():
        if not ok:
            raise ConfigError(f"{section}.{name} must be {rule}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against type `tp`, converting the lossless cases (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if isinstance(tp, type) and hasattr(tp, "from_config"):  # a type that parses itself (TermConfig)
        return value if isinstance(value, tp) else tp.from_config(value, where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"{where}: {value!r} does not match {tp}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML reads "1e-3" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if isinstance(tp, type):
        if tp is int and isinstance(value, bool) or not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types."""
    upgrade = getattr(cls, "upgrade", None)
    if upgrade is not None:  # older layouts of this config, rewritten to the current one
        data = upgrade(data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config key '{path}'{_suggest(key, list(fields), f'{where}.' if where else '')}")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {e}") from None
    check = getattr(obj, "validate", None)
    if check is not None:
        check()
    return obj


def to_dict(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) for YAML/JSON output."""
    if hasattr(obj, "to_config"):
        return obj.to_config()
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, recursing into mappings."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# A shell-style brace group (`{00000..41407}`, `{a,b}`): no spaces or colons inside, so it cannot be meant as a
# YAML flow mapping (those are written `{key: value}`). Protected from the YAML parser and put back after.
_BRACE_GROUP = re.compile(r"\{[^{}\s:]*(?:\.\.|,)[^{}\s:]*\}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key written twice in one mapping (PyYAML keeps the last one silently)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise ConfigError(f"{mark.name}:{mark.line + 1}:{mark.column + 1}: duplicate key '{key}'")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def parse_yaml(text: str, where: str) -> Any:
    """`text` parsed with the safe loader; duplicate keys and syntax errors become one-line ConfigErrors.

    Args:
        where: a file name (errors read `FILE:LINE:COL: ...`) or a description such as "override 'a=b'".
    """
    loader = _UniqueKeyLoader(text)
    loader.name = where  # the marks in errors carry this instead of "<unicode string>"
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:  # PyYAML's report spans several lines with a caret drawing: one line here
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        position = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}{position}: invalid YAML: {problem}") from None
    finally:
        loader.dispose()


def _parse_value(raw: str, item: str) -> Any:
    """An override's value as YAML, with shell brace groups kept as written (`[/d/{000..041}.tar]`)."""
    groups: list[str] = []

    def protect(m: re.Match) -> str:
        groups.append(m.group(0))
        return f"__mmcl_brace_{len(groups) - 1}__"

    text = raw
    while True:  # innermost groups first, so nested ones ({a,{b,c}}) are protected whole
        protected = _BRACE_GROUP.sub(protect, text)
        if protected == text:
            break
        text = protected
    value = parse_yaml(text, f"override {item!r}, value")

    def restore(v: Any) -> Any:
        if isinstance(v, str):
            for i in reversed(range(len(groups))):
                v = v.replace(f"__mmcl_brace_{i}__", groups[i])
            return v
        if isinstance(v, list):
            return [restore(x) for x in v]
        if isinstance(v, dict):
            return {restore(k): restore(x) for k, x in v.items()}
        return v

    return restore(value) if groups else value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`['train.lr=1e-3', 'data.batch_size=8']` -> nested dict of YAML-parsed values.

    Shell brace patterns in a value are kept as written: `data.train_shards=[/d/{00000..00099}.tar]`.
    """
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key.path=value")
        node = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override")
        node[leaf] = _parse_value(raw, item) if raw.strip() else ""
    return nested


# Byte-order marks an editor may write (Windows Notepad's "Unicode" is UTF-16 LE with one): decoded as marked.
_BOMS = [(codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")]  # fmt: skip


def read_config_text(path: Path) -> str:
    """The text of config file `path`: UTF-8, or the encoding its byte-order mark names; else one line saying so."""
    data = path.read_bytes()
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), "utf-8")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: not {encoding.upper()} text (byte 0x{data[e.start]:02x} at offset {e.start}): "
            "save the file as UTF-8"
        ) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping; syntax errors and duplicate keys name the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = parse_yaml(read_config_text(path), str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def save_yaml(obj: Any, path: str | Path) -> None:
    """Write `obj` (a dataclass or plain data) as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))


# --------------------------------------------------------------------------- schema


@dataclass
class BalanceConfig:
    """MetaCLIP's long-tail balancing of the training stream (mmcl.data.balance); t 0 = off."""

    t: int = 0  # keep about t captions of each concept (the paper: 20k of 400M pairs)
    vocabulary: str = ""  # a file of concepts, one per line ("" = every word of the captions)
    counts: str = ""  # the concept counts (JSON): read when it exists, else counted over the shards and saved there

    def validate(self) -> None:
        _require_ranges("data.balance", {"t": (self.t >= 0, f">= 0 (got {self.t})")})


@dataclass
class DataConfig:
    """Where samples come from and how they are batched."""

    train_shards: list[str] = field(default_factory=list)  # brace patterns, dirs or URLs, one per source
    train_weights: list[float] = field(default_factory=list)  # sampling weight per source (resampled mode)
    val_shards: list[str] = field(default_factory=list)
    batch_size: int = 64  # per process, per micro-batch
    num_workers: int = 2
    resampled: bool = False  # infinite streaming with replacement (web scale) instead of exact epochs
    shuffle_buffer: int = 1000
    caption_key: str = "txt"  # "txt" or a key of the sample's .json (a list there: one is picked at random)
    label_key: str = "label"  # key of .json (or the .cls file) holding the class index
    max_pixels: int = 40_000_000  # images whose header declares more are skipped before decoding
    augment: bool = True  # random-resized-crop style augmentation for training
    # its area range, open_clip's (0.9, 1): with (0.8, 1) the digits' zero-shot top-1 was 92.2% vs 93.8% and the
    # shapes' position pairs 45.8% vs 50.5% (2 seeds each, bench/results/isolation.md)
    crop_scale: tuple[float, float] = (0.9, 1.0)
    # where training JPEGs are decoded: in the loader workers, or batched on the training device (nvJPEG on a GPU;
    # the workers then only read headers and draw crops: mmcl.data.device_decode)
    decode_on: Literal["workers", "device"] = "workers"
    # http(s) shards: seconds a connect/read may stall, retries per shard, first backoff (doubled each retry) and cap
    http_timeout: float = 30.0
    http_retries: int = 5
    http_backoff: float = 1.0
    http_max_backoff: float = 30.0
    # remote shards arriving slower than this (bytes/s, over windows of http_timeout s of waiting) are retried, then
    # skipped: a trickling server never stalls a read, yet never delivers (0 = no minimum)
    http_min_speed: float = 1024.0
    balance: BalanceConfig = field(default_factory=BalanceConfig)

    def validate(self) -> None:
        if self.train_weights and len(self.train_weights) != len(self.train_shards):
            raise ConfigError("data.train_weights needs one weight per entry of data.train_shards")
        _require_ranges(
            "data",
            {
                "batch_size": (self.batch_size >= 1, f">= 1 (got {self.batch_size})"),
                "num_workers": (self.num_workers >= 0, f">= 0 (got {self.num_workers})"),
                "shuffle_buffer": (self.shuffle_buffer >= 0, f">= 0 (got {self.shuffle_buffer})"),
                "max_pixels": (self.max_pixels >= 1, f">= 1 (got {self.max_pixels})"),
                "crop_scale": (
                    len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
                    f"two area fractions 0 < low <= high <= 1 (got {list(self.crop_scale)})",
                ),
                "http_timeout": (0 < self.http_timeout <= 3600, f"in (0, 3600] seconds (got {self.http_timeout})"),
                "http_min_speed": (self.http_min_speed >= 0, f">= 0 bytes/s (got {self.http_min_speed})"),
                "http_retries": (0 <= self.http_retries <= 100, f"in [0, 100] (got {self.http_retries})"),
                "http_backoff": (0 <= self.http_backoff <= 600, f"in [0, 600] seconds (got {self.http_backoff})"),
                "http_max_backoff": (
                    self.http_backoff <= self.http_max_backoff <= 3600,
                    f"in [http_backoff, 3600] seconds (got {self.http_max_backoff})",
                ),
                "train_weights": (
                    all(w >= 0 for w in self.train_weights) and (not self.train_weights or sum(self.train_weights) > 0),
                    f">= 0 with a positive sum (got {self.train_weights})",
                ),
            },
        )


@dataclass
class ImageTowerConfig:
    """A timm model used as the image encoder (any `timm.create_model` name)."""

    # hf_clip: the vision half of a transformers CLIP/SigLIP folder; hybrid: a conv stem feeding ViT blocks
    kind: Literal["timm", "hf_clip", "hybrid"] = "timm"
    hf_name: str = ""  # kind='hf_clip': that folder (its config.json sets the architecture)
    timm_name: str = "vit_base_patch32_clip_224"
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. patch_size, embed_dim, depth, num_heads
    pretrained: bool = False  # timm weights (needs the hub; users' machines)
    # from-scratch ViT init: 'clip' = OpenAI CLIP / open_clip's (learns far faster in short runs), 'timm' = timm's
    init: Literal["clip", "timm"] = "clip"
    image_size: int = 224
    # evaluation/training preprocessing of the model's source (its image processor or open_clip preprocess_cfg):
    # resize_mode 'shortest' (+ centre crop) or 'squash', resize_size, interpolation, mean, std (mmcl.data.transforms)
    preprocess: dict[str, Any] = field(default_factory=dict)
    # FLIP (Li et al. 2023): share of a ViT's patch tokens dropped at random in training (timm's patch_drop_rate)
    patch_dropout: float = 0.0
    # MoCo v3 (Chen, Xie & He 2021): keep a ViT's random patch projection frozen (steadies training)
    freeze_patch_embed: bool = False
    lock: bool = False  # LiT: freeze the tower
    unlocked_layers: int = 0  # with lock: keep the last N blocks trainable
    # PrefixLM conv stem: a timm CNN cut after `stem_out_index` (stride 16 for ResNets at index 3)
    stem_out_index: int = 3
    # kind='hybrid': widths of the 3x3 stride-2 conv layers that replace the ViT's patch embedding
    conv_stem: list[int] = field(default_factory=list)
    # CNNs: 'attention' replaces global average pooling by CLIP's attention pool with 2-D position embeddings
    # (ModifiedResNet, Radford et al. 2021), which keeps where things are; 'default' = the model's own pooling
    pool: Literal["default", "attention"] = "default"
    pool_heads: int = 8  # heads of the attention pool (must divide the trunk's width)

    def validate(self) -> None:
        _require_ranges(
            "model.image",
            {
                "image_size": (self.image_size >= 1, f">= 1 (got {self.image_size})"),
                "patch_dropout": (0 <= self.patch_dropout < 1, f"in [0, 1) (got {self.patch_dropout})"),
                "unlocked_layers": (self.unlocked_layers >= 0, f">= 0 (got {self.unlocked_layers})"),
                "pool_heads": (self.pool_heads >= 1, f">= 1 (got {self.pool_heads})"),
                "freeze_patch_embed": (
                    not (self.freeze_patch_embed and self.kind == "hf_clip"),
                    "false for kind 'hf_clip' (it applies to timm ViTs)",
                ),
            },
        )


@dataclass
class TextTowerConfig:
    """The text encoder: open_clip's CLIP transformer ('clip') or any HF encoder ('hf')."""

    kind: Literal["clip", "hf", "hf_clip"] = "clip"  # hf_clip: the text half of a transformers CLIP/SigLIP folder
    hf_name: str = ""  # HF model name or local path (kind='hf' or 'hf_clip')
    pooling: Literal["eos", "cls", "mean"] = "eos"
    tokenizer: str = "clip"  # 'clip' (bundled BPE), an HF tokenizer path/name, or a tokenizer.json
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    dropout: float = 0.0  # CLIP text tower: attention + residual dropout (SimCSE's noise); HF towers keep theirs
    lock: bool = False
    unlocked_layers: int = 0

    def validate(self) -> None:
        _require_ranges(
            "model.text",
            {
                name: (getattr(self, name) >= 1, f">= 1 (got {getattr(self, name)})")
                for name in ("context_length", "vocab_size", "width", "heads", "layers")
            }
            | {
                "mlp_ratio": (self.mlp_ratio > 0, f"> 0 (got {self.mlp_ratio})"),
                "dropout": (0 <= self.dropout < 1, f"in [0, 1) (got {self.dropout})"),
                "unlocked_layers": (self.unlocked_layers >= 0, f">= 0 (got {self.unlocked_layers})"),
            },
        )


@dataclass
class DecoderConfig:
    """PrefixLM encoder-decoder (SimVLM): an HF seq2seq model built from a T5 config by default."""

    hf_name: str = ""  # a seq2seq model name/path; empty = T5 built from the sizes below
    d_model: int = 256
    d_ff: int = 1024
    num_heads: int = 4
    encoder_layers: int = 4
    decoder_layers: int = 4
    dropout: float = 0.0
    image_stem: Literal["conv", "patch"] = "conv"  # timm CNN stem, or a plain linear patch embedding
    patch_size: int = 16  # for image_stem='patch'
    max_text_len: int = 32
    min_prefix_frac: float = 0.0
    max_prefix_frac: float = 0.5  # prefix length drawn uniformly in [min, max] x caption length
    empty_prefix_prob: float = 0.25  # share of samples captioned from the image alone
    text_only_ratio: float = 0.0  # share of text-only samples mixed into a batch

    def validate(self) -> None:
        fractions = ("dropout", "min_prefix_frac", "max_prefix_frac", "empty_prefix_prob", "text_only_ratio")
        sizes = ("d_model", "d_ff", "num_heads", "encoder_layers", "decoder_layers", "patch_size", "max_text_len")
        _require_ranges(
            "model.decoder",
            {n: (getattr(self, n) >= 1, f">= 1 (got {getattr(self, n)})") for n in sizes}
            | {n: (0 <= getattr(self, n) <= 1, f"in [0, 1] (got {getattr(self, n)})") for n in fractions}
            | {
                "max_prefix_frac": (
                    self.min_prefix_frac <= self.max_prefix_frac <= 1,
                    f"in [min_prefix_frac, 1] (got {self.max_prefix_frac})",
                )
            },
        )


@dataclass
class ModelConfig:
    """A model: `arch` picks the registered builder; `preset` names a config file to start from."""

    preset: str = ""  # a name in mmcl/models/configs/ or a path; loaded first, then the keys here
    arch: str = "clip"  # a registered model (mmcl.registry.MODELS): clip, prefix_lm, joint
    embed_dim: int = 512
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    init_logit_scale: float = 1 / 0.07  # CLIP temperature init (SigLIP: 10)
    max_logit_scale: float = 100.0
    init_logit_bias: float | None = None  # SigLIP: -10
    init_from: str = ""  # pretrained weights: an mmcl run, an open_clip file/folder or a transformers folder


@dataclass
class TermConfig:
    """One loss term: `{name: clip, weight: 1.0, ...the term's own options}`, or just its name.

    `name` is looked up in `mmcl.registry.LOSSES`; the other keys must be fields of that term's
    `Options` dataclass (unknown keys are an error naming the closest one, at their full path).
    """

    name: str
    weight: float = 1.0
    options: Any = None  # the term's typed Options instance

    @classmethod
    def from_config(cls, value: Any, where: str) -> TermConfig:
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            raise ConfigError(
                f"{where}: a loss term is a name or a mapping with a 'name' (e.g. {{name: clip}}), got {value!r}"
            )
        try:  # the registry reads the term's options without importing its module (no torch here)
            options_cls = LOSSES.options(value["name"])
        except KeyError as e:
            raise ConfigError(f"{where}: {e.args[0]}") from None
        weight = _coerce(value.get("weight", 1.0), float, f"{where}.weight")
        options = from_dict(options_cls, {k: v for k, v in value.items() if k not in ("name", "weight")}, where)
        return cls(value["name"], weight, options)

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name, "weight": self.weight, **to_dict(self.options or {})}


@dataclass
class LossConfig:
    """The objective: a weighted sum of loss terms, each logged separately.

    `terms: [clip]`, `terms: [{name: siglip}]`, `terms: [clip, {name: caption, weight: 0.5}]`.
    Empty = the model's own defaults (`default_terms` of the model class: CLIP -> [clip],
    PrefixLM -> [caption], joint -> [clip, caption]).
    """

    terms: list[TermConfig] = field(default_factory=list)
    plugins: list[str] = field(default_factory=list)  # modules holding more terms: [my_package.my_term]

    @classmethod
    def from_config(cls, value: Any, where: str) -> LossConfig:
        """Plug-ins are read first, so `terms` may name the terms they register."""
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for LossConfig, got {value!r}")
        plugins = _coerce(value.get("plugins", []), list[str], f"{where}.plugins")
        try:
            LOSSES.load_plugins(plugins, f"{where}.plugins")
        except KeyError as e:
            raise ConfigError(e.args[0]) from None
        return from_dict(cls, value, where)

    def validate(self) -> None:
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names):
            raise ConfigError(f"loss.terms names a term twice: {names}")


# the flat `loss:` of mmcl <= 0.1 (run folders and configs written before loss terms), per model arch
_LEGACY_LOSS_KEYS = {"contrastive", "contrastive_weight", "caption_weight", "gather_with_grad", "local_loss"}


def _upgrade_legacy_loss(loss: dict[str, Any], arch: str) -> dict[str, Any]:
    """`{contrastive: clip, contrastive_weight: w, caption_weight: c, ...}` -> `{terms: [...]}`."""
    if not isinstance(loss, dict) or not _LEGACY_LOSS_KEYS & set(loss):
        return loss
    extra = set(loss) - _LEGACY_LOSS_KEYS
    if extra:
        raise ConfigError(f"loss: the keys {sorted(extra)} cannot be mixed with the old flat loss keys; use loss.terms")
    terms: list[dict[str, Any]] = []
    contrastive = loss.get("contrastive", "clip")
    if arch in ("clip", "joint") and contrastive != "none":
        term: dict[str, Any] = {"name": contrastive, "weight": loss.get("contrastive_weight", 1.0)}
        if "gather_with_grad" in loss:
            term["gather_with_grad"] = loss["gather_with_grad"]
        if contrastive == "clip" and "local_loss" in loss:
            term["local_loss"] = loss["local_loss"]
        terms.append(term)
    if arch in ("prefix_lm", "joint"):
        terms.append({"name": "caption", "weight": loss.get("caption_weight", 1.0)})
    return {"terms": terms}


MAX_WARMUP_FRACTION = 0.2  # of train.steps; open_clip's recipes and bench/ use 10%


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    lr: float = 5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    layer_decay: float = 1.0  # layer-wise lr decay: block i of n gets lr * layer_decay**(n - i) (1 = off)
    warmup_steps: int = 100
    grad_clip: float = 1.0  # 0 = off
    grad_accum: int = 1  # micro-batches per optimizer step
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 where the hardware has it
    grad_checkpointing: bool = False
    compile: bool = False
    log_every: int = 10
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    max_bad_steps: int = 5  # non-finite loss/gradient this many steps in a row stops the run
    eval_every: int = 0  # 0 = only at the end
    seed: int = 0
    output_dir: str = "runs/default"
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    progress: bool = True

    def validate(self) -> None:
        _require_ranges(
            "train",
            {
                "steps": (self.steps >= 1, f">= 1 (got {self.steps})"),
                "lr": (self.lr > 0 and math.isfinite(self.lr), f"a positive number (got {self.lr})"),
                "min_lr": (0 <= self.min_lr <= self.lr, f"between 0 and train.lr (got {self.min_lr})"),
                "weight_decay": (self.weight_decay >= 0, f">= 0 (got {self.weight_decay})"),
                "betas": (all(0 <= b < 1 for b in self.betas), f"in [0, 1) (got {list(self.betas)})"),
                "eps": (self.eps > 0, f"> 0 (got {self.eps})"),
                "warmup_steps": (self.warmup_steps >= 0, f">= 0 (got {self.warmup_steps})"),
                "grad_clip": (self.grad_clip >= 0, f">= 0, 0 = off (got {self.grad_clip})"),
                "grad_accum": (self.grad_accum >= 1, f">= 1 (got {self.grad_accum})"),
                "log_every": (self.log_every >= 1, f">= 1 (got {self.log_every})"),
                "ckpt_every": (self.ckpt_every >= 1, f">= 1 (got {self.ckpt_every})"),
                "keep_checkpoints": (self.keep_checkpoints >= 0, f">= 0, 0 = all (got {self.keep_checkpoints})"),
                "max_bad_steps": (self.max_bad_steps >= 1, f">= 1 (got {self.max_bad_steps})"),
                "eval_every": (self.eval_every >= 0, f">= 0, 0 = at the end (got {self.eval_every})"),
                "seed": (self.seed >= 0, f">= 0 (got {self.seed})"),
                "output_dir": (bool(self.output_dir.strip()), "a folder path (got an empty string)"),
            },
        )
        self._cap_warmup()

    def _cap_warmup(self) -> None:
        """A warmup longer than a fifth of the run (a shipped config's warmup with a short `train.steps`, or
        finetune's default `--warmup-steps 30` with `--steps 30`) would spend the run ramping up: cap it."""
        cap = max(1, int(self.steps * MAX_WARMUP_FRACTION))
        if self.warmup_steps > cap:
            log.warning(
                "train.warmup_steps=%d is more than %d%% of train.steps=%d: warming up over %d steps instead",
                self.warmup_steps, round(100 * MAX_WARMUP_FRACTION), self.steps, cap,
            )  # fmt: skip
            self.warmup_steps = cap


@dataclass
class EvalConfig:
    """Held-out evaluation run by the trainer's eval hook and by `mmcl eval`."""

    shards: list[str] = field(default_factory=list)  # labelled shards (label in .json or .cls)
    classnames: str = ""  # a file with one class name per line
    templates: str = "openai"  # 'openai' (80), 'short' (7), 'cifar', 'none', or a file
    max_samples: int = 0  # 0 = all
    batch_size: int = 128
    # caption vs hard negative pairs (mmcl.eval.compositional): auto = when the eval shards carry the
    # built-in shapes' attributes; always = required (an error if they do not); never
    compositional: Literal["auto", "always", "never"] = "auto"
    compositional_pairs: int = 100  # pairs per subset, at most

    def validate(self) -> None:
        _require_ranges(
            "eval",
            {
                "max_samples": (self.max_samples >= 0, f">= 0, 0 = all (got {self.max_samples})"),
                "batch_size": (self.batch_size >= 1, f">= 1 (got {self.batch_size})"),
                "compositional_pairs": (self.compositional_pairs >= 1, f">= 1 (got {self.compositional_pairs})"),
            },
        )


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @classmethod
    def upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Read configs written before loss terms (a flat `loss:` mapping) as term lists."""
        model = data.get("model")
        arch = model.get("arch", "clip") if isinstance(model, dict) else "clip"
        if "loss" in data:
            data = {**data, "loss": _upgrade_legacy_loss(data["loss"], arch)}
        return data


MODEL_PRESET_DIR = Path(__file__).parent / "models" / "configs"


def model_preset_path(name: str) -> Path:
    """A preset name (file stem in mmcl/models/configs/) or a path to a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = MODEL_PRESET_DIR / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in MODEL_PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"unknown model preset '{name}'{_suggest(name, known)}")


def _resolve_model_preset(raw: dict[str, Any]) -> dict[str, Any]:
    preset = raw.get("preset")
    if not preset:
        return raw
    base = _resolve_model_preset(load_yaml(model_preset_path(preset)))
    return deep_merge(base, raw)


def model_config(preset_or_dict: str | dict[str, Any]) -> ModelConfig:
    """A ModelConfig from a preset name/path or a (possibly partial) mapping with `preset`."""
    raw = {"preset": preset_or_dict} if isinstance(preset_or_dict, str) else preset_or_dict
    return from_dict(ModelConfig, _resolve_model_preset(raw), "model")


def shipped_configs_dir() -> Path | None:
    """The experiment configs shipped with mmcl: `mmcl/configs/` of an installed wheel, or the checkout's
    top-level `configs/` (an editable install); None if neither is there."""
    package = Path(__file__).resolve().parent
    if (package / "configs").is_dir():
        return package / "configs"
    checkout = package.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "configs").is_dir():
        return checkout / "configs"
    return None


def resolve_experiment_path(path: str | Path) -> Path:
    """`path` if it exists; else, for a relative path such as `configs/clip/tiny.yaml`, the shipped config of that
    name (so README's commands work from any folder), logged; else `path` (whose loading then says not found)."""
    path = Path(path)
    shipped = shipped_configs_dir()
    if path.exists() or path.is_absolute() or shipped is None:
        return path
    rel = Path(*path.parts[1:]) if path.parts[:1] == ("configs",) else path
    candidate = shipped / rel
    if rel.parts and candidate.is_file():
        log.info("%s is not in %s: using the one shipped with mmcl, %s", path, Path.cwd(), candidate)
        return candidate
    return path


def experiment_raw(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    raw = load_yaml(resolve_experiment_path(path)) if path else {}
    if isinstance(raw.get("model"), str):  # a preset name: `model.KEY=...` overrides refine it, not replace it
        raw["model"] = {"preset": raw["model"]}
    return deep_merge(raw, parse_overrides(list(overrides)))


def load_experiment(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """The experiment in YAML file `path` (may be None: all defaults) with dotted overrides applied."""
    raw = experiment_raw(path, overrides)
    if isinstance(raw.get("model"), (str, dict)):
        model = raw["model"] if isinstance(raw["model"], dict) else {"preset": raw["model"]}
        raw["model"] = _resolve_model_preset(model)
    return from_dict(ExperimentConfig, raw)


__all__ = [
    "ConfigError",
    "dataclass",
    "field",
    "from_dict",
    "to_dict",
    "deep_merge",
    "parse_overrides",
    "load_yaml",
    "save_yaml",
    "DataConfig",
    "ImageTowerConfig",
    "TextTowerConfig",
    "DecoderConfig",
    "ModelConfig",
    "LossConfig",
    "TermConfig",
    "TrainConfig",
    "EvalConfig",
    "ExperimentConfig",
    "model_config",
    "load_experiment",
]
