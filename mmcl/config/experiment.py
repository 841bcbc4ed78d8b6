"""An experiment from a YAML file, presets and overrides: model presets (`mmcl/models/configs/`), the configs
shipped with mmcl (found from any folder), and `load_experiment`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mmcl.config.schema import ExperimentConfig, ModelConfig
from mmcl.config.typed import ConfigError, _suggest, deep_merge, from_dict
from mmcl.config.yamlio import load_yaml, parse_overrides

log = logging.getLogger("mmcl.config")


MODEL_PRESET_DIR = Path(__file__).resolve().parents[1] / "models" / "configs"


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
    package = Path(__file__).resolve().parents[1]  # mmcl/
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
