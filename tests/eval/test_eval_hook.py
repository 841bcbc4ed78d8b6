"""The trainer's eval hook: compositional metrics on the built-in shapes, off on request, absent elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from eval_helpers import labelled_members, write_tar

from mmcl.config import load_experiment
from mmcl.data.synthetic import CLASSNAMES
from mmcl.eval.compositional_shapes import SUBSETS
from mmcl.eval.hook import make_eval_hook
from mmcl.models import build_model
from mmcl.utils import UserError


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from mmcl.data.writer import write_synthetic_shards

    root = tmp_path_factory.mktemp("shapes")
    write_synthetic_shards(root / "val", 150, split="val", image_size=32, maxcount=75)
    (root / "val" / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    return root / "val"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(load_experiment(None, ["model.preset=clip-tiny"]).model).eval()


def hook_metrics(shards: Path, model: torch.nn.Module, *overrides: str) -> dict[str, float]:
    cfg = load_experiment(
        None, ["model.preset=clip-tiny", f"eval.shards=[{shards}]", "eval.templates=none", *overrides]
    )
    return make_eval_hook(cfg)(model, 0)


def test_hook_adds_compositional_metrics_on_the_shapes(shapes, model):
    metrics = hook_metrics(shapes, model, "eval.compositional_pairs=4")
    compo = {k: v for k, v in metrics.items() if k.startswith("compo_")}
    assert set(compo) == {f"compo_{s}" for s in SUBSETS} | {"compo_mean"}
    assert all(v in (0.0, 0.25, 0.5, 0.75, 1.0) for k, v in compo.items() if k != "compo_mean")  # 4 pairs each
    assert compo["compo_mean"] == pytest.approx(sum(compo[f"compo_{s}"] for s in SUBSETS) / len(SUBSETS))
    assert "zeroshot_top1" in metrics and "t2i_recall@1" in metrics


def test_hook_compositional_off_and_other_data(shapes, model, tmp_path):
    assert not any(k.startswith("compo_") for k in hook_metrics(shapes, model, "eval.compositional=never"))
    plain = tmp_path / "plain"
    write_tar(plain / "0.tar", labelled_members(list(range(6)), [i % 2 for i in range(6)]))
    (plain / "classnames.txt").write_text("cat\ndog\n")
    assert not any(k.startswith("compo_") for k in hook_metrics(plain / "0.tar", model))  # auto: no attributes
    with pytest.raises(UserError, match="no known attributes"):
        hook_metrics(plain / "0.tar", model, "eval.compositional=always")
