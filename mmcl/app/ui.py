"""The Gradio 6 Blocks app: zero-shot, retrieval and captioning tabs over `mmcl.app.handlers`.

Security defaults: binds 127.0.0.1, uploads capped by `max_file_size`, image URLs refused (never fetched),
only the index's thumbnail folder in `allowed_paths`, no share link unless asked, no analytics, no web fonts
fetched. The model picker only offers the run folders named at start (`--allow-runs`), changes the model of
the one browser session that uses it (a `gr.State`), and is no API endpoint. Bad input of any kind ends in a
message in the page, never a dead server.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from mmcl.app import handlers as H  # noqa: E402
from mmcl.data.decode import MAX_PIXELS, check_image  # noqa: E402
from mmcl.index import EmbeddingIndex, thumbs_dir  # noqa: E402
from mmcl.utils import UserError  # noqa: E402

log = logging.getLogger("mmcl")

THEME_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # local fonts: the page fetches nothing from outside
# Small pictures (the synthetic set is 32-64 px) fill their box, scaled up with visible pixels instead of shown
# at native size or blurred; gallery captions wrap instead of being cut at the thumbnail's width.
CSS = """
#banner {font-size: 0.95em}
footer {display: none !important}
.mmcl-image img {object-fit: contain !important; image-rendering: pixelated}
#ret_gallery .caption-label {white-space: normal; overflow-wrap: anywhere; max-width: calc(100% - 8px)}
"""


def _image(label: str, sources: list[str], limits: H.AppState, **kw: Any) -> gr.Image:
    """`gr.Image` that refuses URLs, non-images and oversized images with a clear message before any fetch or decode.

    Gradio's own preprocessing opens the upload with PIL; this checks the file first (its size in bytes, then
    its pixel count from the header: the decompression-bomb guard) and hands the handler a file path, which it
    decodes itself. Every way an image can arrive meets the same limits (`limits.max_bytes`, `limits.max_pixels`):
    an upload (also bounded by Gradio while it streams), a path to a file already on the server (Gradio's upload
    folder is shared by every app on the machine, whatever their limits), and an image inline in the request
    (bounded by `guard.BodyLimit`; a `data:` URL is never decoded: the image is the file at `path`). A URL in place
    of an upload is refused where Gradio would download it. The checks wrap the instance's methods: subclassing a
    Gradio component would make Gradio write a .pyi stub next to this file at import time.
    """
    from mmcl.app.guard import check_file_size, refuse_urls

    image = gr.Image(label=label, type="filepath", image_mode=None, sources=sources, elem_classes=["mmcl-image"], **kw)
    gradio_preprocess = image.preprocess
    gradio_fetch, gradio_fetch_sync = image.async_move_resource_to_block_cache, image.move_resource_to_block_cache

    def no_url(url_or_path: Any) -> None:
        try:
            refuse_urls(None if url_or_path is None else str(url_or_path))
        except UserError as e:
            raise gr.Error(str(e)) from None

    # Gradio downloads a URL given as the image's path before `preprocess` runs: refuse it at that point.
    async def fetch(url_or_path: Any) -> str | None:
        no_url(url_or_path)
        return await gradio_fetch(url_or_path)

    def fetch_sync(url_or_path: Any) -> str | None:
        no_url(url_or_path)
        return gradio_fetch_sync(url_or_path)

    def preprocess(payload: Any) -> Any:
        try:
            url = getattr(payload, "url", None)
            if isinstance(url, str) and url[:5].lower() == "data:":  # Gradio would decode it, whatever its size
                payload = payload.model_copy(update={"url": None})
            path = getattr(payload, "path", None)
            if path:
                name = getattr(payload, "orig_name", None) or Path(path).name
                check_file_size(path, limits.max_bytes, name=name)
                check_image(path, name=name, max_pixels=limits.max_pixels)
        except UserError as e:
            raise gr.Error(str(e)) from None
        return gradio_preprocess(payload)

    image.preprocess = preprocess
    image.async_move_resource_to_block_cache = fetch
    image.move_resource_to_block_cache = fetch_sync
    return image


def _examples(paths: Sequence[str], target: gr.Image, elem_id: str, label: str = "Examples") -> gr.Examples:
    """Example thumbnails that fill `target` when clicked, through the queue like every other event of the page.

    Gradio loads an (uncached) example with a queue-less event, which the page posts to `/gradio_api/run/predict`;
    `NamedCallGuard` refuses that route for every event (it would run any event by index, outside the queue's
    limits), so the load event joins the queue instead, without a concurrency limit: it only returns a file
    Gradio already holds, and must not wait behind a long classification.
    """
    from gradio.context import get_blocks_context

    examples = gr.Examples([[p] for p in paths], inputs=[target], label=label, elem_id=elem_id)
    load = get_blocks_context().fns[examples.load_input_event["id"]]
    load.queue, load.concurrency_limit = True, None
    return examples


def _guard(fn: Callable) -> Callable:
    """Run a handler; bad input becomes a `gr.Error` shown in the page, and the server keeps serving."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except UserError as e:
            raise gr.Error(str(e)) from None
        except Exception as e:
            log.exception("app: %s failed", fn.__name__)
            raise gr.Error(f"internal error in {fn.__name__}: {type(e).__name__} (details in the server log)") from None

    return wrapper


