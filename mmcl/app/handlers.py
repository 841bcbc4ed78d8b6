"""What the app's buttons do, as plain Python: no Gradio here, so every path is unit-testable.

The UI (`mmcl.app.ui`) calls these functions and turns their `UserError`s into messages in the page.
`AppState` holds the model (an `mmcl.inference.Encoder`) and the retrieval index shared by every browser
session of one server; `ModelChoices` the other run folders the server was started with, which one session
may switch to (`AppState.for_session`) without changing what any other session sees. Zero-shot
classification is `mmcl.eval.zeroshot`'s, with the model's own logit scale.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmcl.data.decode import MAX_PIXELS
from mmcl.data.decode import load_image as decode_file
from mmcl.eval.zeroshot import build_classifier, class_probabilities
from mmcl.index import EmbeddingIndex, thumbs_dir
from mmcl.inference import Encoder
from mmcl.utils import UserError

log = logging.getLogger("mmcl")

DEFAULT_RUN = "runs/demo"
DEMO_COMMAND = "mmcl demo"
TEMPLATE_CHOICES = ("none", "short", "openai", "custom")
DEFAULT_LABELS = "red circle, blue square, green triangle, yellow star, purple cross"
MAX_LABELS = 1000
MAX_PROMPTS = 20_000  # labels x templates encoded per request
TEXT_BATCH = 256
MAX_BYTES = 20 * 2**20  # an image file, however it arrives (`mmcl app --max-file-size`)


@dataclass
class Hit:
    """One retrieval result; `image` is an absolute path inside the index's thumbnail folder, or None."""

    rank: int
    score: float
    caption: str
    key: str
    image: str | None


class ModelChoices:
    """The run folders one server may switch a session to: named when it starts, each loaded once on first use.

    A session names a run by the exact string it was given at start; nothing a browser sends is ever used as a
    path, so no other folder on the server can be loaded.

    Args:
        runs: run or checkpoint folders, as given on the command line (each must exist).
        loader: path -> Encoder; default `mmcl.app.models.load_run`.
    """

    def __init__(self, runs: Sequence[str], loader: Callable[[str], Encoder] | None = None) -> None:
        self.runs = tuple(dict.fromkeys(str(r).strip() for r in runs if str(r).strip()))
        for run in self.runs:
            if not Path(run).expanduser().exists():
                raise UserError(f"--allow-runs {run}: no such run or checkpoint folder")
        self._loader = loader
        self._loaded: dict[str, Encoder] = {}
        self._indexes: dict[str, tuple[EmbeddingIndex, Path] | None] = {}
        self._lock = threading.Lock()

    def index_dirs(self) -> list[Path]:
        """The runs' own index folders (`RUN/index`), which a session switched to that run searches."""
        return [d for run in self.runs if ((d := Path(run).expanduser() / "index") / "manifest.json").is_file()]

    def index_of(self, name: str) -> tuple[EmbeddingIndex, Path] | None:
        """The index of run `name` (`RUN/index`, loaded once), or None when it has none."""
        if name not in self.runs:
            return None
        with self._lock:
            if name not in self._indexes:
                folder = Path(name).expanduser() / "index"
                found = (folder / "manifest.json").is_file()
                self._indexes[name] = (EmbeddingIndex.load(folder), folder) if found else None
            return self._indexes[name]

    def load(self, name: str) -> Encoder:
        """The model of run `name`, loading it the first time; a name not given at start is refused."""
        if name not in self.runs:
            allowed = ", ".join(self.runs) or "none"
            raise UserError(f"'{name}' is not one of the runs this server was started with ({allowed})")
        with self._lock:  # one load per run, however many sessions ask at once
            if name not in self._loaded:
                if self._loader is None:
                    from mmcl.app.models import load_run

                    self._loaded[name] = load_run(name)
                else:
                    self._loaded[name] = self._loader(name)
            return self._loaded[name]


