"""The app's exposure: foreign web origins refused, optional login, bad --auth values one line."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "app"))
from app_helpers import FakePipeline, free_port  # noqa: E402

from mmcl.app import handlers as H  # noqa: E402
from mmcl.cli import main  # noqa: E402


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
