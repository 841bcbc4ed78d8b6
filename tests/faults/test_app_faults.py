"""The app's exposure: foreign web origins refused, optional login, bad --auth values one line, model switching
per browser session and only to runs named at start (no API endpoint), image URLs refused and never fetched."""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "app"))
from app_helpers import FakePipeline, bomb_png, coloured, free_port, png_bytes  # noqa: E402

from mmcl.app import handlers as H  # noqa: E402
from mmcl.app.guard import URL_MESSAGE  # noqa: E402
from mmcl.cli import main  # noqa: E402
from mmcl.utils import UserError  # noqa: E402


@pytest.fixture(scope="module")
def server():
    from mmcl.app import launch

    state = H.AppState()
    state.set_pipeline(FakePipeline(), "fake")
    demo, url = launch(state=state, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url.rstrip("/")
    demo.close()


def _upload(url: str, origin: str | None) -> httpx.Response:
    headers = {"Origin": origin} if origin else {}
    files = {"files": ("x.png", b"\x89PNG\r\n\x1a\n" + b"0" * 64, "image/png")}
    return httpx.post(f"{url}/gradio_api/upload", files=files, headers=headers, timeout=30)


def test_cross_origin_upload_is_refused(server):
    refused = _upload(server, "http://evil.example")
    assert refused.status_code == 403 and "cross-origin" in refused.text
    assert _upload(server, server).status_code == 200  # the app's own page
    assert _upload(server, None).status_code == 200  # scripts and gradio_client send no Origin


# ---- DNS rebinding: the Host header names this server or the request is refused --------------------------------


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].strip("/"))


def _post_as(url: str, host: str, origin: str | None = None, route: str = "upload") -> httpx.Response:
    """A request to the server at `url` (127.0.0.1) that claims to be for `host`, as a rebound page sends it."""
    headers = {"Host": host, **({"Origin": origin} if origin else {})}
    if route == "upload":
        files = {"files": ("x.png", b"\x89PNG\r\n\x1a\n" + b"0" * 64, "image/png")}
        return httpx.post(f"{url}/gradio_api/upload", files=files, headers=headers, timeout=30)
    return httpx.post(f"{url}/gradio_api/call/{route}", json={"data": ["red", 3]}, headers=headers, timeout=30)


def test_dns_rebinding_host_is_refused(server):
    """Issue 24.1: `Host: attacker.example` with a matching Origin reached Gradio (upload 200, search answered)."""
    port = _port(server)
    for route in ("upload", "search_text"):
        rebound = _post_as(server, f"attacker.example:{port}", f"http://attacker.example:{port}", route)
        assert rebound.status_code == 403, (route, rebound.status_code)
        assert "--allow-host attacker.example" in rebound.text
        assert _post_as(server, f"attacker.example:{port}", None, route).status_code == 403  # no Origin either
    assert httpx.get(f"{server}/config", headers={"Host": f"attacker.example:{port}"}, timeout=30).status_code == 403
    for local in ("127.0.0.1", "localhost", "[::1]", "LocalHost"):  # what a browser on this machine sends
        assert _post_as(server, f"{local}:{port}", f"http://{local}:{port}").status_code == 200, local
    for bad in (f"127.0.0.1:{port}.evil.example", "127.0.0.1:99999", "a b", "user@127.0.0.1", ""):
        assert _post_as(server, bad).status_code == 403, bad


def test_allow_host_serves_a_named_host():
    from mmcl.app import launch

    state = H.AppState()
    state.set_pipeline(FakePipeline(), "fake")
    demo, url = launch(
        state=state, port=free_port(), prevent_thread_lock=True, quiet=True, allowed_hosts=("Box.LAN", "10.1.2.3")
    )
    try:
        url, port = url.rstrip("/"), _port(url)
        assert _post_as(url, f"box.lan:{port}", f"http://box.lan:{port}").status_code == 200
        assert _post_as(url, f"10.1.2.3:{port}").status_code == 200
        assert _post_as(url, f"other.lan:{port}").status_code == 403
        assert _post_as(url, f"10.1.2.4:{port}").status_code == 403  # bound to 127.0.0.1: no other address
    finally:
        demo.close()


