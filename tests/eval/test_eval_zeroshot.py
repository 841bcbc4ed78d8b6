import math

import pytest
import torch
import torch.nn.functional as F
from clip_benchmark.metrics import zeroshot_classification as cb
from eval_helpers import HashTextEncoder, TableImageEncoder, index_image
from sklearn.metrics import confusion_matrix

from mmcl.eval.datasets import EvalSample
from mmcl.eval.runner import run_zero_shot
from mmcl.eval.zeroshot import build_classifier, zero_shot_eval
from mmcl.utils import UserError


class FakeClip(torch.nn.Module):
    """CLIP_benchmark's model interface over fixed tables: images and texts are passed as row indices."""

    def __init__(self, image_table, text_encoder, vocab):
        super().__init__()
        self.image_table, self.text_encoder, self.vocab = image_table, text_encoder, vocab

    def encode_image(self, idx):
        return self.image_table[idx]

    def encode_text(self, idx):
        return self.text_encoder([self.vocab[i] for i in idx.tolist()])


class Tokenizer:
    def __init__(self):
        self.vocab = []

    def __call__(self, texts):
        self.vocab.extend(texts)
        return torch.arange(len(self.vocab) - len(texts), len(self.vocab))


class Loader(list):
    """A list of (images, labels) batches with the `.dataset.classes` CLIP_benchmark reads."""

    def __init__(self, batches, classes):
        super().__init__(batches)
        self.dataset = type("D", (), {"classes": classes})()