def build_app(state: H.AppState, run: str | None = None, examples_dir: str | None = None) -> gr.Blocks:
    """The Blocks UI answering with `state`; a model picker when `state.choices` names runs to switch to.

    Every handler takes the session's chosen run (a `gr.State`, "" = the server's own model) as its last input
    and answers with `state.for_session(chosen)`, so one visitor's choice never changes another's model.
    """

    def visibility(view: H.AppState) -> tuple[Any, Any, Any]:
        """Tab updates for a session's model: a tab it cannot use is hidden, and disabled where Gradio's page
        keeps showing a tab hidden by an update."""
        p = view.pipeline
        encode = p is None or p.can_encode
        caption = p is not None and p.can_caption
        return (
            gr.Tab(visible=encode, interactive=encode),
            gr.Tab(visible=encode, interactive=encode),
            gr.Tab(visible=caption, interactive=caption),
        )

    @_guard
    def classify(image: Any, labels: str, templates: str, custom: str, top_k: float, chosen: str) -> dict:
        top = H.classify(state.for_session(chosen), image, labels, templates, custom, int(top_k))
        return {name: p for name, p in top}

    def show_hits(hits: list[H.Hit]) -> tuple[list, list]:
        gallery = [(h.image, f"{h.score:.3f} · {h.caption}") for h in hits if h.image]
        rows = [[h.rank, round(h.score, 4), h.caption, h.key] for h in hits]
        return gallery, rows

    @_guard
    def search_text(query: str, k: float, chosen: str) -> tuple[list, list]:
        return show_hits(H.search_by_text(state.for_session(chosen), query, int(k)))

    @_guard
    def search_image(image: Any, k: float, chosen: str) -> tuple[list, list]:
        return show_hits(H.search_by_image(state.for_session(chosen), image, int(k)))

    @_guard
    def caption(
        image: Any, prefix: str, mode: str, max_tokens: float, beams: float, temp: float, top_p: float, chosen: str
    ) -> str:
        gen = H.generation_kwargs(mode, int(max_tokens), int(beams), float(temp), float(top_p))
        return H.caption(state.for_session(chosen), image, prefix, **gen)

    @_guard
    def switch_model(name: str) -> tuple[Any, ...]:
        view = state.for_session(name)  # refuses a name that is not the server's own model or an allowed run
        chosen = "" if view is state else name
        return (chosen, H.startup_message(view, view.model_name or run), *visibility(view))

    examples = H.example_images(examples_dir or Path(tempfile.gettempdir()) / "mmcl-app-examples")
    with gr.Blocks(title="mmcl", analytics_enabled=False) as demo:
        gr.Markdown("## mmcl: zero-shot classification, retrieval and captioning")
        banner = gr.Markdown(H.startup_message(state, run), elem_id="banner")
        chosen = gr.State("")  # this session's run from the picker; "" = the server's own model
        with gr.Tabs():
            with gr.Tab("Zero-shot", id="zeroshot") as zs_tab:
                with gr.Row():
                    with gr.Column():
                        zs_image = _image(
                            "Image", ["upload", "webcam", "clipboard"], state, height=300, elem_id="zs_image"
                        )
                        zs_labels = gr.Textbox(
                            H.DEFAULT_LABELS, label="Labels (comma or newline separated)", lines=3, elem_id="zs_labels"
                        )
                        with gr.Row():
                            zs_tpl = gr.Dropdown(
                                list(H.TEMPLATE_CHOICES), value="short", label="Prompt templates", elem_id="zs_tpl"
                            )
                            zs_k = gr.Slider(1, 20, value=5, step=1, label="Top k", elem_id="zs_k")
                        zs_custom = gr.Textbox(
                            "a photo of a {}.",
                            label="Custom templates ({} = label)",
                            lines=2,
                            visible=False,
                            elem_id="zs_custom",
                        )
                        zs_btn = gr.Button("Classify", variant="primary", elem_id="classify")
                    with gr.Column():
                        zs_out = gr.Label(label="Prediction", num_top_classes=20, elem_id="prediction")
                _examples(examples, zs_image, "zs_examples", "Examples (built-in synthetic test images)")
            with gr.Tab("Retrieval", id="retrieval") as ret_tab:
                with gr.Row():
                    with gr.Column():
                        ret_text = gr.Textbox(label="Text query", placeholder="a red circle", elem_id="ret_text")
                        ret_text_btn = gr.Button("Search by text", variant="primary", elem_id="ret_text_btn")
                    with gr.Column():
                        ret_image = _image(
                            "Image query", ["upload", "clipboard"], state, height=200, elem_id="ret_image"
                        )
                        ret_image_btn = gr.Button("Search by image", elem_id="ret_image_btn")
                ret_k = gr.Slider(1, 50, value=12, step=1, label="Results (k)", elem_id="ret_k")
                ret_gallery = gr.Gallery(
                    label="Nearest images (score · caption)", columns=6, height="auto", elem_id="ret_gallery"
                )
                ret_table = gr.Dataframe(
                    headers=["rank", "score", "caption", "key"],
                    label="Captions",
                    interactive=False,
                    elem_id="ret_table",
                )
            cap_visible = state.pipeline is not None and state.pipeline.can_caption
            with gr.Tab("Captioning", id="captioning", visible=cap_visible) as cap_tab:
                with gr.Row():
                    with gr.Column():
                        cap_image = _image(
                            "Image", ["upload", "webcam", "clipboard"], state, height=300, elem_id="cap_image"
                        )
                        cap_prefix = gr.Textbox(
                            label="Prefix (optional: the caption continues it)", elem_id="cap_prefix"
                        )
                        cap_mode = gr.Radio(
                            ["greedy", "beam", "sample"], value="beam", label="Decoding", elem_id="cap_mode"
                        )
                        with gr.Row():
                            cap_max = gr.Slider(1, 128, value=30, step=1, label="Max new tokens", elem_id="cap_max")
                            cap_beams = gr.Slider(2, 8, value=3, step=1, label="Beams", elem_id="cap_beams")
                        with gr.Row():
                            cap_temp = gr.Slider(
                                0.1, 2.0, value=1.0, step=0.05, label="Temperature (sample)", elem_id="cap_temp"
                            )
                            cap_top_p = gr.Slider(
                                0.05, 1.0, value=0.9, step=0.05, label="Top-p (sample)", elem_id="cap_top_p"
                            )
                        cap_btn = gr.Button("Caption", variant="primary", elem_id="cap_btn")
                    with gr.Column():
                        cap_out = gr.Textbox(label="Caption", lines=3, elem_id="cap_out")
                _examples(examples, cap_image, "cap_examples")
            with gr.Tab("Compare captions", id="compare"):  # the compositional eval's question, for one image

                @_guard
                def compare(image: Any, first: str, second: str, chosen: str) -> tuple[dict, str]:
                    rows = H.compare_captions(state.for_session(chosen), image, first, second)
                    (best, cos_best, _), (other, cos_other, _) = rows
                    verdict = f"**{best}** fits better than *{other}* (cosine {cos_best:.3f} vs {cos_other:.3f})"
                    return {caption: prob for caption, _, prob in rows}, verdict

                with gr.Row():
                    with gr.Column():
                        cmp_image = _image(
                            "Image", ["upload", "webcam", "clipboard"], state, height=300, elem_id="cmp_image"
                        )
                        cmp_first = gr.Textbox("a red circle", label="Caption A", elem_id="cmp_first")
                        cmp_second = gr.Textbox(
                            "a blue circle", label="Caption B (e.g. a hard negative)", elem_id="cmp_second"
                        )
                        cmp_btn = gr.Button("Which caption fits better?", variant="primary", elem_id="cmp_btn")
                    with gr.Column():
                        cmp_out = gr.Label(label="Probability (the model's own scale)", elem_id="cmp_out")
                        cmp_verdict = gr.Markdown(elem_id="cmp_verdict")
                _examples(examples, cmp_image, "cmp_examples")
                cmp_inputs = [cmp_image, cmp_first, cmp_second, chosen]
                cmp_btn.click(compare, cmp_inputs, [cmp_out, cmp_verdict], api_name="compare_captions")
        if state.choices is not None and state.choices.runs:
            names = state.model_names()
            with gr.Accordion("Model", open=state.pipeline is None):
                picker = gr.Dropdown(
                    names,
                    value=state.model_name if state.pipeline is not None else None,
                    label="Model for this browser tab (the runs this server was started with)",
                    elem_id="picker",
                )
            # Not an API endpoint: hidden from the API page and gradio_client, named calls refused (NamedCallGuard).
            picker.input(switch_model, [picker], [chosen, banner, zs_tab, ret_tab, cap_tab], api_visibility="private")

        zs_tpl.change(lambda c: gr.Textbox(visible=c == "custom"), [zs_tpl], [zs_custom], api_visibility="private")
        zs_inputs = [zs_image, zs_labels, zs_tpl, zs_custom, zs_k, chosen]
        zs_btn.click(classify, zs_inputs, [zs_out], api_name="classify")
        ret_inputs = [ret_text, ret_k, chosen]
        ret_text_btn.click(search_text, ret_inputs, [ret_gallery, ret_table], api_name="search_text")
        ret_text.submit(search_text, ret_inputs, [ret_gallery, ret_table], api_visibility="private")
        ret_image_btn.click(search_image, [ret_image, ret_k, chosen], [ret_gallery, ret_table], api_name="search_image")
        cap_inputs = [cap_image, cap_prefix, cap_mode, cap_max, cap_beams, cap_temp, cap_top_p, chosen]
        cap_btn.click(caption, cap_inputs, [cap_out], api_name="caption")
    return demo


