"""CMC's colour split (Tian et al. 2019): the Lab conversion against the CIE definition's known values, the L and
ab halves as the module says, and the term with L and ab among its views against a plain loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmcl.config import load_experiment
from mmcl.data.batch import Batch
from mmcl.losses.cmc import lab_split, lab_to_rgb, rgb_to_lab
from mmcl.models import build_model
from mmcl.tasks import build_task


def _task(terms: str):
    torch.manual_seed(0)
    cfg = load_experiment(None, ["model.preset=clip-tiny", f"loss.terms={terms}"])
    return build_task(build_model(cfg.model), cfg)


def _pixel(r: float, g: float, b: float) -> torch.Tensor:
    return torch.tensor([r, g, b], dtype=torch.float64).view(3, 1, 1)


def test_lab_matches_the_cie_values_and_round_trips() -> None:
    white, red, grey = (rgb_to_lab(_pixel(*c)).flatten() for c in ((1, 1, 1), (1, 0, 0), (0.5, 0.5, 0.5)))
    torch.testing.assert_close(white, torch.tensor([100.0, 0, 0], dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(red, torch.tensor([53.24, 80.09, 67.20], dtype=torch.float64), atol=0.02, rtol=0)
    assert grey[0].item() == pytest.approx(53.39, abs=0.02) and grey[1:].abs().max() < 1e-3
    rgb = torch.rand(2, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lab_to_rgb(rgb_to_lab(rgb)), rgb, atol=1e-6, rtol=0)


def test_lab_split_keeps_lightness_in_one_half_and_colour_in_the_other() -> None:
    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    rgb = 0.35 + 0.3 * torch.rand(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))  # in gamut at L = 50
    lightness, colour = lab_split((rgb - m) / s, mean, std)
    grey, chroma = lightness * s + m, colour * s + m  # back to RGB
    assert (grey.amax(1) - grey.amin(1)).abs().max() < 1e-4  # L: R = G = B, the lightness replicated
    lab, lab_l, lab_ab = rgb_to_lab(rgb), rgb_to_lab(grey), rgb_to_lab(chroma)
    torch.testing.assert_close(lab_l[:, 0], lab[:, 0], atol=1e-2, rtol=0)  # the image's lightness ...
    assert lab_l[:, 1:].abs().max() < 1e-2  # ... and no colour
    torch.testing.assert_close(lab_ab[:, 1:], lab[:, 1:], atol=2e-2, rtol=0)  # the image's colour ...
    torch.testing.assert_close(lab_ab[:, 0], torch.full_like(lab[:, 0], 50.0), atol=1e-2, rtol=0)  # at L 50


def _info_nce_loop(a: torch.Tensor, b: torch.Tensor, t: float) -> float:
    n, total = a.shape[0], 0.0
    for x, y in ((a, b), (b, a)):
        for i in range(n):
            logits = [float(x[i].dot(y[j])) / t for j in range(n)]
            total -= logits[i] - math.log(sum(math.exp(v) for v in logits))
    return total / (2 * n)


@pytest.mark.parametrize("graph", ["full", "core"])
def test_cmc_with_the_colour_split_matches_a_loop(graph: str) -> None:
    task = _task(f"[{{name: cmc, image_views: 1, colour_split: true, graph: {graph}, core: L, temperature: 0.1}}]")
    term = task.terms["cmc"]
    names = ["image", "text", "view1", "L", "ab"]
    assert term.view_names() == names and set(term.batch_features) == {"image_features", "text_features",
                                                                       "view1", "L", "ab"}  # fmt: skip
    assert set(term.views(task.model)) == {"view1", "colour"}  # L and ab come from one loaded view
    g = torch.Generator().manual_seed(2)
    rows = {n: F.normalize(torch.randn(4, 8, generator=g, dtype=torch.float64), dim=-1) for n in names}
    feats = {"image_features": rows["image"], "text_features": rows["text"], **{n: rows[n] for n in names[2:]}}
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]] if graph == "full" else [
        ("L", b) for b in names if b != "L"]  # fmt: skip
    assert len(pairs) == (10 if graph == "full" else 4)
    ref = sum(_info_nce_loop(rows[a], rows[b], 0.1) for a, b in pairs) / len(pairs)
    assert term(feats, None)["loss"].item() == pytest.approx(ref, rel=1e-9)


def test_cmc_encodes_the_lab_halves_of_the_colour_view() -> None:
    task = _task("[{name: cmc, image_views: 1, colour_split: true}]")
    task.eval()
    pre = task.model.preprocess_cfg()
    size = pre["image_size"]
    g = torch.Generator().manual_seed(3)
    views = {"view1": torch.randn(3, 3, size, size, generator=g), "colour": torch.randn(3, 3, size, size, generator=g)}
    feats = task.terms["cmc"].features(task.model, Batch(views=views), {})
    lightness, colour = lab_split(views["colour"], pre["mean"], pre["std"])
    for name, images in (("view1", views["view1"]), ("L", lightness), ("ab", colour)):
        torch.testing.assert_close(feats[name], task.model.encode_image(images), atol=1e-5, rtol=1e-4, msg=name)
    assert not torch.allclose(feats["L"], feats["ab"])


def test_the_shipped_cmc_lab_config_builds_its_views() -> None:
    from pathlib import Path

    cfg = load_experiment(Path(__file__).resolve().parents[2] / "configs/objectives/cmc-lab.yaml", [])
    task = build_task(build_model(cfg.model), cfg)
    assert {"cmc/colour"} <= set(task.views()) and task.terms["cmc"].options.colour_split
