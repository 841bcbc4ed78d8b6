"""data.balance (MetaCLIP's long-tail balancing, mmcl.data.balance): the keep probability against a plain
computation, and a resumed training stream that caps head concepts, keeps the tail and skips the rest."""

from __future__ import annotations

import io
import itertools
import json
import math
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmcl.config import BalanceConfig, DataConfig
from mmcl.data.balance import BalancedDecoder, count_concepts, keep_probability, match
from mmcl.data.batch import Batch
from mmcl.data.pipeline import build_stream
from mmcl.data.shards import StreamState
from mmcl.utils import UserError

CONCEPTS = {"dog": 200, "cat": 100, "fish": 10}  # captions per concept in the shards: two heads and a tail


class FakeModel:
    def preprocess_cfg(self):
        return {"image_size": 16, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

    def tokenizer(self, texts):
        ids = torch.tensor([[len(t)] for t in texts])
        return ids, torch.ones_like(ids)


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 30, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def make_shards(root: Path) -> tuple[str, dict[str, str]]:
    """4 shards; each caption names exactly one concept (so a concept's expected count is exactly min(c, t))."""
    root.mkdir(parents=True)
    captions = [f"a photo of a {c} number {i}" for c, n in CONCEPTS.items() for i in range(n)]
    captions += ["nothing in the vocabulary here"] * 5
    image, by_key = _jpeg(), {}
    for s in range(4):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i, caption in enumerate(captions[s::4]):
                key = f"{s:05d}{i:04d}"
                by_key[key] = caption
                for name, data in ((f"{key}.jpg", image), (f"{key}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(root / "{00000..00003}.tar"), by_key


def test_keep_probability_is_metaclips_per_entry_draw() -> None:
    counts = {"dog": 200, "cat": 100, "fish": 10, "tree": 40}
    t = 20
    for entries in [set(), {"fish"}, {"dog"}, {"dog", "cat"}, {"dog", "tree", "cat"}, {"fish", "dog"}]:
        # plain: MetaCLIP keeps a text if any of its entries fires, entry e firing with min(1, t / c_e)
        fire = [min(1.0, t / counts[e]) for e in entries]
        plain = 0.0
        for outcome in itertools.product([True, False], repeat=len(fire)):
            p = math.prod(f if o else 1 - f for f, o in zip(fire, outcome))
            plain += p if any(outcome) else 0.0
        assert keep_probability(entries, counts, t) == pytest.approx(plain, abs=1e-12), entries
    # and the decoder's hash draws keep that share of samples
    dec = BalancedDecoder(None, counts, t, {"dog", "cat"}, "txt", seed=0)
    kept = sum(dec.keep(f"k{i}", "a dog and a cat") for i in range(20000))
    assert kept / 20000 == pytest.approx(1 - 0.9 * 0.8, abs=0.01)


def test_matching_is_on_whole_words_and_phrases() -> None:
    vocab = {"cat", "red fish"}
    assert match("A category of red fish, and a CAT.", vocab, 2) == {"red fish", "cat"}
    assert count_concepts(["a cat", "a cat and a cat", "red fish"], vocab) == {"cat": 2, "red fish": 1}
    assert "a" in match("a dog", None)  # no vocabulary: every word is a concept


def _batches(stream) -> list[Batch]:
    return [b for b in stream if isinstance(b, Batch)]


def test_a_resumed_balanced_stream_caps_head_concepts(tmp_path: Path) -> None:
    pattern, by_key = make_shards(tmp_path / "shards")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("dog\ncat\nfish\n")
    counts_path = tmp_path / "out" / "counts.json"
    balance = BalanceConfig(t=20, vocabulary=str(vocab), counts=str(counts_path))
    data = DataConfig(
        train_shards=[pattern], batch_size=1, shuffle_buffer=8, balance=balance
    )  # no partial batch dropped

    def stream(state: StreamState):
        s = build_stream(data, FakeModel(), data.train_shards, train=True, seed=1)
        s.start(state, 1)
        return s

    full = _batches(stream(StreamState()))
    assert json.loads(counts_path.read_text()) == CONCEPTS  # one counting pass, saved
    keys = [k for b in full for k in b.keys]
    assert len(keys) == len(set(keys))
    kept = {c: sum(f" {c} " in by_key[k] for k in keys) for c in CONCEPTS}
    assert kept["fish"] == 10  # the tail is kept whole
    for head in ("dog", "cat"):  # ~t = 20 each (binomial sd ~4.2): capped, not the 200 / 100 of the shards
        assert 8 <= kept[head] <= 34, kept
    assert not any("vocabulary" in by_key[k] for k in keys)  # unmatched captions are dropped, as MetaCLIP does
    assert full[-1].skipped.get("balanced", 0) > 0
    # resumed after 3 samples (the counts now read back from the file): the same kept samples, in order
    state = StreamState()
    for b in full[:3]:
        state.record(b, 1)
    counts_path.write_text(json.dumps(CONCEPTS))
    resumed = _batches(stream(StreamState.from_dict(state.to_dict())))
    assert [k for b in full[:3] for k in b.keys] + [k for b in resumed for k in b.keys] == keys


def test_a_bad_vocabulary_is_a_one_line_error(tmp_path: Path) -> None:
    pattern, _ = make_shards(tmp_path / "shards")
    data = DataConfig(train_shards=[pattern], balance=BalanceConfig(t=5, vocabulary=str(tmp_path / "missing.txt")))
    with pytest.raises(UserError, match=r"data.balance.vocabulary .*missing.txt: cannot read it"):
        build_stream(data, FakeModel(), data.train_shards, train=True)
