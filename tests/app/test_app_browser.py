"""The app in a real (headless Debian) Chromium: upload an image, type labels, classify, read the top label.

Needs `apt-get install chromium` and `pip install playwright` (playwright cannot download its own browser
here, so it drives /usr/bin/chromium).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from app_helpers import FakePipeline, coloured, free_port

from mmcl.app import handlers as H

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.browser


@pytest.fixture
def page_url(tmp_path):
    from mmcl.app import launch

    state = H.AppState()
    state.set_pipeline(FakePipeline(), "fake")
    demo, url = launch(state=state, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url
    demo.close()


def test_classify_in_chromium(page_url, tmp_path):
    if not Path(CHROMIUM).is_file() and not shutil.which("chromium"):
        pytest.fail("chromium is not installed: apt-get install -y chromium")
    from playwright.sync_api import expect, sync_playwright

    image = tmp_path / "blue.png"
    coloured("blue", size=96).save(image)
    shot = tmp_path / "zero_shot.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(page_url, wait_until="domcontentloaded")
            page.locator("input[type=file]").first.set_input_files(str(image))
            labels = page.get_by_label("Labels (comma or newline separated)")
            labels.fill("red, green\nblue, yellow")
            expect(page.locator("#zs_image img").first).to_be_visible(timeout=30_000)  # upload finished
            page.locator("#classify").click()
            top = page.locator("#prediction [data-testid='label-output-value']")
            expect(top).to_have_text("blue", timeout=60_000)
            page.screenshot(path=str(shot), full_page=True)

            # Bad input is a message in the page, and the page keeps working afterwards.
            labels.fill(" , ")
            page.locator("#classify").click()
            expect(page.get_by_text("no labels").first).to_be_visible(timeout=30_000)
            labels.fill("green, blue")
            page.locator("#classify").click()
            expect(top).to_have_text("blue", timeout=60_000)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("MMCL_SCREENSHOT_DIR")  # to look at the page after the run (tmp_path is cleaned up)
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
