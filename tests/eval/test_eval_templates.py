import importlib.util
import json
import logging
from pathlib import Path

import pytest

from mmcl.eval.templates import format_prompts, load_classnames, load_templates
from mmcl.utils import UserError


def _package_file(package: str, *parts: str) -> Path:
    """A data/source file of an installed package, found without importing the (heavy) package."""
    return Path(importlib.util.find_spec(package).submodule_search_locations[0], *parts)


def test_builtin_sets_match_upstream():
    spec = importlib.util.spec_from_file_location("zsm", _package_file("open_clip", "zero_shot_metadata.py"))
    meta = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(meta)  # plain data: two tuples of lambdas and the class names
    assert load_templates("openai") == [t("{}") for t in meta.OPENAI_IMAGENET_TEMPLATES]
    assert len(load_templates("openai")) == 80
    assert load_templates("short") == [t("{}") for t in meta.SIMPLE_IMAGENET_TEMPLATES]
    path = _package_file("clip_benchmark", "datasets", "en_zeroshot_classification_templates.json")
    cifar = json.loads(path.read_text())["cifar10"]
    assert load_templates("cifar") == [t.replace("{c}", "{}") for t in cifar]
    assert load_templates("none") == ["{}"]


def test_user_file_comments_blank_lines_and_clip_benchmark_spelling(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# my prompts\na photo of a {}.\n\n  a {c} in the wild  \n")
    assert load_templates(f) == ["a photo of a {}.", "a {} in the wild"]


@pytest.mark.parametrize(
    "content, message",
    [("", "no templates"), ("\n# only a comment\n", "no templates"), ("a {}\na photo\n", "line 2 has no")],
)
def test_bad_template_files(tmp_path, content, message):
    f = tmp_path / "t.txt"
    f.write_text(content)
    with pytest.raises(UserError, match=message):
        load_templates(f)


def test_unknown_template_set():
    with pytest.raises(UserError, match="unknown template set 'imagenet'"):
        load_templates("imagenet")


def test_classnames(tmp_path, caplog):
    f = tmp_path / "c.txt"
    f.write_text("cat\n dog \nred_fox\n\n")
    assert load_classnames(f) == ["cat", "dog", "red_fox"]
    with pytest.raises(UserError, match="not found"):
        load_classnames(tmp_path / "missing.txt")
    f.write_text("\n\n")
    with pytest.raises(UserError, match="is empty"):
        load_classnames(f)
    f.write_text("cat\n\ndog\n")
    with pytest.raises(UserError, match="line 2 is blank"):
        load_classnames(f)
    f.write_text("cat\ndog\ncat\n")
    with caplog.at_level(logging.WARNING, logger="mmcl.eval"):
        assert load_classnames(f) == ["cat", "dog", "cat"]
    assert "duplicate class names" in caplog.text


def test_format_prompts_braces_are_literal():
    assert format_prompts("a {weird} name", ["a photo of {}.", "{} {}"]) == [
        "a photo of a {weird} name.",
        "a {weird} name a {weird} name",
    ]