def cb_accuracy(output, target, topk):
    """`clip_benchmark...accuracy` line for line, but `.item()` where it calls `float(ndarray of shape (1,))`,
    which numpy >= 2.4 rejects (so `cb.evaluate` itself cannot run here)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum(0, keepdim=True).item() / len(target) for k in topk]


def clip_benchmark_metrics(image_feats, labels, classnames, templates, text_encoder, batch=17):
    """The body of `clip_benchmark.metrics.zeroshot_classification.evaluate` (single-label branch)."""
    tok = Tokenizer()
    model = FakeClip(image_feats, text_encoder, tok.vocab)
    idx = torch.arange(len(labels))
    batches = [(idx[i : i + batch], labels[i : i + batch]) for i in range(0, len(labels), batch)]
    cb_templates = [t.replace("{}", "{c}") for t in templates]
    classifier = cb.zero_shot_classifier(model, tok, classnames, cb_templates, "cpu", amp=False)
    logits, target = cb.run_classification(model, classifier, Loader(batches, classnames), "cpu", amp=False)
    if len(classnames) >= 5:
        acc1, acc5 = cb_accuracy(logits, target, topk=(1, 5))
    else:
        (acc1,), acc5 = cb_accuracy(logits, target, topk=(1,)), float("nan")
    return {
        "acc1": acc1,
        "acc5": acc5,
        "mean_per_class_recall": cb.balanced_accuracy_score(target, logits.argmax(axis=1)),
    }


def test_classifier_matches_clip_benchmark():
    enc = HashTextEncoder(12)
    names, templates = ["cat", "dog", "tiny fox"], ["a photo of a {}.", "{}", "art of the {}"]
    ours = build_classifier(enc, names, templates, batch_size=4)  # batches cut across classes
    tok = Tokenizer()
    ref = cb.zero_shot_classifier(
        FakeClip(None, enc, tok.vocab), tok, names, [t.replace("{}", "{c}") for t in templates], "cpu", amp=False
    )
    assert ours.shape == (12, 3)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.norm(dim=0), torch.ones(3))


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("n_classes", [3, 10])
def test_metrics_match_clip_benchmark(n_classes):
    torch.manual_seed(n_classes)
    names = [f"class {i}" for i in range(n_classes)]
    templates = ["a photo of a {}.", "a drawing of the {}."]
    enc = HashTextEncoder(16)
    classifier = build_classifier(enc, names, templates)
    n = 300
    labels = torch.randint(0, n_classes, (n,))
    labels[labels == 1] = 0  # class 1 absent: mean per-class recall is over present classes only
    # images near their class embedding, noisy enough that top-1 is far from perfect
    feats = F.normalize(classifier.t()[labels] + 0.45 * torch.randn(n, 16), dim=-1)
    ours = zero_shot_eval(feats, labels, classifier)
    ref = clip_benchmark_metrics(feats, labels, names, templates, enc)
    assert 0.2 < ours["top1"] < 0.95
    assert ours["top1"] == pytest.approx(ref["acc1"], abs=1e-12)
    assert ours["mean_per_class_recall"] == pytest.approx(ref["mean_per_class_recall"], abs=1e-12)
    if n_classes >= 5:
        assert ours["top5"] == pytest.approx(ref["acc5"], abs=1e-12)
        assert ours["top5"] > ours["top1"]
    else:
        assert "top5" not in ours and math.isnan(ref["acc5"])
    pred = ours["predictions"]
    assert torch.equal(ours["confusion"], torch.as_tensor(confusion_matrix(labels, pred, labels=range(n_classes))))
    assert math.isnan(ours["per_class_recall"][1])
    assert ours["topk"].shape == (n, min(5, n_classes))
    assert torch.equal(ours["topk"][:, 0], pred)


def test_perfect_and_bad_inputs():
    classifier = F.normalize(torch.randn(8, 6), dim=0)
    labels = torch.arange(6).repeat(3)
    out = zero_shot_eval(classifier.t()[labels], labels, classifier)
    assert out["top1"] == out["top5"] == out["mean_per_class_recall"] == 1.0
    assert torch.equal(out["confusion"], 3 * torch.eye(6, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must lie"):
        zero_shot_eval(classifier.t()[labels], labels + 1, classifier)


def _dataset(labels):
    return [EvalSample(key=f"k{i}", image=index_image(i), label=int(y)) for i, y in enumerate(labels)]


def test_run_zero_shot_end_to_end_equals_library_and_clip_benchmark():
    torch.manual_seed(0)
    names, templates = [f"thing {i}" for i in range(6)], ["a {}", "the {} itself"]
    enc = HashTextEncoder(10)
    classifier = build_classifier(enc, names, templates)
    labels = torch.randint(0, 6, (45,))
    feats = F.normalize(classifier.t()[labels] + 0.5 * torch.randn(45, 10), dim=-1)
    images = TableImageEncoder(feats)
    res = run_zero_shot(images, enc, _dataset(labels), names, templates, batch_size=8, text_batch_size=5)
    assert images.calls == 6  # ceil(45 / 8)
    direct = zero_shot_eval(feats, labels, classifier)
    ref = clip_benchmark_metrics(feats, labels, names, templates, enc)
    assert res["metrics"]["top1"] == direct["top1"] == pytest.approx(ref["acc1"], abs=1e-12)
    assert res["metrics"]["mean_per_class_recall"] == pytest.approx(ref["mean_per_class_recall"], abs=1e-12)
    assert res["metrics"]["n_samples"] == 45
    assert [p["pred"] for p in res["predictions"]] == direct["predictions"].tolist()
    assert len(res["examples"]) == 8
    ex = res["examples"][3]
    assert ex["label"] == names[labels[3]] and ex["correct"] == (ex["label"] == ex["pred"])

    short = run_zero_shot(images, enc, _dataset(labels), names, templates, batch_size=8, max_samples=10)
    assert short["metrics"]["n_samples"] == 10


def test_run_zero_shot_with_transform_passes_tensors():
    enc = HashTextEncoder(4)
    seen = []

    def encode(x):
        seen.append(type(x))
        return torch.randn(x.shape[0], 4)

    res = run_zero_shot(encode, enc, _dataset([0, 1, 1]), ["a", "b"], ["{}"], transform=lambda im: torch.zeros(3, 8, 8))
    assert seen == [torch.Tensor] and res["metrics"]["n_samples"] == 3


def test_unlabelled_sample_is_a_user_error():
    data = [EvalSample(key="x", image=index_image(0))]
    with pytest.raises(UserError, match="sample x has no label"):
        run_zero_shot(TableImageEncoder(torch.randn(1, 4)), HashTextEncoder(4), data, ["a"], ["{}"])


def test_zero_shot_from_eval_config(tmp_path):
    from eval_helpers import labelled_members, write_tar

    from mmcl.config import EvalConfig
    from mmcl.eval.runner import zero_shot_from_config

    write_tar(tmp_path / "0.tar", labelled_members(list(range(7)), [i % 2 for i in range(7)], how="cls"))
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    cfg = EvalConfig(
        shards=[str(tmp_path / "0.tar")],
        classnames=str(tmp_path / "names.txt"),
        templates="short",
        max_samples=5,
        batch_size=2,
    )
    enc, images = HashTextEncoder(6), TableImageEncoder(F.normalize(torch.randn(7, 6), dim=-1))
    res = zero_shot_from_config(cfg, images, enc)
    assert res["metrics"]["n_samples"] == 5 and res["n_templates"] == 7 and images.calls == 3
    assert res["classnames"] == ["cat", "dog"]
    with pytest.raises(UserError, match="eval.classnames is not set"):
        zero_shot_from_config(EvalConfig(shards=[str(tmp_path / "0.tar")]), images, enc)
