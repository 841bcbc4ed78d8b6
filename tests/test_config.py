"""Typed configs: YAML + dotted overrides, clear errors for unknown keys and wrong types."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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


def test_loading_a_config_with_loss_terms_does_not_import_torch(tmp_path):
    """Options are typed through the registry, which reads the term files without importing them."""
    path = tmp_path / "exp.yaml"
    path.write_text(
        "model:\n  preset: clip-tiny\nloss:\n  terms: [clip, {name: simclr, temperature: 0.2, augment: {flip_p: 0}},"
        " {name: negclip, count: 2}, byol]\n"
    )
    code = (
        "import sys\n"
        "from mmcl.config import load_experiment\n"
        "from mmcl.registry import LOSSES\n"
        f"cfg = load_experiment({str(path)!r})\n"
        "for name in LOSSES.names():\n"
        "    LOSSES.options(name)\n"
        "t = cfg.loss.terms\n"
        "assert t[1].options.temperature == 0.2 and t[1].options.augment.flip_p == 0 and t[2].options.count == 2\n"
        "heavy = sorted(m for m in ('torch', 'PIL', 'numpy', 'mmcl.losses.base') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_config_imports_only_the_registry_of_the_losses():
    sources = {p.name: p.read_text() for p in (Path(__file__).resolve().parents[1] / "mmcl" / "config").glob("*.py")}
    assert not [name for name, text in sources.items() if "mmcl.losses" in text]
    assert "from mmcl.registry import LOSSES" in sources["schema.py"]


def test_unknown_plugin_and_term_are_one_line_config_errors():
    with pytest.raises(ConfigError, match=r"loss.plugins\[0\]: no module 'not_a_package.term'"):
        load_experiment(None, ["loss.plugins=[not_a_package.term]", "loss.terms=[clip]"])
    with pytest.raises(ConfigError, match=r"loss.terms\[0\]: unknown loss term 'clipp' \(did you mean 'clip'"):
        load_experiment(None, ["loss.terms=[clipp]"])


def test_readme_table_of_terms_is_the_registry():
    """Every registered term has a row in README's table of terms, and every row a registered term."""
    from mmcl.registry import LOSSES

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("Registered terms", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    listed = [name for row in rows for name in re.findall(r"`([a-z0-9_]+)`", row.split("|")[1])]
    shipped = [n for n in LOSSES.names() if not n.startswith("test_")]
    assert sorted(listed) == sorted(shipped)
