"""Winoground's text / image / group scores on counterfactual pairs, against a plain loop."""

import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import mmcl.cli
from mmcl.eval.group_scores import CHANCE, counterfactual_groups, run_group_scores


@pytest.fixture(scope="module")
def groups():
    return counterfactual_groups(40)


class Table:
    """Encoders looking up a vector per image (by its bytes) or caption; unknown ones get a seeded random one."""

    def __init__(self, dim=8, seed=0):
        self.dim, self.g, self.rows = dim, torch.Generator().manual_seed(seed), {}

    def vec(self, key):
        if key not in self.rows:
            self.rows[key] = torch.randn(self.dim, generator=self.g)
        return self.rows[key]

    def images(self, ims):
        return torch.stack([self.vec(im.tobytes()) for im in ims])

    def texts(self, texts):
        return torch.stack([self.vec(t) for t in texts])


def test_every_edit_is_present_and_an_aligned_model_scores_everything(groups):
    assert {g.subset for g in groups} == {
        "replace_colour",
        "replace_shape",
        "swap_att",
        "swap_obj",
        "change_count",
        "change_position",
    }
    t = Table()
    for g in groups:  # each image shares its caption's vector: a model that binds perfectly
        for im, cap in zip(g.images, g.captions):
            t.rows[im.tobytes()] = t.vec(cap)
    m = run_group_scores(t.images, t.texts, groups)["metrics"]
    assert all(m[f"mean_{k}"] == 1.0 for k in CHANCE) and m["n_groups"] == len(groups)


def test_scores_equal_a_plain_loop(groups):
    t = Table(seed=3)
    res = run_group_scores(t.images, t.texts, groups, batch_size=7, text_batch_size=5)
    tally = {}
    for g in groups:
        i = [F.normalize(t.vec(im.tobytes()), dim=0) for im in g.images]
        c = [F.normalize(t.vec(cap), dim=0) for cap in g.captions]
        s = [[float(i[a] @ c[b]) for b in range(2)] for a in range(2)]
        text = s[0][0] > s[0][1] and s[1][1] > s[1][0]
        image = s[0][0] > s[1][0] and s[1][1] > s[0][1]
        for k, ok in (("pair", s[0][0] > s[0][1]), ("text", text), ("image", image), ("group", text and image)):
            tally.setdefault((g.subset, k), []).append(ok)
    for (subset, k), oks in tally.items():
        assert res["metrics"][f"{subset}_{k}"] == pytest.approx(sum(oks) / len(oks))
    # a text-blind model (one vector for every caption) never wins a text comparison
    blind = run_group_scores(t.images, lambda texts: torch.ones(len(texts), 8), groups)["metrics"]
    assert blind["mean_text"] == 0.0 and blind["mean_group"] == 0.0


def test_counterfactual_command(monkeypatch, tmp_path, capsys):
    t = Table()
    pipeline = types.SimpleNamespace(encode_images=t.images, encode_texts=t.texts, can_encode=True)
    monkeypatch.setitem(sys.modules, "mmcl.inference", types.SimpleNamespace(load_pipeline=lambda path: pipeline))
    (tmp_path / "run").mkdir()
    rc = mmcl.cli.main(["eval", "compositional", str(tmp_path / "run"), "--counterfactuals", "12", "--quiet"])
    assert rc == 0
    summary = json.loads((tmp_path / "run" / "eval" / "counterfactual" / "eval.json").read_text())
    assert summary["metrics"]["n_groups"] > 12 and "mean_group" in summary["metrics"]
    out = capsys.readouterr().out
    assert "| subset | pair (50%) | text (25%) | image (25%) | group (16.7%) |" in out
