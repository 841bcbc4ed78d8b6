"""The app's handlers as plain functions: zero-shot, retrieval, captioning, and every bad-input path."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from app_helpers import FakePipeline, bomb_png, coloured

from mmcl.app import handlers as H
from mmcl.index import EmbeddingIndex
from mmcl.utils import UserError


@pytest.fixture
def state(fake) -> H.AppState:
    s = H.AppState()
    s.set_pipeline(fake, "fake")
    return s


@pytest.fixture
def indexed_state(state, built_index) -> H.AppState:
    state.index, state.index_dir = EmbeddingIndex.load(built_index), built_index
    return state


def test_parse_labels():
    assert H.parse_labels("red, green\nblue,, red \n\n") == ["red", "green", "blue"]
    for empty in ("", " , \n ", None):
        with pytest.raises(UserError, match="no labels"):
            H.parse_labels(empty)
    with pytest.raises(UserError, match="1001 labels is more than the limit of 1000"):
        H.parse_labels(",".join(f"l{i}" for i in range(1001)))


def test_resolve_templates():
    assert H.resolve_templates("none") == ["{}"]
    assert len(H.resolve_templates("openai")) == 80 and len(H.resolve_templates("short")) == 7
    assert H.resolve_templates("custom", "a {} shape\n\nthe {c}") == ["a {} shape", "the {}"]
    with pytest.raises(UserError, match="placeholder"):
        H.resolve_templates("custom", "no slot here")
    with pytest.raises(UserError, match="unknown template set"):
        H.resolve_templates("nope")


@pytest.mark.parametrize("colour", ["red", "green", "blue"])
def test_classify_picks_the_right_colour(state, colour):
    top = H.classify(state, coloured(colour), "red, green, blue, yellow", "short", top_k=3)
    assert top[0][0] == colour and len(top) == 3
    assert top[0][1] > 0.9 and all(a[1] >= b[1] for a, b in zip(top, top[1:]))


def test_classify_from_file_path_numpy_and_custom_templates(state, tmp_path):
    path = tmp_path / "g.png"
    coloured("green").save(path)
    assert H.classify(state, str(path), "red\ngreen", "custom", "a {} picture")[0][0] == "green"
    assert H.classify(state, np.asarray(coloured("blue")), "red, blue", "none")[0][0] == "blue"


def test_classify_probabilities_softmax_vs_siglip(fake):
    state = H.AppState()
    state.set_pipeline(fake, "clip")
    top = H.classify(state, coloured("red"), "red, green, blue", "none", top_k=3)
    assert math.isclose(sum(p for _, p in top), 1.0, rel_tol=1e-5)
    siglip = FakePipeline(logit_scale=10.0, logit_bias=-5.0)
    state.set_pipeline(siglip, "siglip")
    probs = dict(H.classify(state, coloured("red"), "red, green, blue", "none", top_k=3))
    cos_red = float(siglip.encode_images([coloured("red")]) @ siglip.encode_texts(["red"]).T)
    assert math.isclose(probs["red"], 1 / (1 + math.exp(-(10 * cos_red - 5))), rel_tol=1e-4)
    assert math.isclose(probs["green"], 1 / (1 + math.exp(5)), rel_tol=1e-3)  # cos 0 -> sigmoid(bias)


def test_classify_caches_text_embeddings(state, fake):
    H.classify(state, coloured("red"), "red, green", "short")
    calls = fake.text_calls
    H.classify(state, coloured("blue"), "red, green", "short")
    assert fake.text_calls == calls  # same labels and templates: no new text encoding
    state.set_pipeline(fake, "again")  # a model change clears the cache
    H.classify(state, coloured("blue"), "red, green", "short")
    assert fake.text_calls > calls


def test_classify_thousand_labels(state):
    labels = ", ".join(["red", *[f"class {i}" for i in range(999)]])
    top = H.classify(state, coloured("red"), labels, "none", top_k=5)
    assert top[0][0] == "red" and len(top) == 5


def test_classify_too_many_prompts(state):
    labels = ", ".join(f"class {i}" for i in range(1000))
    with pytest.raises(UserError, match="80000 prompts"):
        H.classify(state, coloured("red"), labels, "openai")


def test_bad_images(state, tmp_path):
    with pytest.raises(UserError, match="no image"):
        H.classify(state, None, "red, blue")
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(UserError, match="notes.png: not a readable image"):
        H.classify(state, str(text), "red, blue")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png(50_000, 50_000))
    with pytest.raises(UserError, match="bomb.png: refused"):
        H.classify(state, str(bomb), "red, blue")
    big = tmp_path / "big.png"
    big.write_bytes(bomb_png(7000, 7000))
    with pytest.raises(UserError, match="7000x7000"):
        H.caption(state, str(big))
    with pytest.raises(UserError, match="pixel limit"):
        H.load_image(coloured("red", size=64), max_pixels=1000)


def test_no_model_message():
    state = H.AppState()
    with pytest.raises(UserError, match="mmcl demo"):
        H.classify(state, coloured("red"), "red")
    banner = H.startup_message(state, None)
    assert "mmcl demo" in banner and "runs/demo" in banner


def test_search_by_text_and_image(indexed_state):
    hits = H.search_by_text(indexed_state, "red", k=3)
    assert [h.rank for h in hits] == [1, 2, 3]
    assert all("red" in h.caption for h in hits) and all(h.key.startswith("red_") for h in hits)
    root = (indexed_state.index_dir / "images").resolve()
    assert all(h.image and Path(h.image).is_relative_to(root) for h in hits)
    hits = H.search_by_image(indexed_state, coloured("blue", seed=99), k=4)
    assert [h.key[:4] for h in hits[:3]] == ["blue"] * 3 and len(hits) == 4
    assert hits[0].score >= hits[-1].score
    assert "Index:" in H.startup_message(indexed_state, "runs/x") and "9 images" in H.startup_message(indexed_state, "")


def test_search_never_hands_out_paths_outside_the_thumbnail_folder(indexed_state, tmp_path):
    secret = tmp_path / "secret.jpg"
    coloured("red").save(secret)
    indexed_state.index.metas[0]["image"] = "../secret.jpg"  # a tampered metadata row
    indexed_state.index.metas[1]["image"] = str(secret)
    hits = H.search_by_text(indexed_state, "red", k=9)
    assert all(h.image is None or "secret" not in h.image for h in hits)


def test_search_errors(state, indexed_state, tmp_path):
    with pytest.raises(UserError, match="empty query"):
        H.search_by_text(indexed_state, "  ")
    no_index = H.AppState()
    no_index.set_pipeline(FakePipeline(), "fake")
    with pytest.raises(UserError, match="mmcl index build"):
        H.search_by_text(no_index, "red")
    empty = EmbeddingIndex(8)
    empty.save(tmp_path / "empty")
    no_index.index, no_index.index_dir = EmbeddingIndex.load(tmp_path / "empty"), tmp_path / "empty"
    with pytest.raises(UserError, match="the index is empty"):
        H.search_by_text(no_index, "red")
    other = EmbeddingIndex(4)
    other.add(np.eye(4, dtype=np.float32))
    other.info["model"] = "runs/other"
    no_index.index = other
    with pytest.raises(UserError, match="4-d embeddings from runs/other"):
        H.search_by_image(no_index, coloured("red"))


def test_generation_kwargs():
    assert H.generation_kwargs("greedy", 10) == {"max_new_tokens": 10, "num_beams": 1, "do_sample": False}
    assert H.generation_kwargs("beam", 20, num_beams=4)["num_beams"] == 4
    sample = H.generation_kwargs("sample", 5, temperature=0.7, top_p=0.8)
    assert sample["do_sample"] and sample["temperature"] == 0.7 and sample["top_p"] == 0.8
    for bad in (dict(mode="beam", max_new_tokens=0), dict(mode="sample", temperature=0.0), dict(mode="nucleus")):
        with pytest.raises(UserError):
            H.generation_kwargs(**bad)


def test_caption(state, fake):
    assert H.caption(state, coloured("green"), **H.generation_kwargs("greedy", 30)) == "a green picture"
    assert fake.last_gen["num_beams"] == 1
    assert H.caption(state, coloured("blue"), prefix="this is", max_new_tokens=1) == "this is blue"
    contrastive = H.AppState()
    contrastive.set_pipeline(FakePipeline(can_caption=False), "clip-only")
    with pytest.raises(UserError, match="cannot caption"):
        H.caption(contrastive, coloured("blue"))


def test_example_images(tmp_path):
    paths = H.example_images(tmp_path, n=3)
    assert len(paths) == 3 and all(Path(p).is_file() for p in paths)
    assert H.example_images(tmp_path, n=3) == paths  # reused, deterministic names


def test_an_index_answers_only_the_model_that_built_it(tmp_path, image_folder, monkeypatch):
    """Two models of one width: the index of run a must not answer run b's queries (it matched by width only)."""
    from mmcl.index import build_index

    runs = tmp_path / "runs"
    (runs / "a").mkdir(parents=True)
    (runs / "b").mkdir()
    build_index(
        FakePipeline(), [str(image_folder)], runs / "a" / "index", info={"model": str(runs / "a")}, progress=False
    )
    index = EmbeddingIndex.load(runs / "a" / "index")

    other = H.AppState()
    other.set_pipeline(FakePipeline(), str(runs / "b"))  # same width, another run
    other.index, other.index_dir = index, runs / "a" / "index"
    with pytest.raises(UserError, match=r"was built with .*runs/a, not .*runs/b.*--run .*runs/b"):
        H.search_by_text(other, "red", 2)
    assert "retrieval is off" in H.startup_message(other, None)

    monkeypatch.chdir(tmp_path)
    same = H.AppState()
    same.set_pipeline(FakePipeline(), "runs/a/")  # the same run, spelt another way
    same.index, same.index_dir = index, runs / "a" / "index"
    assert H.search_by_text(same, "red", 1)[0].caption.startswith("a red")
    assert "retrieval is off" not in H.startup_message(same, None)
