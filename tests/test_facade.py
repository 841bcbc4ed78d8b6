"""The Python facade (issue 19): `import mmcl` stays light; `mmcl.load` takes any model mmcl reads;
`Pipeline.classify` gives the probabilities transformers' zero-shot pipeline gives."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent / "models"))
from hf_helpers import write_tiny_hf  # noqa: E402

import mmcl  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
LABELS = ["red circle", "blue square", "green star"]


def test_import_mmcl_does_not_import_torch() -> None:
    code = (
        "import sys, mmcl; mmcl.list_presets(); print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_list_presets_names_the_bundled_presets() -> None:
    from mmcl.config import model_config

    presets = mmcl.list_presets()
    assert {"clip-tiny", "siglip-tiny", "joint-tiny"} <= set(presets)
    assert model_config(presets[0]).arch  # every name is a loadable preset
    assert "Pipeline" in dir(mmcl) and mmcl.Pipeline.__name__ == "Pipeline"


def test_load_and_classify_match_the_transformers_pipeline(tmp_path: Path) -> None:
    from transformers import pipeline

    folder = write_tiny_hf(tmp_path / "siglip", "siglip")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))  # not square
    image.save(tmp_path / "img.png")
    pipe = mmcl.load(folder, device="cpu")
    probs = pipe.classify([image, str(tmp_path / "img.png")], LABELS, templates="This is a photo of {}.")
    assert probs.shape == (2, 3)
    torch.testing.assert_close(probs[0], probs[1])  # a file reads as the same image
    theirs = pipeline("zero-shot-image-classification", model=str(folder), device="cpu")(
        image, candidate_labels=LABELS, hypothesis_template="This is a photo of {}."
    )
    by_label = {r["label"]: r["score"] for r in theirs}
    np.testing.assert_allclose(probs[0].numpy(), [by_label[x] for x in LABELS], atol=1e-5)


def test_classify_of_a_clip_run_sums_to_one(tmp_path: Path) -> None:
    folder = write_tiny_hf(tmp_path / "clip", "clip")
    probs = mmcl.load(folder, device="cpu").classify(Image.new("RGB", (50, 30), "red"), LABELS, templates="openai")
    assert probs.shape == (1, 3) and float(probs.sum()) == pytest.approx(1.0, abs=1e-5)