@dataclass
class AppState:
    """The model and index one server answers with; a session may see another model through `for_session`."""

    pipeline: Encoder | None = None
    model_name: str = ""
    index: EmbeddingIndex | None = None
    index_dir: Path | None = None
    max_pixels: int = MAX_PIXELS
    max_bytes: int = MAX_BYTES
    choices: ModelChoices | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _text_cache: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _index_checks: dict = field(default_factory=dict, repr=False)  # (model, index) -> why they do not fit, or ""

    def set_pipeline(self, pipeline: Encoder, name: str) -> None:
        with self.lock:
            self.pipeline, self.model_name = pipeline, name
            self._text_cache.clear()

    def model_names(self) -> list[str]:
        """The server's own model first, then the runs a session may switch to."""
        own = [self.model_name] if self.pipeline is not None else []
        return list(dict.fromkeys([*own, *(self.choices.runs if self.choices else ())]))

    def for_session(self, name: str | None) -> AppState:
        """This state as one session sees it: with the run `name` chosen by that session, or the server's own.

        The view shares the index and the text-embedding cache (keyed by model) and never changes `self`.
        """
        if not name or name == self.model_name:
            return self
        if self.choices is None:
            raise UserError("model switching is off on this server (start it with --allow-runs RUN ...)")
        pipeline = self.choices.load(name)
        index, index_dir = self.choices.index_of(name) or (self.index, self.index_dir)  # the run's own, if any
        return dataclasses.replace(self, pipeline=pipeline, model_name=name, index=index, index_dir=index_dir)

    def index_mismatch(self) -> str:
        """Why this state's index must not answer this state's model ("" when it may); checked once per pair.

        Two models of the same width make vectors of the same shape that mean different things, so the width
        says nothing: the index's recorded weight fingerprint decides (`mmcl.index.check_model`, where the index
        records one), else the run folder it names, when both it and the served model are folders here.
        """
        if self.index is None or self.pipeline is None:
            return ""
        key = (id(self.pipeline), id(self.index))
        with self.lock:
            if key in self._index_checks:
                return self._index_checks[key][2]
        why = index_mismatch(self.index, self.index_dir, self.pipeline, self.model_name)
        with self.lock:
            self._index_checks[key] = (self.pipeline, self.index, why)  # keeps both alive: ids stay theirs
        return why

    def require_pipeline(self, need: str = "encode") -> Encoder:
        pipeline = self.pipeline
        if pipeline is None:
            raise UserError(
                f"no model loaded: train the demo model with `{DEMO_COMMAND}`, or start the app on a run (`mmcl app RUN`)"
            )
        if need == "encode" and not pipeline.can_encode:
            raise UserError(f"the model {self.model_name} has no contrastive encoders (a captioning-only model)")
        if need == "caption" and not pipeline.can_caption:
            raise UserError(f"the model {self.model_name} cannot caption (a contrastive-only model)")
        return pipeline

    def require_index(self) -> EmbeddingIndex:
        if self.index is None:
            raise UserError(
                "no retrieval index loaded: build one with `mmcl index build SHARDS --run RUN --out RUN/index` "
                "and start the app with `--index RUN/index`"
            )
        why = self.index_mismatch()
        if why:
            raise UserError(why)
        return self.index

    def classifier(self, pipeline: Encoder, labels: list[str], templates: list[str]) -> torch.Tensor:
        """(D, L) zero-shot classifier of `mmcl.eval.zeroshot.build_classifier` (CLIP's prompt ensembling); cached.

        Entries keep their pipeline alive, so its id cannot be reused by another model while cached.
        """
        key = (id(pipeline), tuple(labels), tuple(templates))
        with self.lock:
            if key in self._text_cache:
                self._text_cache.move_to_end(key)
                return self._text_cache[key][1]
        weights = build_classifier(pipeline.encode_texts, labels, templates, batch_size=TEXT_BATCH)
        with self.lock:
            self._text_cache[key] = (pipeline, weights)
            while len(self._text_cache) > 16:
                self._text_cache.popitem(last=False)
        return weights


