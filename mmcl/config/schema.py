"""The experiment schema: one dataclass per section (data, model and its towers, loss terms, train, eval),
with the ranges each value must be in."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from mmcl.config.typed import ConfigError, _coerce, _require_ranges, from_dict, to_dict
from mmcl.registry import LOSSES

log = logging.getLogger("mmcl.config")


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
