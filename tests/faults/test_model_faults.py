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
from mmcl.inference import load_pipeline
from mmcl.models import build_model
from mmcl.run_folder import find_weights

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


# ---- weights files that cannot be read safely: one line, naming the file (issue 24 item 14)


class _Evil:
    """Unpickling it would run a shell command that creates `MARKER`."""

    marker = ""

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _fuzz_files(folder: Path, marker: Path) -> list[Path]:
    """200 files: random bytes (.bin/.pt/.safetensors), truncated torch and safetensors files, legacy-format
    torch files cut short, and hostile pickles (plain, inside torch's zip, and in the legacy format)."""
    import pickle
    import random

    from safetensors.torch import save

    rng = random.Random(0)
    folder.mkdir()
    good_state = {"w": torch.randn(8, 8), "b": torch.zeros(8)}
    torch.save(good_state, folder / "good.pt")
    zipped = (folder / "good.pt").read_bytes()
    torch.save(good_state, folder / "legacy.pt", _use_new_zipfile_serialization=False)
    legacy = (folder / "legacy.pt").read_bytes()
    safet = save(good_state)
    _Evil.marker = str(marker)
    evil = _Evil()
    files: list[tuple[str, bytes]] = []
    for i in range(70):
        suffix = (".bin", ".pt", ".pth", ".safetensors")[i % 4]
        files.append((f"random{i}{suffix}", rng.randbytes(rng.randint(0, 4096))))
    for i in range(10):  # a plausible safetensors header length, then garbage
        n = rng.randint(1, 200)
        files.append((f"header{i}.safetensors", n.to_bytes(8, "little") + rng.randbytes(n)))
    for i in range(40):
        files.append((f"cut{i}.pt", zipped[: rng.randint(0, len(zipped) - 1)]))
    for i in range(25):
        files.append((f"cut{i}.safetensors", safet[: rng.randint(0, len(safet) - 1)]))
    for i in range(25):
        files.append((f"legacy_cut{i}.bin", legacy[: rng.randint(0, len(legacy) - 1)]))
    for i in range(10):
        files.append((f"evil_plain{i}.bin", pickle.dumps({"w": evil}, protocol=i % 5 + 1)))
    for i in range(10):
        path = folder / f"evil_zip{i}.bin"
        torch.save({"w": torch.ones(2), "x": evil} if i % 2 else evil, path, _use_new_zipfile_serialization=i < 5)
        files.append((path.name, path.read_bytes()))
    for i in range(10):  # a tensor-only pickle that is not a state dict, and plain data
        files.append((f"notdict{i}.pt", pickle.dumps([1, 2, 3] if i % 2 else "text", protocol=2)))
    out = []
    for name, data in files:
        (folder / name).write_bytes(data)
        out.append(folder / name)
    assert len(out) == 200
    return out


def test_fuzzed_weights_files_are_one_line_refusals(tmp_path: Path) -> None:
    from mmcl.models.weights_file import read_weights
    from mmcl.utils import UserError

    marker = tmp_path / "PWNED"
    files = _fuzz_files(tmp_path / "fuzz", marker)
    for file in files:
        with pytest.raises(UserError) as e:  # any other exception type fails the test
            read_weights(file)
        msg = str(e.value)
        assert "\n" not in msg and str(file) in msg and "not a readable, safe weights file" in msg, msg
        assert "weights_only" not in msg
        if file.name.startswith(("evil", "random")):
            assert ("could run code" in msg) == file.name.startswith("evil"), msg
    assert not marker.exists()  # no hostile pickle ran
    from mmcl.engine.checkpoint import safe_torch_load

    for file in files:  # the checkpoint reader (optimizer, RNG states) holds the same line for every non-safetensors
        if file.suffix == ".safetensors":
            continue
        with pytest.raises(UserError) as e:
            safe_torch_load(file)
        assert "\n" not in str(e.value) and "not a safe checkpoint" in str(e.value)
        assert "weights_only" not in str(e.value)
        if file.name.startswith("random"):  # random bytes are not called a hostile pickle
            assert "pickled objects other than tensors" not in str(e.value), str(e.value)
    assert not marker.exists()
    assert torch.equal(read_weights(tmp_path / "fuzz" / "good.pt")["w"], torch.load(tmp_path / "fuzz" / "good.pt")["w"])


@pytest.mark.parametrize("bad", ["hostile_bin", "random_safetensors"])
def test_init_from_a_transformers_folder_with_a_bad_weights_file(tmp_path: Path, demo_shards, capsys, bad: str) -> None:
    """`model.init_from` (and eval) of a transformers folder whose weights file is hostile or random bytes."""
    import pickle

    from hf_helpers import write_tiny_hf

    from mmcl.models.pretrained import pretrained_model_config
    from mmcl.utils import UserError

    folder = write_tiny_hf(tmp_path / "hf", "clip")
    marker = tmp_path / "PWNED"
    if bad == "hostile_bin":
        (folder / "model.safetensors").unlink()
        _Evil.marker = str(marker)
        bad_file = folder / "pytorch_model.bin"
        torch.save({"vision_model.embeddings.class_embedding": _Evil()}, bad_file)
    else:
        bad_file = folder / "model.safetensors"
        bad_file.write_bytes(pickle.dumps("not safetensors") * 50)
    with pytest.raises(UserError) as e:
        build_model(pretrained_model_config(folder))
    msg = str(e.value)
    assert "\n" not in msg and str(bad_file) in msg and "weights_only" not in msg, msg
    capsys.readouterr()
    assert main(["eval", "zeroshot", str(folder), "--shards", str(demo_shards / "val"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad_file) in err[0] and "weights_only" not in err[0], err
    assert not marker.exists()
