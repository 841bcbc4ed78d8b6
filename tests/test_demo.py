"""The demo end to end, which is also the CLIP learning test: a tiny CLIP trained for about a minute
of CPU on the built-in shapes classifies the held-out split zero-shot far above chance."""

from __future__ import annotations

import json
from pathlib import Path

from mmcl.config import load_experiment, to_dict
from mmcl.demo import DemoSettings, demo_config, run_demo

ROOT = Path(__file__).resolve().parents[1]


def test_configs_clip_demo_yaml_is_the_demo_recipe():
    assert to_dict(load_experiment(ROOT / "configs" / "clip" / "demo.yaml")) == to_dict(demo_config(DemoSettings()))


def test_demo_learns_and_reports(tmp_path):
    s = DemoSettings(out=tmp_path / "run", data=tmp_path / "data", n_train=6000, n_val=400, steps=150)
    results = run_demo(s, ["train.eval_every=50", "eval.max_samples=400", "train.progress=false"])
    chance = 1 / results["n_classes"]
    assert results["n_classes"] == 40
    assert results["zeroshot"]["top1"] > 4 * chance, results  # chance 2.5%
    assert results["retrieval"]["t2i_recall@5"] > 4 * 5 / 400, results  # chance: 5 of 400 images
    run = s.out
    for name in (
        "REPORT.md",
        "curves.png",
        "eval/zeroshot/confusion.png",
        "eval/zeroshot/examples.png",
        "eval/retrieval/eval.json",
        "eval/compositional/eval.json",
        "index/manifest.json",
        "final/model.safetensors",
    ):
        assert (run / name).is_file(), name
    report = (run / "REPORT.md").read_text()
    assert "zero-shot top-1" in report and f"mmcl app {run}" in report
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_zeroshot_top1"] for r in rows if "eval_zeroshot_top1" in r]
    assert len(evals) == 3 and evals[-1] > evals[0]  # the eval hook ran every 50 steps and accuracy rose
    assert "chance is 50%" in report and "| replace_colour |" in report  # the compositional table
    assert all("eval_compo_mean" in r for r in rows if "eval_zeroshot_top1" in r)  # and the hook's pairs