@pytest.mark.parametrize(
    ("bound", "host", "ok"),
    [
        ("127.0.0.1", "127.0.0.1:7860", True),
        ("127.0.0.1", "192.168.1.5:7860", False),
        ("192.168.1.5", "192.168.1.5:7860", True),
        ("0.0.0.0", "192.168.1.5:7860", True),  # every interface: any literal address (it cannot be rebound)
        ("0.0.0.0", "[fe80::1]:7860", True),
        ("0.0.0.0", "box.lan:7860", False),  # but a name only with --allow-host
        ("::", "attacker.example", False),
        ("box.lan", "box.lan:7860", True),
    ],
)
def test_host_guard_policy(bound, host, ok):
    from mmcl.app.guard import HostGuard

    assert HostGuard(None, bound=bound).host_ok(host) is ok


def test_allow_host_takes_a_name_with_a_port_and_refuses_a_url_in_one_line():
    """`--allow-host box.lan:7860` (how the address bar shows it) allows the name; a URL is a mistake, said so."""
    from mmcl.app.guard import HostGuard
    from mmcl.utils import UserError

    guard = HostGuard(None, allowed=["Box.LAN:7860", "[fd00::5]:80"])
    assert guard.host_ok("box.lan:7860") and guard.host_ok("box.lan") and guard.host_ok("[fd00::5]:7860")
    assert not guard.host_ok("other.lan:7860")
    with pytest.raises(UserError, match=r"--allow-host 'http://box.lan/': .*a host name"):
        HostGuard(None, allowed=["http://box.lan/"])


def test_host_guard_accepts_the_share_link_once_it_exists():
    from mmcl.app.guard import HostGuard

    link: list[str | None] = [None]
    guard = HostGuard(None, share_url=lambda: link[0])
    assert not guard.host_ok("abc123.gradio.live")  # no share link (yet): a name like any other
    link[0] = "https://abc123.gradio.live"
    assert guard.host_ok("abc123.gradio.live") and not guard.host_ok("other.gradio.live")


@pytest.mark.parametrize(
    "origin",
    [
        "http://127.0.0.1:{port}.evil.example",
        "http://127.0.0.1:99999",
        "http://[::1",
        "null",
        "http://127.0.0.1:{port}/x",
    ],
)
def test_malformed_origin_is_refused_in_one_log_line(server, origin, capfd, caplog):
    """Issue 24.3: a malformed Origin gave 500 and a ValueError traceback in the server log."""
    origin = origin.format(port=_port(server))
    with caplog.at_level(logging.WARNING, logger="mmcl"):
        refused = _upload(server, origin)
        _upload(server, origin)  # the same value again: still refused, not logged again
    assert refused.status_code == 403 and "cross-origin" in refused.text
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ValueError" not in err
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) <= 1 and all("\n" not in line for line in lines)
    assert _upload(server, server).status_code == 200  # the server keeps serving


def test_auth_protects_the_api():
    from mmcl.app import launch

    state = H.AppState()
    state.set_pipeline(FakePipeline(), "fake")
    demo, url = launch(state=state, port=free_port(), prevent_thread_lock=True, quiet=True, auth=("ann", "s3cret"))
    try:
        url = url.rstrip("/")
        assert httpx.get(f"{url}/config", timeout=30).status_code in (401, 403)
        assert _upload(url, None).status_code in (401, 403)
        with httpx.Client(timeout=30) as c:
            assert c.post(f"{url}/login", data={"username": "ann", "password": "s3cret"}).status_code == 200
            assert c.get(f"{url}/config").status_code == 200
    finally:
        demo.close()


@pytest.mark.parametrize("value", ["ann", ":pw", "ann:"])
def test_bad_auth_value_is_one_line(value, capsys):
    assert main(["app", "--auth", value]) == 2
    assert capsys.readouterr().err.strip().endswith("--auth takes USER:PASSWORD (both non-empty)")