def _same_folder(a: str, b: str) -> bool | None:
    """Whether two run names are one folder (one inside the other: a run and its checkpoint); None if not folders."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if not (pa.is_dir() and pb.is_dir()):
        return None
    pa, pb = pa.resolve(), pb.resolve()
    return pa.is_relative_to(pb) or pb.is_relative_to(pa)


def index_mismatch(index: EmbeddingIndex, index_dir: Path | None, pipeline: Encoder, model_name: str) -> str:
    """Why `index` must not answer queries embedded by `pipeline` ("" when it may, or when nothing tells).

    The weight fingerprint the index records decides where there is one (`mmcl.index.check_model`); an index
    without one is matched by the run folder it names (`info.model` or `info.run`) against the served run.
    """
    from mmcl.index import check_model

    where = f"the index {index_dir}" if index_dir else "the index"
    try:
        if check_model(index, pipeline, name=model_name):
            return ""
    except UserError as e:
        return f"{e}; retrieval is off for this model"
    built_with = str(index.info.get("model") or index.info.get("run") or "")
    if built_with and model_name and _same_folder(built_with, model_name) is False:
        return (
            f"{where} was built with {built_with}, not {model_name}: its embeddings would not match the queries; "
            f"build one for this model (`mmcl index build SOURCES --run {model_name} --out {model_name}/index`)"
        )
    return ""


def to_numpy(x: Any) -> np.ndarray:
    """(N, D) float32 numpy from a torch tensor or array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def load_image(value: Any, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An RGB image from what Gradio passes (a file path, PIL image or array); None asks for an upload."""
    if value is None or (isinstance(value, str) and not value):
        raise UserError("no image: upload one (or pick an example) first")
    if isinstance(value, Image.Image):
        if value.width * value.height > max_pixels:
            raise UserError(f"image refused: {value.width}x{value.height} is more than the {max_pixels:,} pixel limit")
        return value.convert("RGB")
    if isinstance(value, np.ndarray):
        return load_image(Image.fromarray(value), max_pixels)
    return decode_file(str(value), name=Path(str(value)).name, max_pixels=max_pixels)


def parse_labels(text: str, max_labels: int = MAX_LABELS) -> list[str]:
    """Class names from comma- or newline-separated text; blanks and repeats dropped, order kept."""
    labels = list(dict.fromkeys(p.strip() for line in (text or "").splitlines() for p in line.split(",")))
    labels = [label for label in labels if label]
    if not labels:
        raise UserError("no labels: type class names separated by commas or new lines, e.g. 'red circle, blue square'")
    if len(labels) > max_labels:
        raise UserError(f"{len(labels)} labels is more than the limit of {max_labels}")
    return labels


def resolve_templates(choice: str, custom: str = "") -> list[str]:
    """Prompt templates for a dropdown choice: a built-in set of `mmcl.eval.templates` or custom lines with `{}`."""
    from mmcl.eval.templates import load_templates, parse_templates

    if choice == "custom":
        return parse_templates((custom or "").splitlines(), source="custom templates")
    if choice not in TEMPLATE_CHOICES:
        raise UserError(f"unknown template set '{choice}'; choose one of {', '.join(TEMPLATE_CHOICES)}")
    return load_templates(choice)


def classify(
    state: AppState,
    image: Any,
    labels_text: str,
    template_choice: str = "short",
    custom_templates: str = "",
    top_k: int = 5,
) -> list[tuple[str, float]]:
    """Zero-shot classification: the top-k (label, probability) pairs, best first.

    Probabilities are `mmcl.eval.zeroshot.class_probabilities` with the model's own learned scale (within its
    own maximum): softmax over the labels for CLIP models, sigmoid(scale * cos + bias) per label for SigLIP.
    """
    pipeline = state.require_pipeline()
    labels = parse_labels(labels_text)
    templates = resolve_templates(template_choice, custom_templates)
    if len(labels) * len(templates) > MAX_PROMPTS:
        raise UserError(
            f"{len(labels)} labels x {len(templates)} templates = {len(labels) * len(templates)} prompts is more "
            f"than {MAX_PROMPTS}: pick the 'short' or 'none' template set or fewer labels"
        )
    picture = load_image(image, state.max_pixels)
    classifier = state.classifier(pipeline, labels, templates)  # (D, L)
    img = pipeline.encode_images([picture])  # (1, D)
    if img.shape[1] != classifier.shape[0]:
        raise UserError(f"image and text embeddings differ in size ({img.shape[1]} vs {classifier.shape[0]})")
    probs = class_probabilities(img, classifier, *pipeline.logit_scale_and_bias())[0]  # (L,)
    order = torch.sort(-probs, stable=True).indices[: max(1, int(top_k))].tolist()
    return [(labels[i], float(probs[i])) for i in order]


def _hits(state: AppState, scores: np.ndarray, metas: list[dict[str, Any] | None]) -> list[Hit]:
    root = thumbs_dir(state.index_dir).resolve() if state.index_dir else None
    hits = []
    for rank, (score, meta) in enumerate(zip(scores.tolist(), metas), 1):
        if meta is None:
            continue
        image = None
        if root is not None and meta.get("image"):
            path = (state.index_dir / meta["image"]).resolve()
            # Only files inside the index's own thumbnail folder are ever handed to the UI.
            if path.is_relative_to(root) and path.is_file():
                image = str(path)
        hits.append(Hit(rank, float(score), str(meta.get("caption", "")), str(meta.get("key", "")), image))
    return hits


def _check_dims(state: AppState, index: EmbeddingIndex, query: np.ndarray) -> None:
    if len(index) and query.shape[1] != index.dim:  # an empty index says so in search()
        built_with = index.info.get("model", "another model")
        raise UserError(
            f"the index holds {index.dim}-d embeddings from {built_with} but the model {state.model_name} makes "
            f"{query.shape[1]}-d ones: rebuild the index with this model (`mmcl index build ... --run RUN`)"
        )


def search_by_text(state: AppState, query: str, k: int = 12) -> list[Hit]:
    """Images of the index nearest to the text `query`."""
    query = (query or "").strip()
    if not query:
        raise UserError("empty query: type what to look for, e.g. 'a red circle'")
    pipeline, index = state.require_pipeline(), state.require_index()
    vec = to_numpy(pipeline.encode_texts([query]))
    _check_dims(state, index, vec)
    scores, metas = index.search(vec, k)
    return _hits(state, scores[0], metas[0])


def search_by_image(state: AppState, image: Any, k: int = 12) -> list[Hit]:
    """Images of the index (with their captions) nearest to an uploaded image."""
    pipeline, index = state.require_pipeline(), state.require_index()
    vec = to_numpy(pipeline.encode_images([load_image(image, state.max_pixels)]))
    _check_dims(state, index, vec)
    scores, metas = index.search(vec, k)
    return _hits(state, scores[0], metas[0])


def generation_kwargs(
    mode: str, max_new_tokens: int = 30, num_beams: int = 3, temperature: float = 1.0, top_p: float = 0.9
) -> dict[str, Any]:
    """`generate()` keyword arguments for a decoding mode: 'greedy', 'beam' or 'sample'."""
    if not 1 <= int(max_new_tokens) <= 512:
        raise UserError(f"max tokens must be between 1 and 512, got {max_new_tokens}")
    gen: dict[str, Any] = {"max_new_tokens": int(max_new_tokens)}
    if mode == "greedy":
        return {**gen, "num_beams": 1, "do_sample": False}
    if mode == "beam":
        return {**gen, "num_beams": max(2, int(num_beams)), "do_sample": False}
    if mode == "sample":
        if temperature <= 0 or not 0 < top_p <= 1:
            raise UserError("sampling needs temperature > 0 and 0 < top-p <= 1")
        return {**gen, "num_beams": 1, "do_sample": True, "temperature": float(temperature), "top_p": float(top_p)}
    raise UserError(f"unknown decoding mode '{mode}'; choose greedy, beam or sample")


def caption(state: AppState, image: Any, prefix: str = "", **gen: Any) -> str:
    """A caption for one image, continuing `prefix` when given (PrefixLM)."""
    pipeline = state.require_pipeline("caption")
    picture = load_image(image, state.max_pixels)
    prefix = (prefix or "").strip()
    return pipeline.caption([picture], prefix=[prefix] if prefix else None, **gen)[0]


def startup_message(state: AppState, run: str | None) -> str:
    """The banner: what is loaded, or the one command that makes the demo model."""
    if state.pipeline is None:
        where = run or DEFAULT_RUN
        return (
            f"**No model found at `{where}`.** Train the demo model (a few minutes on a CPU) with:\n\n"
            f"```\n{DEMO_COMMAND}\n```\n\nthen restart `mmcl app` (or `mmcl app RUN` for another run folder)."
        )
    lines = [f"Model: `{state.model_name}`"]
    why = state.index_mismatch()
    if state.index is not None and why:
        lines.append(f"Index: none for this model (`{state.index_dir}` is another model's: retrieval is off)")
    elif state.index is not None:
        built_with = state.index.info.get("model") or state.index.info.get("run")
        note = f", embedded with `{built_with}`" if built_with and built_with != state.model_name else ""
        lines.append(f"Index: `{state.index_dir}` ({len(state.index)} images, {state.index.structure}{note})")
    else:
        lines.append("Index: none (retrieval needs `mmcl index build`)")
    return " · ".join(lines)


def example_images(folder: str | Path, n: int = 6, size: int = 64) -> list[str]:
    """Write a few pictures of the built-in synthetic dataset (test split) to `folder`; returns their paths."""
    from mmcl.data.synthetic import generate

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        sample = generate(i, image_size=size, split="test")
        path = folder / f"{i:02d}_{sample.classname.replace(' ', '_')}.png"
        if not path.is_file():
            sample.image.save(path)
        paths.append(str(path))
    return paths


def compare_captions(state: AppState, image: Any, first: str, second: str) -> list[tuple[str, float, float]]:
    """Which of two captions fits the image better: (caption, cosine, probability) for each, better first.

    The compositional eval's question for one image (`mmcl.eval.compositional.compare_captions`); probabilities
    use the model's own scale, as `classify` does.
    """
    from mmcl.eval.compositional import compare_captions as compare

    captions = [(first or "").strip(), (second or "").strip()]
    if not all(captions):
        raise UserError("type two captions to compare, e.g. 'a red circle' and 'a blue circle'")
    if captions[0] == captions[1]:
        raise UserError("the two captions are the same: change one of them")
    pipeline = state.require_pipeline()
    cosines, probs = compare(pipeline, load_image(image, state.max_pixels), captions)
    rows = list(zip(captions, cosines, probs))
    return sorted(rows, key=lambda row: -row[1])
