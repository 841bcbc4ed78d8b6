"""The app's 'Compare captions' tab: which of two captions fits an uploaded image better (handler and HTTP API)."""

from __future__ import annotations

import math

import pytest
import torch
from app_helpers import FakePipeline, coloured, free_port
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from mmcl.app import handlers as H
from mmcl.utils import UserError


@pytest.fixture
def state(fake: FakePipeline) -> H.AppState:
    s = H.AppState()
    s.set_pipeline(fake, "fake")
    return s


def test_compare_captions_handler(state, fake):
    image = coloured("red", seed=1)
    rows = H.compare_captions(state, image, "a blue square", "a red square")
    assert [r[0] for r in rows] == ["a red square", "a blue square"]  # better first
    img = fake.encode_images([image])[0]
    txt = fake.encode_texts(["a red square", "a blue square"])
    assert [r[1] for r in rows] == pytest.approx((txt @ img).tolist(), abs=1e-6)  # cosines of normalised embeddings
    expected = torch.softmax(100.0 * (txt @ img), dim=0).tolist()  # the fake's logit scale is 100
    assert [r[2] for r in rows] == pytest.approx(expected, abs=1e-6) and math.isclose(sum(r[2] for r in rows), 1)
    with pytest.raises(UserError, match="type two captions"):
        H.compare_captions(state, image, "a red square", "  ")
    with pytest.raises(UserError, match="the same"):
        H.compare_captions(state, image, "a red square", "a red square ")
    with pytest.raises(UserError, match="no image"):
        H.compare_captions(state, None, "a red square", "a blue square")
    with pytest.raises(UserError, match="no model loaded"):
        H.compare_captions(H.AppState(), image, "a red square", "a blue square")


def test_compare_captions_api(tmp_path, fake):
    from mmcl.app import launch

    state = H.AppState()
    state.set_pipeline(fake, "fake")
    red, text = tmp_path / "red.png", tmp_path / "notes.png"
    coloured("red", seed=3).save(red)
    text.write_text("not an image")
    demo, url = launch(state=state, port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(url, verbose=False, download_files=False)
        label, verdict = client.predict(
            handle_file(str(red)), "a green circle", "a red circle", api_name="/compare_captions"
        )
        assert label["label"] == "a red circle" and len(label["confidences"]) == 2
        assert verdict.startswith("**a red circle** fits better than *a green circle*")
        with pytest.raises(AppError, match="not a readable image"):
            client.predict(handle_file(str(text)), "a", "b", api_name="/compare_captions")
        with pytest.raises(AppError, match="the same"):
            client.predict(handle_file(str(red)), "a red circle", "a red circle", api_name="/compare_captions")
    finally:
        demo.close()
