"""The app in a real (headless Debian) Chromium: every interactive element of every tab, examples included.

Each click is checked by what appears in the page: the example's image in the input, the top label and the
number of labels shown, the gallery's thumbnails and full captions, the caption text, the verdict, the header
after a model switch. Expected answers come from the handlers themselves (`mmcl.app.handlers`) on the same
files, so the page is checked against the library, not against hard-coded strings.

Needs `apt-get install chromium` and `pip install playwright` (playwright cannot download its own browser
here, so it drives /usr/bin/chromium). Chromium's fake camera stands in for a webcam.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import tempfile
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
    "--use-fake-ui-for-media-stream",  # grant the camera without a prompt
    "--use-fake-device-for-media-stream",  # a synthetic camera feed
]
NO_WAY_TO_CAPTIONING = """() => {
    const tab = [...document.querySelectorAll("button[role=tab]")].find((b) => b.textContent.trim() === "Captioning");
    return !tab || tab.offsetParent === null || tab.disabled || tab.getAttribute("aria-disabled") === "true";
}"""
LABELS = "red, green, blue, yellow, purple, orange, white, black"
LONG = "square with a caption long enough that a thumbnail-wide label would cut it off"
WAIT = 60_000
ANY_LABEL = re.compile("|".join(c.strip() for c in LABELS.split(",")))
COPY_IMAGE = """async (b64) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    await navigator.clipboard.write([new ClipboardItem({"image/png": new Blob([bytes], {type: "image/png"})})]);
}"""

pytestmark = pytest.mark.browser


@pytest.fixture
def served(tmp_path):
    """A live app: the fake model, a 3-image index with long captions, and a second run to switch to."""
    from mmcl.app import launch
    from mmcl.index import EmbeddingIndex, build_index

    images = tmp_path / "images"
    images.mkdir()
    for j, colour in enumerate(["red", "green", "blue"]):
        coloured(colour, seed=j).save(images / f"{colour}.png")
        (images / f"{colour}.txt").write_text(f"a {colour} {LONG}")
    build_index(FakePipeline(), [str(images)], tmp_path / "index", progress=False)
    other = tmp_path / "other"
    other.mkdir()
    choices = H.ModelChoices([str(other)], loader=lambda path: FakePipeline(can_caption=False))
    state = H.AppState(choices=choices)
    state.set_pipeline(FakePipeline(), "fake")
    state.index, state.index_dir = EmbeddingIndex.load(tmp_path / "index"), tmp_path / "index"
    demo, url = launch(state=state, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url, state, str(other)
    demo.close()


def _set_slider(page, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def _example_names(page, elem_id: str) -> list[str]:
    """The file names of an Examples block's thumbnails, in order."""
    srcs = page.locator(f"#{elem_id} button.gallery-item img").evaluate_all("els => els.map(e => e.src)")
    return [src.rsplit("/", 1)[-1] for src in srcs]


def _click_example(page, expect, elem_id: str, i: int, image_id: str) -> str:
    """Click thumbnail i of an Examples block; wait until the image input shows that file. Returns its name."""
    name = _example_names(page, elem_id)[i]
    page.locator(f"#{elem_id} button.gallery-item").nth(i).click()
    expect(page.locator(f"#{image_id} img[src$='{name}']").first).to_be_visible(timeout=WAIT)
    return name


def _example_path(name: str) -> str:
    return str(Path(tempfile.gettempdir()) / "mmcl-app-examples" / name)  # where build_app wrote them


