"""Bad configs and overrides end in one line naming the place, never a traceback or a silent default."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mmcl.cli import main
from mmcl.config import ConfigError, load_experiment, load_yaml, parse_overrides


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "value, expected",
    [
        ("[/data/laion/{00000..41407}.tar]", ["/data/laion/{00000..41407}.tar"]),
        ("/data/laion/{00000..00009}.tar", "/data/laion/{00000..00009}.tar"),
        ("[/a/{x,y}.tar, /b/{1..3}/{a,{b,c}}.tar]", ["/a/{x,y}.tar", "/b/{1..3}/{a,{b,c}}.tar"]),
    ],
)
def test_brace_patterns_in_overrides_are_kept_as_written(value, expected):
    assert parse_overrides([f"data.train_shards={value}"]) == {"data": {"train_shards": expected}}


def test_yaml_flow_mappings_still_parse():
    assert parse_overrides(["model.image.timm_kwargs={depth: 2, num_heads: 4}"]) == {
        "model": {"image": {"timm_kwargs": {"depth": 2, "num_heads": 4}}}
    }


def test_readme_brace_example_loads():
    cfg = load_experiment("configs/clip/vit-b-32.yaml", ["data.train_shards=[/data/laion/{00000..41407}.tar]"])
    assert cfg.data.train_shards == ["/data/laion/{00000..41407}.tar"]


def test_yaml_syntax_error_in_a_file_is_one_line_with_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 1e-3\n  steps: [1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:4:1: invalid YAML"):
        load_yaml(bad)
    err = _one_line_error(capsys, ["train", str(bad)])
    assert err.startswith("mmcl train: error:") and "bad.yaml:4:1" in err


def test_yaml_syntax_error_in_an_override_is_one_line(capsys):
    err = _one_line_error(capsys, ["train", "configs/clip/tiny.yaml", "train.lr=[1"])
    assert "override 'train.lr=[1'" in err and "invalid YAML" in err


def test_duplicate_keys_in_yaml_are_rejected(tmp_path, capsys):
    dup = tmp_path / "dup.yaml"
    dup.write_text("train:\n  lr: 1e-3\n  steps: 10\n  lr: 1e-2\n")
    err = _one_line_error(capsys, ["train", str(dup)])
    assert "dup.yaml:4:3: duplicate key 'lr'" in err


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.steps=-5", "train.steps must be >= 1"),
        ("train.steps=0", "train.steps must be >= 1"),
        ("train.lr=-1e-3", "train.lr must be a positive number"),
        ("train.lr=.nan", "train.lr must be a positive number"),
        ("train.grad_accum=0", "train.grad_accum must be >= 1"),
        ("train.ckpt_every=0", "train.ckpt_every must be >= 1"),
        ("train.betas=[0.9,1.5]", "train.betas must be in [0, 1)"),
        ("data.batch_size=0", "data.batch_size must be >= 1"),
        ("data.num_workers=-1", "data.num_workers must be >= 0"),
        ("data.max_pixels=0", "data.max_pixels must be >= 1"),
        ("eval.batch_size=0", "eval.batch_size must be >= 1"),
        ("model.image.image_size=0", "model.image.image_size must be >= 1"),
        ("model.text.context_length=0", "model.text.context_length must be >= 1"),
        ("model.decoder.max_prefix_frac=2", "model.decoder.max_prefix_frac must be in [min_prefix_frac, 1] (got 2.0)"),
    ],
)
def test_out_of_range_values_are_refused(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_experiment("configs/clip/tiny.yaml", [override])


def test_negative_steps_exit_nonzero_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    err = _one_line_error(capsys, ["train", "configs/clip/tiny.yaml", "train.steps=-5", f"train.output_dir={out}"])
    assert "train.steps must be >= 1 (got -5)" in err
    assert not out.exists()


def test_model_override_keeps_the_preset():
    """`model.KEY=...` on a config whose model is a preset name refines the preset (the README's siglip line)."""
    tiny = Path(__file__).resolve().parents[2] / "configs" / "clip" / "tiny.yaml"
    cfg = load_experiment(tiny, ["model.init_logit_bias=-10"])
    assert cfg.model.preset == "clip-tiny" and cfg.model.embed_dim == 64 and cfg.model.init_logit_bias == -10


@pytest.mark.parametrize("encoding, decodable", [("latin-1", False), ("utf-16", True), ("utf-8-sig", True)])
def test_config_not_utf8(encoding, decodable, tmp_path, capsys):
    """Latin-1 bytes: one line naming the file; UTF-16 or UTF-8 with a byte-order mark: read as marked."""
    path = tmp_path / "exp.yaml"
    path.write_bytes("# caf\u00e9 config\ntrain:\n  steps: 7\n  warmup_steps: 1\n".encode(encoding))
    if decodable:  # a BOM says what it is: read it
        from mmcl.config import load_experiment

        assert load_experiment(path).train.steps == 7
        return
    err = _one_line_error(capsys, ["train", str(path)])
    assert str(path) in err and "UTF-8" in err, err
