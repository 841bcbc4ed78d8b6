"""Typed configs: dataclasses built from YAML, with dotted command-line overrides.

Every config in mmcl is a dataclass. `from_dict` builds one from plain data and
checks every value against the field's type; an unknown key is an error that
names the closest valid key. `apply_overrides` takes `a.b.c=value` strings (the
value is parsed as YAML, so `[1, 2]`, `true` and `1e-3` mean what they look
like) and re-validates the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmcl.config.experiment import (
    MODEL_PRESET_DIR,
    experiment_raw,
    load_experiment,
    model_config,
    model_preset_path,
    resolve_experiment_path,
    shipped_configs_dir,
)
from mmcl.config.schema import (
    MAX_WARMUP_FRACTION,
    BalanceConfig,
    DataConfig,
    DecoderConfig,
    EvalConfig,
    ExperimentConfig,
    ImageTowerConfig,
    LossConfig,
    ModelConfig,
    TermConfig,
    TextTowerConfig,
    TrainConfig,
)
from mmcl.config.typed import ConfigError, deep_merge, from_dict, to_dict
from mmcl.config.yamlio import load_yaml, parse_overrides, parse_yaml, read_config_text, save_yaml

__all__ = [
    "MAX_WARMUP_FRACTION",
    "MODEL_PRESET_DIR",
    "experiment_raw",
    "model_preset_path",
    "parse_yaml",
    "read_config_text",
    "resolve_experiment_path",
    "shipped_configs_dir",
    "ConfigError",
    "dataclass",
    "field",
    "from_dict",
    "to_dict",
    "deep_merge",
    "parse_overrides",
    "load_yaml",
    "save_yaml",
    "BalanceConfig",
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