def test_every_element_of_every_tab(served, tmp_path):
    if not Path(CHROMIUM).is_file() and not shutil.which("chromium"):
        pytest.fail("chromium is not installed: apt-get install -y chromium")
    from playwright.sync_api import expect, sync_playwright

    url, state, other = served
    small = tmp_path / "blue32.png"
    coloured("blue", size=32).save(small)
    green = tmp_path / "green.png"
    coloured("green", size=96).save(green)
    shot = tmp_path / "app.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 1000})
            context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url.rstrip("/"))
            page = context.new_page()
            page.goto(url, wait_until="domcontentloaded")
            expect(page.locator("#zs_examples button.gallery-item").first).to_be_visible(timeout=WAIT)
            top = page.locator("#prediction [data-testid='label-output-value']")
            labels = page.locator("#zs_labels textarea")

            # ---- Zero-shot: every example, then an upload, the top-k slider, the templates, bad input ----
            labels.fill(LABELS)
            names = _example_names(page, "zs_examples")
            assert len(names) == 6
            for i in range(len(names)):
                name = _click_example(page, expect, "zs_examples", i, "zs_image")
                want = H.classify(state, _example_path(name), LABELS, "short", top_k=5)
                page.locator("#classify").click()
                expect(top).to_have_text(want[0][0], timeout=WAIT)
            expect(page.get_by_text("Probabilities")).to_have_count(0)  # shown once: no bar plot beside the label

            page.locator("#zs_image input[type=file]").set_input_files(str(small))
            shown = page.locator("#zs_image img[src$='blue32.png']").first
            expect(shown).to_be_visible(timeout=WAIT)
            box = shown.bounding_box()
            assert box["width"] >= 200 or box["height"] >= 200, box  # a 32 px upload fills its 300 px box
            assert shown.evaluate("e => getComputedStyle(e).imageRendering") == "pixelated"
            _set_slider(page, "zs_k", 2)
            page.locator("#classify").click()
            expect(top).to_have_text("blue", timeout=WAIT)
            expect(page.locator("#prediction .confidence-set")).to_have_count(2, timeout=WAIT)

            custom = page.locator("#zs_custom textarea")
            expect(custom).to_be_hidden()
            page.locator("#zs_tpl input").click()
            page.get_by_role("option", name="custom").click()
            expect(custom).to_be_visible(timeout=WAIT)
            custom.fill("a {} picture\nsomething {}")
            page.locator("#classify").click()
            expect(top).to_have_text("blue", timeout=WAIT)

            labels.fill(" , ")
            page.locator("#classify").click()
            expect(page.get_by_text("no labels").first).to_be_visible(timeout=WAIT)
            labels.fill(LABELS)

            # The webcam (Chromium's fake camera) and the clipboard: each fills the input, and Classify answers.
            uploaded = page.locator("#zs_image img[src*='gradio_api/file=']")
            page.locator("#zs_image button[aria-label='Remove Image']").click()
            expect(uploaded).to_have_count(0, timeout=WAIT)
            page.locator("#zs_image button[aria-label='Capture from camera']").click()
            page.locator("#zs_image").get_by_text("Click to Access Webcam").click()
            # capture only once the camera delivers frames (a click before the stream starts captures nothing)
            page.wait_for_function(
                "() => { const v = document.querySelector('#zs_image video');"
                " return v !== null && v.readyState >= 2 && v.videoWidth > 0; }",
                timeout=WAIT,
            )
            page.locator("#zs_image button[aria-label='capture photo']").click()
            expect(uploaded.first).to_be_visible(timeout=WAIT)
            page.locator("#classify").click()
            expect(top).to_have_text(ANY_LABEL, timeout=WAIT)

            page.locator("#zs_image button[aria-label='Remove Image']").click()
            expect(uploaded).to_have_count(0, timeout=WAIT)
            page.evaluate(COPY_IMAGE, base64.b64encode(small.read_bytes()).decode())
            page.locator("#zs_image button[aria-label='Paste from clipboard']").click()
            expect(uploaded.first).to_be_visible(timeout=WAIT)
            page.locator("#classify").click()
            expect(top).to_have_text("blue", timeout=WAIT)

            # ---- Retrieval: text (button and Enter), the k slider, an image query; full captions ----
            page.get_by_role("tab", name="Retrieval").click()
            captions = page.locator("#ret_gallery .caption-label")
            page.locator("#ret_text input, #ret_text textarea").first.fill("red")
            page.locator("#ret_text_btn").click()
            expect(captions).to_have_count(3, timeout=WAIT)
            want = [f"{h.score:.3f} · {h.caption}" for h in H.search_by_text(state, "red", 12)]
            expect(captions).to_have_text(want, timeout=WAIT)
            for caption in captions.all():  # the whole caption is on screen, not cut at the thumbnail's width
                assert caption.evaluate("e => e.scrollWidth <= e.clientWidth && e.scrollHeight <= e.clientHeight")
            expect(page.locator("#ret_gallery img")).to_have_count(3)
            expect(page.locator("#ret_table")).to_contain_text(f"a red {LONG}")

            _set_slider(page, "ret_k", 1)
            query = page.locator("#ret_text input, #ret_text textarea").first
            query.fill("green")
            query.press("Enter")
            expect(captions).to_have_count(1, timeout=WAIT)
            expect(captions).to_contain_text(f"a green {LONG}")

            _set_slider(page, "ret_k", 2)
            page.locator("#ret_image input[type=file]").set_input_files(str(green))
            expect(page.locator("#ret_image img[src$='green.png']").first).to_be_visible(timeout=WAIT)
            page.locator("#ret_image_btn").click()
            want = [f"{h.score:.3f} · {h.caption}" for h in H.search_by_image(state, str(green), 2)]
            expect(captions).to_have_text(want, timeout=WAIT)

            # ---- Captioning: every example, the prefix, each decoding mode, the sliders ----
            page.get_by_role("tab", name="Captioning").click()
            out = page.locator("#cap_out textarea")
            for i in range(len(_example_names(page, "cap_examples"))):
                name = _click_example(page, expect, "cap_examples", i, "cap_image")
                page.locator("#cap_btn").click()
                expect(out).to_have_value(H.caption(state, _example_path(name)), timeout=WAIT)
            page.locator("#cap_image input[type=file]").set_input_files(str(small))
            expect(page.locator("#cap_image img[src$='blue32.png']").first).to_be_visible(timeout=WAIT)
            page.locator("#cap_prefix input, #cap_prefix textarea").first.fill("look:")
            for mode in ("greedy", "sample", "beam"):
                page.locator("#cap_mode").get_by_text(mode, exact=True).click()
                for slider, value in (("cap_beams", 4), ("cap_temp", 0.7), ("cap_top_p", 0.8)):
                    _set_slider(page, slider, value)
                _set_slider(page, "cap_max", 1)
                page.locator("#cap_btn").click()
                expect(out).to_have_value("look: blue", timeout=WAIT)
                _set_slider(page, "cap_max", 30)
                page.locator("#cap_btn").click()
                expect(out).to_have_value("look: blue picture", timeout=WAIT)
            assert state.pipeline.last_gen["do_sample"] is False and state.pipeline.last_gen["num_beams"] == 4

            # ---- Compare captions: every example, both caption boxes ----
            page.get_by_role("tab", name="Compare captions").click()
            page.locator("#cmp_first input, #cmp_first textarea").first.fill("a blue thing")
            page.locator("#cmp_second input, #cmp_second textarea").first.fill("a red thing")
            verdict = page.locator("#cmp_verdict")
            for i in range(len(_example_names(page, "cmp_examples"))):
                name = _click_example(page, expect, "cmp_examples", i, "cmp_image")
                best = H.compare_captions(state, _example_path(name), "a blue thing", "a red thing")[0][0]
                page.locator("#cmp_btn").click()
                expect(verdict).to_contain_text(f"{best} fits better", timeout=WAIT)
                expect(page.locator("#cmp_out [data-testid='label-output-value']")).to_have_text(best)
            page.screenshot(path=str(shot), full_page=True)

            # ---- The model picker: this tab switches to the other run; the header and the tabs follow ----
            page.get_by_text("Model", exact=True).click()
            page.locator("#picker input").click()
            page.get_by_role("option", name=other).click()
            expect(page.locator("#banner")).to_contain_text(other, timeout=WAIT)
            expect(page.locator("#banner")).not_to_contain_text("Model: fake")
            page.wait_for_function(NO_WAY_TO_CAPTIONING, timeout=WAIT)  # this model cannot caption
            page.get_by_role("tab", name="Zero-shot").click()
            page.locator("#classify").click()
            expect(top).to_have_text(ANY_LABEL, timeout=WAIT)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("MMCL_SCREENSHOT_DIR")  # to look at the page after the run (tmp_path is cleaned up)
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
