import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clip_benchmark.metrics import zeroshot_retrieval as cbr
from eval_helpers import HashTextEncoder, TableImageEncoder, index_image

from mmcl.eval.alignment import alignment_uniformity
from mmcl.eval.datasets import EvalSample
from mmcl.eval.retrieval import retrieval_eval, top_texts
from mmcl.eval.runner import run_retrieval


def _data(n_img=60, dim=16, noise=1.2, seed=0, max_caps=5):
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n_img, dim, generator=g), dim=-1)
    caps = torch.randint(1, max_caps + 1, (n_img,), generator=g)
    t2i = torch.repeat_interleave(torch.arange(n_img), caps)
    texts = F.normalize(images[t2i] + noise * torch.randn(len(t2i), dim, generator=g) / math.sqrt(dim), dim=-1)
    return images, texts, t2i


def _brute_force_ranks(images, texts, t2i):
    """1-based rank of the first positive in a fully sorted list (no ties in random data)."""
    s = texts @ images.t()
    pos = torch.zeros_like(s, dtype=torch.bool)
    pos[torch.arange(len(t2i)), t2i] = True

    def first_hit(scores, positives):
        order = scores.argsort(dim=1, descending=True)
        return positives.gather(1, order).float().argmax(dim=1) + 1

    return first_hit(s.t(), pos.t()), first_hit(s, pos)


class FakeModel:
    def __init__(self, images, texts):
        self.images, self.texts = images, texts

    def encode_image(self, idx):
        return self.images[idx]

    def encode_text(self, idx):
        return self.texts[idx]


def clip_benchmark_recalls(images, texts, t2i, ks, batch=13):
    """Run `clip_benchmark.metrics.zeroshot_retrieval.evaluate` on fixed embeddings (row indices as inputs)."""
    captions = [[] for _ in range(len(images))]
    for t, i in enumerate(t2i.tolist()):
        captions[i].append(t)
    batches = [
        (torch.arange(lo, min(lo + batch, len(images))), captions[lo : lo + batch])
        for lo in range(0, len(images), batch)
    ]
    return cbr.evaluate(
        FakeModel(images, texts), batches, lambda ts: torch.tensor(ts), "cpu", amp=False, recall_k_list=list(ks)
    )


@pytest.mark.parametrize("max_caps", [1, 5])
def test_recall_matches_clip_benchmark(max_caps):
    images, texts, t2i = _data(max_caps=max_caps)
    ks = (1, 5, 10)
    ours = retrieval_eval(images, texts, t2i, ks=ks, chunk_size=16)
    ref = clip_benchmark_recalls(images, texts, t2i, ks)
    for k in ks:
        # CLIP_benchmark: "image_retrieval" = text query -> image, "text_retrieval" = image query -> texts
        assert ours[f"t2i_recall@{k}"] == pytest.approx(ref[f"image_retrieval_recall@{k}"], abs=1e-7)
        assert ours[f"i2t_recall@{k}"] == pytest.approx(ref[f"text_retrieval_recall@{k}"], abs=1e-7)
    assert 0.1 < ours["t2i_recall@1"] < 0.9  # a non-trivial regime: the comparison can fail
    assert ours["n_texts"] == len(t2i) and ours["n_images"] == 60


