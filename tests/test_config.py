"""Typed configs: YAML + dotted overrides, clear errors for unknown keys and wrong types."""

from __future__ import annotations

import pytest

from mmcl.config import (
    ConfigError,
    ExperimentConfig,
    from_dict,
    load_experiment,
    model_config,
    parse_overrides,
    save_yaml,
    to_dict,
)


def test_overrides_are_parsed_as_yaml_and_typed(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  lr: 1.0e-3\ndata:\n  batch_size: 8\n")
    cfg = load_experiment(
        path,
        [
            "train.lr=2e-3",
            "data.train_shards=[a, b]",
            "train.betas=[0.9, 0.95]",
            "data.resampled=true",
            "train.steps=7",
        ],
    )
    assert cfg.train.lr == 2e-3 and cfg.data.batch_size == 8 and cfg.train.steps == 7
    assert cfg.data.train_shards == ["a", "b"] and cfg.train.betas == (0.9, 0.95) and cfg.data.resampled is True


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lrr=1", "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
        ("trian.lr=1", "unknown config key 'trian' (did you mean 'train'?)"),
        ("train.steps=many", "train.steps: expected int, got 'many'"),
        ("train.steps=true", "train.steps: expected int, got True"),
        ("train.precision=fp8", "train.precision: 'fp8' is not one of"),
        ("data.train_shards=3", "data.train_shards: expected a list"),
        ("train.lr", "is not of the form key.path=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_experiment(None, [override])
    assert message in str(err.value)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_experiment(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_experiment(bad)


def test_validation_of_weights():
    with pytest.raises(ConfigError, match="one weight per entry"):
        load_experiment(None, ["data.train_shards=[a, b]", "data.train_weights=[1.0]"])


def test_model_presets_and_overrides(tmp_path):
    base = model_config("clip-tiny")
    assert base.arch == "clip"
    cfg = load_experiment(None, ["model.preset=clip-tiny", "model.text.layers=1"])
    assert cfg.model.text.layers == 1 and cfg.model.embed_dim == base.embed_dim
    with pytest.raises(ConfigError, match="unknown model preset 'clip-tinyy' \\(did you mean 'clip-tiny'"):
        model_config("clip-tinyy")


def test_round_trip_through_yaml(tmp_path):
    cfg = load_experiment(None, ["model.preset=clip-tiny", "train.lr=3e-4", "data.train_shards=[x]"])
    save_yaml(cfg, tmp_path / "cfg.yaml")
    import yaml

    again = from_dict(ExperimentConfig, yaml.safe_load((tmp_path / "cfg.yaml").read_text()))
    assert to_dict(again) == to_dict(cfg)


def test_parse_overrides_nesting():
    assert parse_overrides(["a.b.c=1", "a.b.d=x", "e=[1, 2]"]) == {"a": {"b": {"c": 1, "d": "x"}}, "e": [1, 2]}
