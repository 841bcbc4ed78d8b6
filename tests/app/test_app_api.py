"""The running app over HTTP with `gradio_client`: every tab, bad input, and 16 concurrent clients."""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from app_helpers import FakePipeline, bomb_png, coloured, free_port
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from mmcl.app import handlers as H
from mmcl.index import EmbeddingIndex, build_index


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A live app on a free port with the fake pipeline and a 9-image index; yields (url, state, files, demo)."""
    from mmcl.app import launch

    root = tmp_path_factory.mktemp("app")
    images = root / "images"
    images.mkdir()
    for c, colour in enumerate(["red", "green", "blue"]):
        for j in range(3):
            coloured(colour, seed=10 * c + j).save(images / f"{colour}_{j}.png")
            (images / f"{colour}_{j}.txt").write_text(f"a {colour} square {j}")
    fake = FakePipeline()
    build_index(fake, [str(images)], root / "index", progress=False)
    state = H.AppState()
    state.set_pipeline(fake, "fake")
    state.index, state.index_dir = EmbeddingIndex.load(root / "index"), root / "index"
    files = {}
    for colour in ("red", "green", "blue"):
        files[colour] = root / f"query_{colour}.png"
        coloured(colour, seed=123).save(files[colour])
    files["text"] = root / "notes.png"
    files["text"].write_text("not an image at all")
    files["bomb"] = root / "bomb.png"
    files["bomb"].write_bytes(bomb_png(60_000, 60_000))
    demo, url = launch(state=state, port=free_port(), prevent_thread_lock=True, quiet=True, concurrency=2)
    yield url, state, files, demo
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server[0], verbose=False, download_files=False)


def classify(client: Client, path: Path, labels: str = "red, green, blue", templates: str = "short", k: int = 3):
    return client.predict(handle_file(str(path)), labels, templates, "a {} thing", k, api_name="/classify")


def test_launch_is_local_and_limited(server):
    url, state, _, demo = server
    assert url.startswith("http://127.0.0.1:") and demo.server_name == "127.0.0.1"
    assert demo.max_file_size == 20 * 1024 * 1024 and not demo.share
    assert demo.allowed_paths == [str((state.index_dir / "images").resolve())]


def test_upload_limit_and_file_serving(server):
    url, state = server[0], server[1]
    small = httpx.post(url + "gradio_api/upload", files={"files": ("a.png", b"x" * 1024)}, timeout=60)
    assert small.status_code == 200
    big = httpx.post(url + "gradio_api/upload", files={"files": ("b.png", os.urandom(21 * 2**20))}, timeout=120)
    assert big.status_code == 413  # max_file_size=20mb is enforced by the server, not only by the client
    assert httpx.get(url + "gradio_api/file=/etc/passwd").status_code == 403
    index_file = next(state.index_dir.glob("meta.*.jsonl"))  # inside the index folder but not a thumbnail
    assert httpx.get(url + f"gradio_api/file={index_file}").status_code == 403


@pytest.mark.parametrize("colour", ["red", "green", "blue"])
def test_zero_shot_tab(client, server, colour):
    label = classify(client, server[2][colour])
    assert label["label"] == colour
    confidences = {c["label"]: c["confidence"] for c in label["confidences"]}
    assert set(confidences) == {"red", "green", "blue"} and confidences[colour] > 0.9
    assert label["confidences"][0]["label"] == colour  # best first: the one output the page shows


def test_zero_shot_custom_templates_and_top_k(client, server):
    label = client.predict(
        handle_file(str(server[2]["red"])),
        "red\nblue\ngreen\nyellow",
        "custom",
        "a {} picture",
        2,
        api_name="/classify",
    )
    assert label["label"] == "red" and len(label["confidences"]) == 2


def test_retrieval_tab_text_and_image(client, server):
    gallery, table = client.predict("red", 3, api_name="/search_text")
    assert len(gallery) == 3 and all("red" in item["caption"] for item in gallery)
    assert [row[3][:3] for row in table["data"]] == ["red"] * 3
    thumb = httpx.get(gallery[0]["image"]["url"])  # the thumbnail is served
    assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
    gallery, table = client.predict(handle_file(str(server[2]["green"])), 5, api_name="/search_image")
    assert len(table["data"]) == 5 and [row[2].split()[1] for row in table["data"][:3]] == ["green"] * 3
    assert [row[0] for row in table["data"]] == [1, 2, 3, 4, 5]


def test_captioning_tab(client, server):
    out = client.predict(handle_file(str(server[2]["blue"])), "", "greedy", 30, 3, 1.0, 0.9, api_name="/caption")
    assert out == "a blue picture"
    out = client.predict(handle_file(str(server[2]["red"])), "look:", "beam", 1, 3, 1.0, 0.9, api_name="/caption")
    assert out == "look: red"


@pytest.mark.parametrize(
    ("upload", "labels", "message"),
    [
        ("text", "red, blue", "not a readable image"),
        ("bomb", "red, blue", "refused"),
        ("red", " , ", "no labels"),
        ("red", ",".join(f"l{i}" for i in range(1001)), "more than the limit of 1000"),
    ],
)
def test_bad_input_gives_a_message_and_the_server_keeps_serving(client, server, upload, labels, message):
    with pytest.raises(AppError, match=message):
        classify(client, server[2][upload], labels)
    assert classify(client, server[2]["red"])["label"] == "red"


def test_thousand_labels(client, server):
    labels = ", ".join(["red", *[f"thing {i}" for i in range(999)]])
    label = classify(client, server[2]["red"], labels, templates="none", k=5)
    assert label["label"] == "red" and len(label["confidences"]) == 5


def test_empty_and_missing_index_messages(client, server, tmp_path):
    state = server[1]
    saved = state.index
    try:
        EmbeddingIndex(16).save(tmp_path)
        state.index = EmbeddingIndex.load(tmp_path)
        with pytest.raises(AppError, match="the index is empty"):
            client.predict("red", 3, api_name="/search_text")
        state.index = None
        with pytest.raises(AppError, match="mmcl index build"):
            client.predict("red", 3, api_name="/search_text")
    finally:
        state.index = saved
    assert len(client.predict("red", 2, api_name="/search_text")[0]) == 2


def test_sixteen_concurrent_clients(server):
    url, files = server[0], server[2]
    colours = ["red", "green", "blue"] * 6
    barrier = threading.Barrier(16)

    def one(i: int) -> tuple[str, str]:
        c = Client(url, verbose=False, download_files=False)
        barrier.wait()  # all 16 submit together
        if i % 4 == 3:
            gallery, _ = c.predict(colours[i], 2, api_name="/search_text")
            return colours[i], gallery[0]["caption"].split(" · ")[1].split()[1]  # "0.98 · a red square 0"
        return colours[i], classify(c, files[colours[i]])["label"]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16), timeout=240))
    assert len(results) == 16 and all(want == got for want, got in results)


def _page_event(url: str, session_hash: str, dep: dict, data: list) -> dict:
    """Trigger an event the way the page's JavaScript does: a dependency with `queue: false` is posted to
    `/gradio_api/run/predict` by index, any other joins the queue; returns {"success", "data" | "status"}."""
    body = {"data": data, "fn_index": dep["id"], "session_hash": session_hash, "event_data": None, "trigger_id": None}
    if dep.get("queue") is False:
        done = httpx.post(f"{url}gradio_api/run/predict", json=body, timeout=30)
        if done.status_code != 200:
            return {"success": False, "status": done.status_code, "text": done.text}
        return {"success": True, **done.json()}
    httpx.post(f"{url}gradio_api/queue/join", json=body, timeout=30).raise_for_status()
    with httpx.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": session_hash}, timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("data:"):
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_completed":
                    return {"success": msg["success"], **msg["output"]}
    raise AssertionError("the event never completed")


def test_every_example_fills_its_image_input(server):
    """Clicking an example thumbnail (issue 19.4: it got 404 from the endpoint guard) puts that image in the input."""
    url = server[0]
    config = httpx.get(url + "config", timeout=30).json()
    datasets = [c["id"] for c in config["components"] if c["type"] == "dataset"]
    assert len(datasets) == 3  # zero-shot, captioning, compare captions
    for dataset in datasets:
        dep = next(d for d in config["dependencies"] if [dataset, "click"] in d["targets"])
        samples = next(c for c in config["components"] if c["id"] == dataset)["props"]["samples"]
        for i in range(len(samples)):
            done = _page_event(url, f"examples{dataset}x{i}", dep, [i])
            assert done["success"], done
            filled = done["data"][0]
            filled = filled.get("value", filled)  # an update dict or the value itself
            assert filled["path"].endswith(".png") and Path(samples[i][0]["path"]).name == Path(filled["path"]).name
            image = httpx.get(filled["url"], timeout=30)  # the page can show it
            assert image.status_code == 200 and image.content[:4] == b"\x89PNG"


def test_run_predict_stays_closed(server):
    """The direct, queue-less route stays refused for every event, by name or by index."""
    url = server[0]
    deps = httpx.get(url + "config", timeout=30).json()["dependencies"]
    for dep in deps:
        body = {"data": [], "fn_index": dep["id"], "session_hash": "closed"}
        assert httpx.post(f"{url}gradio_api/run/predict", json=body, timeout=30).status_code == 404