def test_ranks_match_brute_force_and_open_clip_median():
    images, texts, t2i = _data(n_img=41, seed=3)
    out = retrieval_eval(images, texts, t2i, chunk_size=10, return_ranks=True)
    i2t, t2i_ranks = _brute_force_ranks(images, texts, t2i)
    assert torch.equal(out["i2t_ranks"], i2t) and torch.equal(out["t2i_ranks"], t2i_ranks)
    # open_clip get_clip_metrics: floor(median(0-based ranks)) + 1, mean + 1
    assert out["t2i_median_rank"] == np.floor(np.median(t2i_ranks.numpy() - 1)) + 1
    assert out["i2t_mean_rank"] == pytest.approx(i2t.double().mean().item())
    assert out["rsum"] == pytest.approx(100 * sum(out[f"{d}_recall@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))


def test_chunked_equals_unchunked_exactly():
    images, texts, t2i = _data(n_img=40, seed=1)
    full = retrieval_eval(images, texts, t2i, chunk_size=10_000, return_ranks=True)
    for chunk in (3, 7, 32):
        part = retrieval_eval(images, texts, t2i, chunk_size=chunk, return_ranks=True)
        assert torch.equal(part.pop("i2t_ranks"), full["i2t_ranks"])
        assert torch.equal(part.pop("t2i_ranks"), full["t2i_ranks"])
        assert part == {k: v for k, v in full.items() if not k.endswith("_ranks")}


def test_collapsed_embeddings_score_worst_not_best():
    images, texts, t2i = torch.ones(20, 4) / 2, torch.ones(40, 4) / 2, torch.arange(20).repeat(2)
    out = retrieval_eval(images, texts, t2i)
    assert out["t2i_recall@1"] == 0.0 and out["i2t_recall@1"] == 0.0
    assert out["t2i_median_rank"] == 20 and out["i2t_median_rank"] == 39


def test_perfect_retrieval_and_errors():
    images = torch.eye(6)
    out = retrieval_eval(images, torch.eye(6).repeat(2, 1), torch.arange(6).repeat(2))
    assert out["i2t_recall@1"] == out["t2i_recall@1"] == 1.0 and out["t2i_median_rank"] == 1
    with pytest.raises(ValueError, match="image 5 has no text"):
        retrieval_eval(images, torch.eye(6)[:5], torch.arange(5))
    with pytest.raises(ValueError, match="shape"):
        retrieval_eval(images, torch.eye(6), torch.arange(5))


def test_twenty_thousand_items_never_allocate_n_by_n():
    """20k x 20k scores would be 1.6 GB; every single allocation must stay at block size."""
    n, chunk = 20_000, 2048
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(n, 8, generator=g), dim=-1)
    texts = F.normalize(images + 0.3 * torch.randn(n, 8, generator=g), dim=-1)
    from torch.profiler import ProfilerActivity, profile

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI box is shared: 2 threads on a loaded 2-core machine run ~10x slower
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = retrieval_eval(images, texts, torch.arange(n), ks=(1, 10), chunk_size=chunk)
    finally:
        torch.set_num_threads(threads)
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < biggest <= 8 * chunk * chunk  # at most one (chunk, chunk) int64 block; N x N float32 is 1.6e9
    assert 0.0 < out["t2i_recall@1"] < out["t2i_recall@10"] < 1.0


def test_top_texts_merges_chunks():
    images, texts, _ = _data(n_img=10, seed=2)
    s, i = top_texts(images, texts, k=3, chunk_size=4)
    ref_s, ref_i = (images @ texts.t()).topk(3, dim=1)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(s, ref_s)


def test_run_retrieval_end_to_end():
    images, _, _ = _data(n_img=12, seed=4)
    captions = [[f"image {i} caption {j}" for j in range(1 + i % 3)] for i in range(12)]
    table = {c: images[i] + 0.8 * torch.randn(16) for i, cs in enumerate(captions) for c in cs}
    dataset = [EvalSample(key=f"k{i}", image=index_image(i), captions=c) for i, c in enumerate(captions)]
    dataset.insert(5, EvalSample(key="no-caption", image=index_image(99)))  # skipped: nothing to retrieve
    enc = HashTextEncoder(16, table)
    res = run_retrieval(
        TableImageEncoder(F.pad(images, (0, 0, 0, 100))), enc, dataset, batch_size=5, text_batch_size=7, num_examples=3
    )
    texts = enc([c for cs in captions for c in cs])
    t2i = torch.tensor([i for i, cs in enumerate(captions) for _ in cs])
    assert res["metrics"] == {**retrieval_eval(images, texts, t2i), **alignment_uniformity(images, texts, t2i)}
    assert [ex["key"] for ex in res["examples"]] == ["k0", "k1", "k2"]
    top = (images[1] @ texts.t()).argmax().item()
    assert res["examples"][1]["retrieved"][0]["correct"] == (t2i[top].item() == 1)
