import json

import torch
import torch.nn.functional as F
from eval_helpers import HashTextEncoder, TableImageEncoder, index_image
from PIL import Image

from mmcl.eval.datasets import EvalSample
from mmcl.eval.report import write_report
from mmcl.eval.runner import run_captioning, run_retrieval, run_zero_shot


def _assert_png(path):
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100


def _no_temp_files(folder):
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_zero_shot_report(tmp_path):
    torch.manual_seed(0)
    names = ["cat", "dog", "bird"]
    labels = [0, 0, 1, 1, 1, 0, 2, 2, 2, 1]  # class 2 and others; confusions guaranteed by the features below
    feats = F.normalize(torch.randn(10, 8), dim=-1)
    data = [EvalSample(key=f"img{i}", image=index_image(i, 32), label=y) for i, y in enumerate(labels)]
    res = run_zero_shot(TableImageEncoder(feats), HashTextEncoder(8), data, names, ["a {}"], num_examples=5)
    written = write_report(res, tmp_path / "out", title="zs", settings={"model": "fake"})
    assert set(written) == {
        "eval.json",
        "eval.md",
        "predictions.jsonl",
        "confusion.csv",
        "confusion.png",
        "examples.png",
    }
    summary = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert summary["metrics"] == res["metrics"] and summary["task"] == "zeroshot"
    assert summary["settings"] == {"model": "fake"}
    assert list(summary["per_class_recall"]) == names
    preds = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [p["pred"] for p in preds] == [p["pred"] for p in res["predictions"]]
    rows = (tmp_path / "out" / "confusion.csv").read_text().splitlines()
    assert rows[0].split(",")[1:] == names
    assert sum(int(x) for r in rows[1:] for x in r.split(",")[1:]) == 10
    md = (tmp_path / "out" / "eval.md").read_text()
    assert md.startswith("# zs") and "| top1 |" in md and "Per-class recall" in md
    _assert_png(written["confusion.png"])
    _assert_png(written["examples.png"])
    _no_temp_files(tmp_path / "out")


def test_nan_recall_becomes_null(tmp_path):
    names = ["a", "b"]
    data = [EvalSample(key="x", image=index_image(0), label=0)]
    res = run_zero_shot(TableImageEncoder(torch.ones(1, 4)), HashTextEncoder(4), data, names, ["{}"])
    write_report(res, tmp_path)
    assert json.loads((tmp_path / "eval.json").read_text())["per_class_recall"]["b"] is None


def test_retrieval_and_caption_reports(tmp_path):
    torch.manual_seed(1)
    feats = F.normalize(torch.randn(6, 8), dim=-1)
    data = [
        EvalSample(key=f"k{i}", image=index_image(i, 24), captions=[f"photo {i}", f"picture {i}"]) for i in range(6)
    ]
    res = run_retrieval(TableImageEncoder(feats), HashTextEncoder(8), data, ks=(1, 5))
    written = write_report(res, tmp_path / "ret")
    assert set(written) == {"eval.json", "eval.md", "examples.png"}
    md = written["eval.md"].read_text()
    assert "| image -> text |" in md and "R@5 (%)" in md
    assert json.loads(written["eval.json"].read_text())["metrics"]["i2t_recall@1"] == res["metrics"]["i2t_recall@1"]
    _assert_png(written["examples.png"])

    res = run_captioning(lambda ims: [f"photo {ims[0].size[0]}"] * len(ims), data, batch_size=4)
    written = write_report(res, tmp_path / "cap")
    assert set(written) == {"eval.json", "eval.md", "predictions.jsonl", "examples.png"}
    assert "| cider_d |" in written["eval.md"].read_text()
    lines = written["predictions.jsonl"].read_text().splitlines()
    assert json.loads(lines[0]) == {"key": "k0", "prediction": "photo 24", "references": ["photo 0", "picture 0"]}
    _assert_png(written["examples.png"])
    _no_temp_files(tmp_path / "cap")


def test_compositional_examples_say_they_show_failures(tmp_path, monkeypatch):
    import mmcl.eval.report as report

    titles = []
    monkeypatch.setattr(report, "_png", lambda fig, path: titles.append(fig.get_suptitle()))
    ex = {"key": "a.jpg", "image": index_image(0, 32), "subset": "replace_att", "caption": "a red bus",
          "negative": "a blue bus", "correct": False}  # fmt: skip
    report.plot_examples({"task": "compositional", "examples": [ex]}, tmp_path / "examples.png")
    assert "first failure" in titles[0] and "negative" in titles[0], titles
    report.plot_examples({"task": "zeroshot", "examples": [{**ex, "label": "a", "pred": "b"}]}, tmp_path / "z.png")
    assert titles[1] == ""  # a plain sample needs no such note


def test_eval_progress_in_a_log_file_has_no_bar(capsys):
    """stderr redirected to a file (pytest's capture is not a terminal): no tqdm carriage returns."""
    from mmcl.eval.runner import iterate_batches

    data = [EvalSample(key=f"img{i}", image=index_image(i, 8), label=0) for i in range(6)]
    assert sum(len(b) for b in iterate_batches(data, 2, progress=True)) == 6
    err = capsys.readouterr().err
    assert "\r" not in err and "img/s" not in err, repr(err)