def make_state(
    run: str | None = None,
    index: str | None = None,
    open_clip: str = "",
    pretrained: str = "",
    max_pixels: int = MAX_PIXELS,
    allow_runs: Sequence[str] = (),
) -> tuple[H.AppState, str | None]:
    """The model and index to serve; with no run, `runs/demo` if it exists (else the UI shows `mmcl demo`).

    `allow_runs` are the run folders a browser session may switch to (checked to exist, loaded on first use).

    Returns:
        the state and the run folder the banner names.
    """
    from mmcl.app.models import OpenClipPipeline, load_run

    choices = H.ModelChoices(allow_runs) if allow_runs else None
    state = H.AppState(max_pixels=max_pixels, choices=choices)
    if open_clip:
        state.set_pipeline(
            OpenClipPipeline(open_clip, pretrained), f"open_clip {open_clip} ({pretrained or 'random init'})"
        )
    elif run or Path(H.DEFAULT_RUN).exists():
        run = run or H.DEFAULT_RUN
        state.set_pipeline(load_run(run), run)
    if index is None and run and (Path(run) / "index" / "manifest.json").is_file():
        index = str(Path(run) / "index")
    if index is not None:
        state.index, state.index_dir = EmbeddingIndex.load(index), Path(index)
    return state, run


def launch(
    run: str | None = None,
    index: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    share: bool = False,
    open_clip: str = "",
    pretrained: str = "",
    max_file_size: str | int = "20mb",
    max_pixels: int = MAX_PIXELS,
    concurrency: int = 2,
    queue_size: int = 64,
    allow_runs: Sequence[str] = (),
    prevent_thread_lock: bool = False,
    quiet: bool = False,
    state: H.AppState | None = None,
    auth: tuple[str, str] | None = None,
    allowed_origins: tuple[str, ...] = (),
    allowed_hosts: tuple[str, ...] = (),
) -> tuple[gr.Blocks, str]:
    """Build and serve the app; returns the Blocks and the local URL.

    Args:
        run: run or checkpoint folder (default `runs/demo` when it exists).
        index: index folder (default `RUN/index` when it exists).
        host, port, share: where to listen; `share` opens a public Gradio link (off unless asked).
        open_clip, pretrained: serve an open_clip model instead of a run.
        max_file_size: size limit of an image file however it arrives, and (as base64) of a request body
            ('20mb' or bytes).
        max_pixels: decoded-size limit for images, checked from the header before decoding.
        concurrency: events running at once (each may use all torch threads); more requests wait in the queue.
        queue_size: requests that may wait; more are refused with a 'queue full' message.
        allow_runs: run folders a browser session may switch to (a picker offering only these; none = no picker).
        prevent_thread_lock: return at once (tests, notebooks) instead of serving until interrupted.
        state: a ready state (tests inject fake models); overrides run/index/open_clip/allow_runs.
        auth: (user, password) for Gradio's login page; advisable on any host other than localhost.
        allowed_origins: other web origins whose pages may call the server (default: only its own).
        allowed_hosts: host names the server may be reached under besides localhost and `host` (`HostGuard`).
    """
    import faiss
    from starlette.middleware import Middleware

    from mmcl.app.guard import (
        BodyLimit,
        HostGuard,
        NamedCallGuard,
        OriginGuard,
        body_limit,
        check_listen,
        parse_file_size,
    )

    max_bytes = parse_file_size(max_file_size)
    check_listen(host, port)  # before the model loads: a taken port is a one-line error at once

    # One query per request: faiss's OpenMP threads only add synchronisation there (measured 2.5x slower
    # single-query search at 100k vectors on 2 shared cores); concurrent requests use the cores instead.
    faiss.omp_set_num_threads(1)
    if state is None:
        state, run = make_state(run, index, open_clip, pretrained, max_pixels, allow_runs)
    state.max_bytes = max_bytes  # every image, however it arrives (`_image`)
    demo = build_app(state, run)
    public = [fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public" and fn.api_name]
    demo.queue(default_concurrency_limit=concurrency, max_size=queue_size)
    index_dirs = ([state.index_dir] if state.index_dir else []) + (state.choices.index_dirs() if state.choices else [])
    allowed = list(dict.fromkeys(str(thumbs_dir(d).resolve()) for d in index_dirs))  # thumbnails, nothing else
    theme = gr.themes.Soft(font=THEME_FONTS, font_mono=["ui-monospace", "monospace"])
    middleware = [
        Middleware(HostGuard, bound=host, allowed=allowed_hosts, share_url=lambda: demo.share_url),
        Middleware(OriginGuard, allowed=allowed_origins),
        Middleware(NamedCallGuard, public=public),
        Middleware(BodyLimit, limit=body_limit(max_bytes)),
    ]
    try:
        _, url, _ = demo.launch(
            server_name=host,
            server_port=port,
            share=share,
            max_file_size=max_bytes,
            allowed_paths=allowed,
            prevent_thread_lock=prevent_thread_lock,
            quiet=quiet,
            theme=theme,
            css=CSS,
            footer_links=[],
            ssr_mode=False,
            mcp_server=False,
            auth=auth,
            app_kwargs={"middleware": middleware},
        )
    except OSError as e:  # "Cannot find empty port ...": taken between `check_listen` and the server's start
        raise UserError(f"cannot listen on {host}:{port}: {str(e).split('. ')[0]}") from None
    return demo, url
