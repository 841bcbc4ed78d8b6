"""Model files that must not break a run or run code (issue 24 items 8 and 14): an export into a run folder is
refused and a stray weights file never shadows a run's own; every weights file that cannot be read safely is
one line naming it, never torch's advice to pass weights_only=False."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mmcl.cli import main
from mmcl.config import ExperimentConfig, model_config, save_yaml
from mmcl.engine.checkpoint import save_model
from mmcl.inference import find_weights, load_pipeline
from mmcl.models import build_model

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    cfg = ExperimentConfig(model=model_config("clip-tiny"))
    model = build_model(cfg.model).eval()
    folder = tmp_path / "run"
    (folder / "final").mkdir(parents=True)
    save_yaml(cfg, folder / "config.yaml")
    save_model(model, folder / "final" / "model.safetensors")
    return folder, model


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt", ["hf", "open_clip"])
@pytest.mark.parametrize("inside", ["", "exported"])
def test_export_into_a_run_folder_is_refused_in_one_line(run, capsys, fmt: str, inside: str) -> None:
    folder, _ = run
    before = _files(folder)
    out = folder / inside if inside else folder
    assert main(["export", fmt, str(folder), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run folder" in err, err
    assert _files(folder) == before  # nothing written into the run


def test_a_stray_weights_file_never_shadows_the_runs_own(run, tmp_path: Path) -> None:
    folder, model = run
    torch.manual_seed(1)
    other = build_model(model_config("clip-tiny-64"))  # another architecture, as `export hf RUN RUN` once wrote
    save_model(other, folder / "model.safetensors")
    weights, cfg = find_weights(folder)
    assert weights == folder / "final" / "model.safetensors" and cfg == folder / "config.yaml"
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            load_pipeline(folder, device="cpu").encode_images(pixels), model.encode_image(pixels)
        )
    # a run with checkpoints only: the newest checkpoint, still not the stray file
    (folder / "final" / "model.safetensors").rename(tmp_path / "moved.safetensors")
    (folder / "final").rmdir()
    step = folder / "checkpoints" / "step_0000010"
    step.mkdir(parents=True)
    (tmp_path / "moved.safetensors").rename(step / "model.safetensors")
    (step / "trainer.json").write_text(json.dumps({"step": 10}))
    assert find_weights(folder)[0] == step / "model.safetensors"
