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


def _without_paths(cfg: dict) -> dict:
    for section, key in (("data", "train_shards"), ("eval", "shards"), ("eval", "classnames"), ("train", "output_dir")):
        cfg[section].pop(key)
    return cfg


def test_the_binding_recipe_is_the_demo_recipe():
    """configs/recipes/binding.yaml documents the demo's recipe: the same config but for where the data and run live
    (the built-in counterfactual shards there, the demo's own folder here)."""
    recipe = to_dict(load_experiment(ROOT / "configs" / "recipes" / "binding.yaml"))
    assert recipe["data"]["train_shards"] == ["builtin:shapes-cf/train"]  # the built-in data with counterfactuals
    assert _without_paths(recipe) == _without_paths(to_dict(demo_config(DemoSettings())))


def test_report_shows_what_the_recipe_buys_as_the_benchmark_measured_it():
    """The demo report's comparison comes from the file shipped with the recipe, which holds the benchmark's
    published means (bench/results/binding.json), labelled as measured by the benchmark, not by the run."""
    from mmcl.demo import MEASURED, MEASURED_ROWS, recipe_comparison_lines

    shipped = json.loads((ROOT / "configs" / MEASURED).read_text())
    bench = {r["config"]: r for r in json.loads((ROOT / "bench" / "results" / "binding.json").read_text())["summary"]}
    assert {"recipe", "clip-cnn"} <= set(shipped["columns"])
    for config, metrics in shipped["metrics"].items():
        for name, value in metrics.items():
            assert value["mean"] == round(bench[config][name]["mean"], 4) and value["n"] == bench[config][name]["n"]
    lines = recipe_comparison_lines()
    text = "\n".join(lines)
    assert "measured by the benchmark, not by this run" in text and shipped["command"] in text
    top1 = next(line for line in lines if line.startswith(f"| {MEASURED_ROWS['top1']} |"))
    assert f"{shipped['metrics']['recipe']['top1']['mean']:.1%}" in top1


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
    # the recipe's counterfactual scenes were written with the shards and reached the loss
    assert sorted((s.data / "train").glob("*.tar")) and all(r["cf_rate"] > 0.5 for r in rows if "cf_rate" in r)
    assert any("cf_rate" in r for r in rows)
    assert "measured by the benchmark, not by this run" in report  # what the recipe buys over plain CLIP
