"""Model loading for the app and the CLIs: open_clip adapter, run folders, `mmcl app`/`mmcl index` commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from app_helpers import FakePipeline, coloured

from mmcl.app import handlers as H
from mmcl.app.models import OpenClipPipeline, load_run
from mmcl.utils import UserError

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory) -> OpenClipPipeline:
    import open_clip

    path = tmp_path_factory.mktemp("oc") / "mmcl-test-tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(path)
    return OpenClipPipeline("mmcl-test-tiny-clip")  # random weights: no download


def test_open_clip_adapter_encodes_and_classifies(tiny_open_clip):
    images = tiny_open_clip.encode_images([coloured("red"), coloured("blue", size=50)])
    texts = tiny_open_clip.encode_texts(["a red square", "a blue square", "x"])
    assert images.shape == (2, 32) and texts.shape == (3, 32)
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(texts.norm(dim=-1), torch.ones(3))
    state = H.AppState()
    state.set_pipeline(tiny_open_clip, "tiny")
    top = H.classify(state, coloured("red"), "red, blue", "short", top_k=2)
    assert {name for name, _ in top} == {"red", "blue"} and abs(sum(p for _, p in top) - 1) < 1e-5
    with pytest.raises(UserError, match="cannot caption"):
        H.caption(state, coloured("red"))


def test_open_clip_errors_are_clear(monkeypatch):
    import open_clip

    with pytest.raises(UserError, match="could not load open_clip model 'no-such-model'"):
        OpenClipPipeline("no-such-model")
    with pytest.raises(UserError, match="no open_clip model name"):
        OpenClipPipeline("  ")

    def offline(*args, **kwargs):  # what open_clip raises when the hub cannot be reached
        raise RuntimeError("Failed to download weights for tag 'laion2b_s34b_b79k': Failed to download file")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    with pytest.raises(UserError, match="Failed to download.*needs internet access"):
        OpenClipPipeline("ViT-B-32", "laion2b_s34b_b79k")


def test_load_run_missing_folder(tmp_path):
    with pytest.raises(UserError, match="no such run or checkpoint folder"):
        load_run(tmp_path / "missing")


def test_make_state_without_a_demo_run_shows_the_command(tmp_path, monkeypatch):
    from mmcl.app.ui import make_state

    monkeypatch.chdir(tmp_path)  # no runs/demo here
    state, run = make_state()
    assert state.pipeline is None and state.index is None and run is None
    assert "mmcl demo" in H.startup_message(state, run)


def test_make_state_finds_the_runs_index(tmp_path, monkeypatch, built_index):
    import mmcl.app.models as models
    from mmcl.app.ui import make_state

    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    built_index.rename(run / "index")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(models, "load_run", lambda path: FakePipeline())
    state, name = make_state()  # no arguments: runs/demo and runs/demo/index
    assert name == "runs/demo" and state.pipeline is not None and len(state.index) == 9
    assert H.search_by_text(state, "green", 1)[0].caption.startswith("a green")


def test_cli_index_build_info_search(tmp_path, image_folder, monkeypatch, capsys):
    import mmcl.app.models as models
    from mmcl.cli import main

    monkeypatch.setattr(models, "load_run", lambda path: FakePipeline())
    out = tmp_path / "idx"
    assert main(["index", "build", str(image_folder), "--run", "runs/fake", "--out", str(out), "--quiet"]) == 0
    assert "9 images" in capsys.readouterr().out
    assert main(["index", "info", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["info"]["model"] == "runs/fake"
    assert main(["index", "search", str(out), "--run", "runs/fake", "--text", "blue", "-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("blue" in line for line in lines)
    # Errors are one line on stderr and exit code 2, not a traceback.
    assert main(["index", "build", str(image_folder), "--run", "runs/fake", "--out", str(out), "--quiet"]) == 2
    assert "already holds an index" in capsys.readouterr().err
    assert main(["index", "build", str(image_folder), "--out", str(out), "--append"]) == 2
    assert "--run RUN or --open-clip NAME" in capsys.readouterr().err


def test_cli_app_arguments(monkeypatch):
    import mmcl.app as app_pkg
    from mmcl.cli import main

    seen = {}
    monkeypatch.setattr(app_pkg, "launch", lambda *a, **kw: seen.update(args=a, **kw), raising=False)
    assert main(["app"]) == 0
    assert seen["args"] == (None, None) and seen["host"] == "127.0.0.1" and seen["share"] is False
    assert seen["allow_runs"] == () and seen["max_file_size"] == "20mb"
    assert main(["app", "runs/x", "--index", "runs/x/index", "--port", "9000", "--allow-runs", "runs/y", "runs/z"]) == 0
    assert seen["args"] == ("runs/x", "runs/x/index") and seen["port"] == 9000
    assert seen["allow_runs"] == ("runs/y", "runs/z") and seen["allowed_hosts"] == ()
    assert main(["app", "--allow-host", "box.lan", "--allow-host", "10.0.0.7"]) == 0
    assert seen["allowed_hosts"] == ("box.lan", "10.0.0.7")


def test_app_script_is_the_cli(monkeypatch):
    import runpy

    import mmcl.cli

    calls = []
    monkeypatch.setattr(mmcl.cli, "main", lambda argv: calls.append(argv) or 0)
    monkeypatch.setattr(sys, "argv", ["app/app.py", "runs/demo", "--port", "8000"])
    script = Path(__file__).resolve().parents[2] / "app" / "app.py"
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code == 0 and calls == [["app", "runs/demo", "--port", "8000"]]


def test_a_hub_name_without_its_prefix_gets_the_hint():
    import pytest

    from mmcl.app.models import load_run
    from mmcl.utils import UserError

    with pytest.raises(UserError, match="write hf:openai/clip-vit-base-patch32"):
        load_run("openai/clip-vit-base-patch32")