# ---- model switching: per browser session, only runs named at start, no API endpoint ------------------------


@pytest.fixture(scope="module")
def switch_server(tmp_path_factory):
    """An app serving 'fake' (captions) that sessions may switch to the run `other/` (a model that cannot caption).

    Yields (url, other run name, a blue image, the state).
    """
    from mmcl.app import launch

    root = tmp_path_factory.mktemp("switch")
    other = root / "other"
    other.mkdir()
    (root / "secret").mkdir()  # a real folder on the server that was not named at start
    image = root / "blue.png"
    coloured("blue").save(image)
    from mmcl.index import EmbeddingIndex, build_index

    for owner, folder in (("server", root / "server_index"), ("other", other / "index")):  # each model's own index
        images = root / f"{owner}_images"
        images.mkdir()
        for j in range(3):
            coloured("red", seed=j).save(images / f"red_{j}.png")
            (images / f"red_{j}.txt").write_text(f"{owner} red {j}")
        build_index(FakePipeline(), [str(images)], folder, info={"model": owner}, progress=False)
    loaded = []
    choices = H.ModelChoices([str(other)], loader=lambda path: loaded.append(path) or FakePipeline(can_caption=False))
    state = H.AppState(choices=choices)
    state.set_pipeline(FakePipeline(), "fake")
    state.index, state.index_dir = EmbeddingIndex.load(root / "server_index"), root / "server_index"
    demo, url = launch(state=state, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url.rstrip("/"), str(other), image, state, loaded
    demo.close()


def _caption(client: Client, image: Path) -> str:
    return client.predict(handle_file(str(image)), "", "greedy", 30, 3, 1.0, 0.9, api_name="/caption")


def _switch_fn_index(url: str) -> int:
    deps = httpx.get(f"{url}/config", timeout=30).json()["dependencies"]
    return next(d["id"] for d in deps if d.get("api_name") == "switch_model")


def _browser_event(url: str, session_hash: str, fn_index: int, data: list) -> dict:
    """Trigger an event the way the page does (queue join by index, within one session); the final message."""
    body = {"data": data, "fn_index": fn_index, "session_hash": session_hash, "event_data": None, "trigger_id": None}
    httpx.post(f"{url}/gradio_api/queue/join", json=body, timeout=30).raise_for_status()
    with httpx.stream("GET", f"{url}/gradio_api/queue/data", params={"session_hash": session_hash}, timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("data:"):
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_completed":
                    return msg
    raise AssertionError("the event never completed")


def _first_caption(client: Client) -> str:
    gallery, _ = client.predict("red", 1, api_name="/search_text")
    assert Path(gallery[0]["image"]).is_file()  # the client downloaded the thumbnail: served, whichever index
    return gallery[0]["caption"].split(" · ")[1]


def test_model_switch_is_per_session(switch_server):
    url, other, image, state, loaded = switch_server
    ann, bob = Client(url, verbose=False), Client(url, verbose=False)
    assert _caption(ann, image) == _caption(bob, image) == "a blue picture"
    assert _first_caption(ann).startswith("server red")
    done = _browser_event(url, ann.session_hash, _switch_fn_index(url), [other])
    assert done["success"], done
    banner = done["output"]["data"][1]
    assert other in banner and f"Index: `{other}/index`" in banner  # the header names the new model's index
    assert _first_caption(ann).startswith("other red")  # and retrieval searches it
    assert _first_caption(bob).startswith("server red")
    with pytest.raises(AppError, match="cannot caption"):  # ann's session now answers with the other run
        _caption(ann, image)
    assert _caption(bob, image) == "a blue picture"  # bob's session, and the server's state, are unchanged
    assert state.model_name == "fake" and state.pipeline.can_caption
    assert _browser_event(url, ann.session_hash, _switch_fn_index(url), ["fake"])["success"]
    assert _caption(ann, image) == "a blue picture"  # and back to the server's own model
    assert loaded == [other]  # the run was loaded once


@pytest.mark.parametrize("name", ["secret", "/etc", "../secret", ""])
def test_only_runs_named_at_start_can_be_chosen(switch_server, name):
    url, other, image, state, loaded = switch_server
    name = str(Path(other).parent / name) if name in ("secret", "../secret") else name
    ann = Client(url, verbose=False)
    done = _browser_event(url, ann.session_hash, _switch_fn_index(url), [name])
    if name:
        assert not done["success"] and "\n" not in done["output"]["error"], done
    assert _caption(ann, image) == "a blue picture"  # still the server's own model
    assert loaded in ([], [other])  # nothing but the named run was ever loaded
    with pytest.raises(UserError, match="not one of the runs this server was started with"):
        state.for_session(str(Path(other).parent / "secret"))


def test_model_switch_is_not_an_api_endpoint(switch_server):
    url = switch_server[0]
    client = Client(url, verbose=False)
    api = client.view_api(print_info=False, return_format="dict")
    listed = {*api["named_endpoints"], *api["unnamed_endpoints"]}
    assert listed == {"/classify", "/search_text", "/search_image", "/caption", "/compare_captions"}
    with pytest.raises(ValueError, match="switch_model"):
        client.predict(switch_server[1], api_name="/switch_model")
    for route in ("call/switch_model", "call/v2/switch_model", "run/switch_model", "api/switch_model"):
        refused = httpx.post(f"{url}/gradio_api/{route}", json={"data": [switch_server[1]]}, timeout=30)
        assert refused.status_code == 404, route
    for gone in ("load_run", "load_open_clip"):  # the old shared-model endpoints no longer exist
        assert httpx.post(f"{url}/gradio_api/call/{gone}", json={"data": ["/etc"]}, timeout=30).status_code == 404
    assert httpx.post(f"{url}/gradio_api/call/search_text", json={"data": ["x", 1]}, timeout=30).status_code == 200


def test_allow_runs_must_exist(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["app", "--allow-runs", str(tmp_path / "missing")]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(f"--allow-runs {tmp_path / 'missing'}: no such run or checkpoint folder")
    )


def test_no_picker_without_allowed_runs(server):
    deps = httpx.get(f"{server}/config", timeout=30).json()["dependencies"]
    assert not any(d.get("api_name") in ("switch_model", "load_run", "load_open_clip") for d in deps)


# ---- image URLs: refused in one line, never fetched ------------------------------------------------------------


@pytest.fixture
def no_downloads(monkeypatch):
    """Record every URL download Gradio starts (the server runs in this process)."""
    from gradio import processing_utils

    fetched = []

    async def download(url, cache_dir):
        fetched.append(url)
        raise AssertionError(f"the app fetched {url}")

    monkeypatch.setattr(processing_utils, "async_ssrf_protected_download", download)
    monkeypatch.setattr(processing_utils, "ssrf_protected_download", lambda url, cache_dir: download(url, cache_dir))
    return fetched


@pytest.mark.parametrize("link", ["https://example.com/cat.png", "http://127.0.0.1:1/x.jpg"])
def test_image_url_is_refused_in_one_line(server, no_downloads, link, tmp_path):
    client = Client(server, verbose=False)
    red = tmp_path / "red.png"
    coloured("red").save(red)
    with pytest.raises(AppError) as refused:
        client.predict(handle_file(link), "red, blue", "short", "a {}", 2, api_name="/classify")
    assert str(refused.value) == URL_MESSAGE
    assert no_downloads == []
    label = client.predict(handle_file(str(red)), "red, blue", "none", "", 1, api_name="/classify")
    assert label["label"] == "red"  # an upload still works


def test_image_url_in_a_raw_request_is_refused(server, no_downloads):
    file_data = {
        "path": "https://example.com/cat.png",
        "url": "https://example.com/cat.png",
        "meta": {"_type": "gradio.FileData"},
    }
    posted = httpx.post(f"{server}/gradio_api/call/search_image", json={"data": [file_data, 3]}, timeout=30)
    assert posted.status_code == 200
    events = httpx.get(f"{server}/gradio_api/call/search_image/{posted.json()['event_id']}", timeout=60).text
    assert "event: error" in events and URL_MESSAGE in events
    assert no_downloads == []


# ---- bad command lines: one line, before any model loads --------------------------------------------------------


@pytest.fixture
def taken_port():
    """A port this machine is listening on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "99999"], "--port must be between 1 and 65535, got 99999"),
        (["--port", "0"], "--port must be between 1 and 65535, got 0"),
        (["--max-file-size", "banana"], "--max-file-size takes a positive size like 20mb, 512kb or 1gb, got 'banana'"),
        (["--max-file-size", "20 parsecs"], "got '20 parsecs'"),
        (["--max-file-size", "0mb"], "got '0mb'"),
        (
            ["--port", "{taken}"],
            "cannot listen on 127.0.0.1:{taken}: the port is in use (choose another with --port N)",
        ),
        (["--host", "no-such-host.invalid"], "cannot listen on 'no-such-host.invalid'"),
    ],
)
def test_bad_app_command_line_is_one_line(argv, message, taken_port, tmp_path, monkeypatch, capsys):
    """Issue 24.16: these ended in OverflowError / ValueError / OSError tracebacks (the last after loading the model)."""
    import gradio as gr

    import mmcl.app.models as models

    loaded = []
    monkeypatch.setattr(models, "load_run", lambda path: loaded.append(path) or FakePipeline())
    monkeypatch.setattr(gr.Blocks, "block_thread", lambda demo: demo.close() or pytest.fail("the app started serving"))
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path)
    argv = [a.format(taken=taken_port) for a in argv]
    assert main(["app", "run", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mmcl app: error: ")
    assert message.format(taken=taken_port) in err
    assert loaded == []  # refused before the model was loaded


def test_file_size_values():
    from mmcl.app.guard import parse_file_size

    assert parse_file_size("20mb") == parse_file_size("20 MB") == 20 * 2**20
    assert parse_file_size("512kb") == 512 * 2**10 and parse_file_size("1048576") == parse_file_size(2**20) == 2**20


# ---- one size limit for every way an image arrives --------------------------------------------------------------

LIMIT = 64 * 1024  # the server below runs with --max-file-size 64kb


@pytest.fixture(scope="module")
def limited():
    """An app with a 64 KiB file limit and a 1 Mpixel limit; yields its URL."""
    from mmcl.app import launch

    state = H.AppState(max_pixels=1_000_000)
    state.set_pipeline(FakePipeline(), "fake")
    demo, url = launch(state=state, port=free_port(), prevent_thread_lock=True, quiet=True, max_file_size="64kb")
    yield url.rstrip("/")
    demo.close()


def _sized_png(size: int, colour: str = "red") -> bytes:
    """A valid red PNG of exactly `size` bytes (decoders stop at its end marker; the rest is padding)."""
    data = png_bytes(coloured(colour, size=64))
    assert len(data) <= size
    return data + b"\0" * (size - len(data))


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _uploaded(url: str, data: bytes) -> str:
    done = httpx.post(f"{url}/gradio_api/upload", files={"files": ("q.png", data, "image/png")}, timeout=60)
    assert done.status_code == 200, done.text
    return done.json()[0]


def _call_classify(url: str, image: object) -> tuple[int, str]:
    """POST /gradio_api/call/classify as a script would; (status, the event stream's text or the refusal)."""
    body = {"data": [image, "red, blue", "none", "", 2]}
    posted = httpx.post(f"{url}/gradio_api/call/classify", json=body, timeout=60)
    if posted.status_code != 200:
        return posted.status_code, posted.text
    return 200, httpx.get(f"{url}/gradio_api/call/classify/{posted.json()['event_id']}", timeout=60).text


def _file_data(path: str, url: str | None = None) -> dict:
    return {"path": path, "url": url, "orig_name": "q.png", "meta": {"_type": "gradio.FileData"}}


def test_multipart_upload_limit(limited):
    assert httpx.post(f"{limited}/gradio_api/upload", files={"files": ("a.png", _sized_png(LIMIT))}).status_code == 200
    over = httpx.post(f"{limited}/gradio_api/upload", files={"files": ("a.png", _sized_png(LIMIT + 1))}, timeout=60)
    assert over.status_code == 413


def _top_label(events: str) -> str:
    assert "event: complete" in events, events[:500]
    return json.loads(events.split("event: complete\ndata: ", 1)[1].splitlines()[0])[0]["label"]  # [label]


def test_data_url_is_never_decoded(limited):
    """Issue 24.2: a FileData whose url is a data: URL was taken whatever its size (+1 GB for a 108 MB PNG).

    The body is bounded (`test_request_body_is_bounded`); within it, the data: URL is dropped and the image is the
    file at `path`, which meets the file limits.
    """
    small = _uploaded(limited, _sized_png(10_000, "blue"))  # a path the server accepts: a real small upload
    for inline in (_sized_png(LIMIT + 1), bomb_png(60_000, 60_000)):
        status, events = _call_classify(limited, _file_data(small, _data_url(inline)))
        assert status == 200 and _top_label(events) == "blue"


def test_image_component_drops_a_data_url(tmp_path):
    """`_image`'s own check, whatever Gradio does before it: the data: URL (a red image) is not what gets classified."""
    import gradio as gr
    from gradio.data_classes import ImageData

    from mmcl.app.ui import _image

    blue = tmp_path / "blue.png"
    coloured("blue").save(blue)
    with gr.Blocks():
        image = _image("x", ["upload"], H.AppState(max_bytes=LIMIT))
    inline = _data_url(_sized_png(LIMIT + 1))
    assert image.preprocess(ImageData(path=str(blue), url=inline, orig_name="blue.png")) == str(blue)
    big = tmp_path / "big.png"
    big.write_bytes(_sized_png(LIMIT + 1))
    with pytest.raises(Exception, match="65,537 bytes is more than the 65,536 byte limit"):
        image.preprocess(ImageData(path=str(big), url=inline, orig_name="big.png"))


def test_request_body_is_bounded(limited):
    """A JSON body far over the limit is refused before it is parsed (any route, queue included)."""
    huge = _file_data("x.png", _data_url(os.urandom(20 * LIMIT)))  # over 4/3 LIMIT + 1 MiB
    status, text = _call_classify(limited, huge)
    assert status == 413 and "limit" in text
    body = {"data": [huge, "red", "none", "", 1], "fn_index": 0, "session_hash": "s"}
    assert httpx.post(f"{limited}/gradio_api/queue/join", json=body, timeout=60).status_code == 413
    raw = json.dumps(body).encode()
    chunks = iter([raw[i : i + 50_000] for i in range(0, len(raw), 50_000)])
    chunked = httpx.post(f"{limited}/gradio_api/queue/join", content=chunks, timeout=60)  # no Content-Length
    assert chunked.status_code == 413


@pytest.mark.parametrize("where", ["path", "bare"])
def test_base64_in_the_path_is_refused(limited, where):
    image = _data_url(_sized_png(LIMIT + 1))
    status, events = _call_classify(limited, _file_data(image) if where == "path" else image)
    assert status != 200 or ("event: error" in events and "event: complete" not in events)


def test_a_cached_file_over_the_limit_is_refused(limited):
    """A path into Gradio's upload folder (shared by every server on the machine) is held to this server's limit."""
    from gradio.utils import get_upload_folder

    folder = Path(get_upload_folder()) / "mmcl-test-oversized"
    folder.mkdir(parents=True, exist_ok=True)
    big = folder / "big.png"
    big.write_bytes(_sized_png(LIMIT + 1))
    try:
        status, events = _call_classify(limited, _file_data(str(big)))
        assert "event: error" in events and "65,537 bytes is more than the 65,536 byte limit" in events
        big.write_bytes(_sized_png(LIMIT))
        status, events = _call_classify(limited, _file_data(str(big)))
        assert _top_label(events) == "red"
    finally:
        shutil.rmtree(folder)
