"""The built-in captioned-image generator: coloured shapes on textured backgrounds.

Every sample is a pure function of (split, seed, index), so a dataset of any size
needs no download and two runs see the same pixels and captions. A scene holds one
to three copies of a *main* object (colour x shape = the zero-shot label, 8 x 5 = 40
classes) at a size and a position on a 3x3 grid, on a noisy background colour, and
sometimes a small distractor object of another class, so a model must bind colour
to shape rather than spot colours. Captions phrase the attributes in varied ways
and leave some out; the main object always comes first, which lets
`attributes_in_caption` read generated captions back.

    s = generate(0)  # s.image (64x64 RGB), s.caption, s.label, s.classname, s.attributes
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 225),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES: list[str] = ["circle", "square", "triangle", "star", "cross"]
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
}
# Muted colours that no object uses, so the object colour words stay unambiguous.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "brown": (115, 80, 55),
    "teal": (40, 125, 130),
    "beige": (205, 190, 160),
}
SIZES: list[str] = ["small", "large"]
# 3x3 grid cells (row, col) by name; a group of 2-3 objects sits on a line of cells instead.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (0, 1),
    "top right": (0, 2),
    "left": (1, 0),
    "center": (1, 1),
    "right": (1, 2),
    "bottom left": (2, 0),
    "bottom": (2, 1),
    "bottom right": (2, 2),
}
LINES: dict[str, list[tuple[int, int]]] = {
    "top": [(0, 0), (0, 1), (0, 2)],
    "bottom": [(2, 0), (2, 1), (2, 2)],
    "left": [(0, 0), (1, 0), (2, 0)],
    "right": [(0, 2), (1, 2), (2, 2)],
    "center": [(1, 0), (1, 1), (1, 2)],
}
CLASSNAMES: list[str] = [f"{c} {s}" for c in COLOURS for s in SHAPES]
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}

_RADIUS = {"small": 0.09, "large": 0.16}  # fraction of the image side; a grid cell is 1/3
_DISTRACTOR_P = 0.3


@dataclass
class SyntheticSample:
    """One generated sample.

    Attributes:
        image: the RGB picture.
        caption: a natural-language description, main object first.
        label: class index into `CLASSNAMES` (the main object's colour and shape).
        classname: `CLASSNAMES[label]`, e.g. "red circle".
        attributes: colour, shape, size, position, count and background of the main object(s).
        distractor: classname of the small extra object ("green cross"), or None. Captions that
            mention it do so after the main object and without a size word.
        distractor_position: the `POSITIONS` cell name of the distractor, or None.
        meta: where the sample comes from: split, seed and index.
    """

    image: Image.Image
    caption: str
    label: int
    classname: str
    attributes: dict[str, Any]
    distractor: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    distractor_position: str | None = None


def _rng(index: int, seed: int, split: str) -> random.Random:
    if split not in SPLITS:
        raise ValueError(f"unknown synthetic split '{split}' (choose from {', '.join(SPLITS)})")
    if index < 0:
        raise ValueError(f"synthetic sample index must be >= 0, got {index}")
    # A str seed is hashed with SHA-512 (stable across runs and platforms, unlike hash()), so
    # each (split, seed, index) gets its own stream; Python's RNG is far cheaper per scalar draw
    # than numpy's, which dominated the render time.
    return random.Random(f"mmcl-synthetic/{split}/{seed}/{index}")


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
        scale = r  # corner at r: the square's side is r*sqrt(2), area close to the circle's
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
        scale = r * 1.15
    elif shape == "star":
        pts = [
            (rad * math.cos(a), rad * math.sin(a))
            for k in range(10)
            for a, rad in [(-math.pi / 2 + k * math.pi / 5, 1.0 if k % 2 == 0 else 0.45)]
        ]
        scale = r * 1.15
    elif shape == "cross":
        w = 0.35
        pts = [
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
            (-w, -1),
        ]
        scale = r
    else:
        raise ValueError(f"unknown shape '{shape}'")
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + scale * (x * ca - y * sa), cy + scale * (x * sa + y * ca)) for x, y in pts]


def _draw(draw: ImageDraw.ImageDraw, shape: str, fill: tuple[int, ...], cx: float, cy: float, r: float, angle: float):
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=fill)


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def position_phrases(position: str, count: int) -> list[str]:
    """Every phrase a caption may use for `position` (a `POSITIONS` cell for one object, a `LINES` line for a group)."""
    if count > 1:
        return {
            "top": ["along the top", "at the top", "across the top"],
            "bottom": ["along the bottom", "at the bottom", "across the bottom"],
            "left": ["on the left", "down the left side", "along the left edge"],
            "right": ["on the right", "down the right side", "along the right edge"],
            "center": ["across the middle", "in the middle", "through the center"],
        }[position]
    if " " in position:
        v, h = position.split()
        upper = {"top": "upper", "bottom": "lower"}[v]
        return [f"in the {position} corner", f"at the {position}", f"in the {upper} {h} corner"]
    if position == "center":
        return ["in the center", "in the middle", "at the center"]
    side = "side" if position in ("left", "right") else "edge"
    return [f"at the {position}", f"near the {position}", f"on the {position} {side}"]


def _position_phrase(rng: random.Random, position: str, count: int) -> str:
    return rng.choice(position_phrases(position, count))


def _caption(rng: random.Random, attrs: dict[str, Any], distractor: str | None) -> str:
    colour, shape, size, count = attrs["colour"], attrs["shape"], attrs["size"], attrs["count"]
    size_word = None
    if rng.random() < 0.7:
        size_word = rng.choice(["large", "big"] if size == "large" else ["small", "little", "tiny"])
    noun = shape if count == 1 else PLURALS[shape]
    adjectives = " ".join(w for w in (size_word, colour) if w)
    if count == 1:
        det = rng.choices(["a", "one", "a single"], weights=[0.8, 0.1, 0.1])[0]
        if det == "a":
            det = _a(adjectives)
    else:
        det = "three" if count == 3 else rng.choice(["two", "a pair of"])
    np_ = f"{det} {adjectives} {noun}"
    parts = [np_]
    if rng.random() < 0.7:
        parts.append(_position_phrase(rng, attrs["position"], count))
    if rng.random() < 0.3:
        bg = attrs["background"]
        parts.append(rng.choice([f"on a {bg} background", f"against a {bg} backdrop"]))
    if distractor is not None and rng.random() < 0.6:
        parts.append(rng.choice([f"and {_a(distractor)} {distractor}", f"next to {_a(distractor)} {distractor}"]))
    body = " ".join(parts)
    frames = ["{}", "a picture of {}", "an image of {}", "a drawing of {}", "a photo of {}"]
    frames.append("there is {}" if count == 1 else "there are {}")
    return rng.choice(frames).format(body)


def _background(rng: random.Random, base: tuple[int, int, int], size: int) -> Image.Image:
    # Blotches vary mostly in brightness so the background keeps its named colour.
    shades = [rng.randint(-28, 28) for _ in range(16)]
    coarse = bytes(min(255, max(0, base[k % 3] + shades[k // 3] + rng.randint(-6, 6))) for k in range(16 * 3))
    return Image.frombytes("RGB", (4, 4), coarse).resize((size, size), Image.BILINEAR)


_NOISE: dict[int, Image.Image] = {}


def _noise(rng: random.Random, size: int) -> Image.Image:
    """A random crop of a fixed noise tile (values 0..24): per-pixel noise without per-image RNG cost."""
    tile = _NOISE.get(size)
    if tile is None:
        values = np.random.default_rng(1234).integers(0, 25, size=(2 * size, 2 * size, 3), dtype=np.uint8)
        tile = _NOISE[size] = Image.fromarray(values, "RGB")
    x, y = rng.randrange(size), rng.randrange(size)
    return tile.crop((x, y, x + size, y + size))


@dataclass
class Scene:
    """What a sample shows, before any pixel is drawn: the main object(s), the distractor, the background.

    `cells` are the main objects' grid cells (row, col); `d_cell` the distractor's, or None.
    """

    colour: str
    shape: str
    size: str
    count: int
    position: str
    cells: list[tuple[int, int]]
    background: str
    distractor: str | None = None
    d_cell: tuple[int, int] | None = None

    @property
    def attributes(self) -> dict[str, Any]:
        return {
            "colour": self.colour,
            "shape": self.shape,
            "size": self.size,
            "position": self.position,
            "count": self.count,
            "background": self.background,
        }

    @property
    def label(self) -> int:
        return CLASSNAMES.index(f"{self.colour} {self.shape}")


def _plan(rng: random.Random) -> Scene:
    label = rng.randrange(len(CLASSNAMES))
    colour, shape = list(COLOURS)[label // len(SHAPES)], SHAPES[label % len(SHAPES)]
    count = rng.choices([1, 2, 3], weights=[0.5, 0.25, 0.25])[0]
    size = rng.choice(SIZES)
    if count == 1:
        position = rng.choice(list(POSITIONS))
        cells = [POSITIONS[position]]
    else:
        position = rng.choice(list(LINES))
        line = LINES[position]
        cells = [line[i] for i in sorted(rng.sample(range(3), count))]
    background = rng.choice(list(BACKGROUNDS))
    scene = Scene(colour, shape, size, count, position, cells, background)

    # A distractor only where the main object stays obvious: beside a group or a large object.
    if (count > 1 or size == "large") and rng.random() < _DISTRACTOR_P:
        d_label = rng.randrange(len(CLASSNAMES) - 1)
        d_label += d_label >= label  # any class but the main one
        rows, cols = {r for r, _ in cells}, {c for _, c in cells}
        free = [(r, c) for r in range(3) for c in range(3) if (r, c) not in cells]
        if count > 1:  # keep the group's line to itself
            free = [
                (r, c) for r, c in free if not (len(rows) == 1 and r in rows) and not (len(cols) == 1 and c in cols)
            ]
        scene.d_cell = rng.choice(free)
        scene.distractor = CLASSNAMES[d_label]
    return scene


Jitter = tuple[float, float, float, tuple[int, int, int], float]


def _jitter(rng: random.Random) -> Jitter:
    """One object's raw draws (radius, x, y, colour noise, angle), in the order the generator always drew them."""
    u_r, u_x, u_y = rng.random(), rng.random(), rng.random()
    fill = (rng.randint(-20, 20), rng.randint(-20, 20), rng.randint(-20, 20))
    return u_r, u_x, u_y, fill, rng.random()


def _uniform(a: float, b: float, u: float) -> float:
    return a + (b - a) * u  # random.Random.uniform's own formula: the same value from the same draw


def _render(scene: Scene, rng: random.Random, s: int, like: Scene | None = None) -> Image.Image:
    """Draw `scene`. With `like` (the scene the stream was planned for), the stream advances as it would for
    `like`, and each object of `scene` takes the jitter of the same object in `like` (main object k, the
    distractor): an edited scene keeps its original's background, noise and object placement."""
    like = like or scene
    canvas = _background(rng, BACKGROUNDS[scene.background], s)
    draw = ImageDraw.Draw(canvas)
    cell = s / 3
    main = [_jitter(rng) for _ in like.cells]
    d_jitter = _jitter(rng) if like.distractor is not None else None
    extra = random.Random(f"extra/{like}")  # objects `like` lacks (a counterfactual's third copy); not `rng`
    objects = [
        (c, scene.shape, scene.colour, _RADIUS[scene.size], main[k] if k < len(main) else _jitter(extra))
        for k, c in enumerate(scene.cells)
    ]
    if scene.distractor is not None:
        d_colour, d_shape = scene.distractor.split()
        objects.append((scene.d_cell, d_shape, d_colour, _RADIUS["small"], d_jitter or _jitter(extra)))
    for (row, col), obj_shape, obj_colour, rel, (u_r, u_x, u_y, noise, u_angle) in objects:
        r = rel * s * _uniform(0.9, 1.1, u_r)
        slack = max(cell / 2 - r, 0.0) * 0.8
        cx = (col + 0.5) * cell + _uniform(-slack, slack, u_x)
        cy = (row + 0.5) * cell + _uniform(-slack, slack, u_y)
        fill = tuple(min(255, max(0, v + d)) for v, d in zip(COLOURS[obj_colour], noise))
        _draw(draw, obj_shape, fill, cx, cy, r, _uniform(-0.26, 0.26, u_angle))
    # Pixel noise over everything, objects included: no exact colour to match.
    return ImageChops.add(canvas, _noise(rng, s), offset=-12)


def _sample(
    scene: Scene, rng: random.Random, image_size: int, meta: dict[str, Any], like: Scene | None = None
) -> SyntheticSample:
    image = _render(scene, rng, image_size, like)
    caption = _caption(rng, scene.attributes, scene.distractor)
    d_position = next(name for name, c in POSITIONS.items() if c == scene.d_cell) if scene.d_cell else None
    return SyntheticSample(
        image, caption, scene.label, CLASSNAMES[scene.label], scene.attributes, scene.distractor, meta, d_position
    )


def generate(index: int, seed: int = 0, image_size: int = 64, split: str = "train") -> SyntheticSample:
    """Render sample `index` of the (split, seed) stream at `image_size` x `image_size` pixels.

    Args:
        index: sample number, >= 0; any index is valid (the stream is unbounded).
        seed: selects an independent stream; the default 0 is the reference dataset.
        image_size: side of the square image in pixels (32-64 suits the tiny models).
        split: "train", "val" or "test": disjoint streams for training and held-out evaluation.
    """
    rng = _rng(index, seed, split)
    return _sample(_plan(rng), rng, image_size, {"split": split, "seed": seed, "index": index})


def scene_of(index: int, seed: int = 0, split: str = "train") -> Scene:
    """The scene of sample `index` (what `generate` draws), without rendering it."""
    return _plan(_rng(index, seed, split))


def render_scene(
    scene: Scene, index: int, seed: int = 0, image_size: int = 64, split: str = "train"
) -> SyntheticSample:
    """Render `scene` with the random stream of sample `index`: an edited copy of that sample's scene keeps
    its background, noise and object jitter (up to the objects it adds or removes), so a counterfactual
    differs from the original only where the edit says (`mmcl.data.counterfactual`)."""
    rng = _rng(index, seed, split)
    original = _plan(rng)  # the same draws as the original, so rendering continues the same stream
    meta = {"split": split, "seed": seed, "index": index, "edited": True}
    return _sample(scene, rng, image_size, meta, like=original)


def iter_synthetic(
    n: int, split: str = "train", seed: int = 0, image_size: int = 64, start: int = 0
) -> Iterator[SyntheticSample]:
    """Samples `start .. start+n-1` of a stream, in order."""
    for i in range(start, start + n):
        yield generate(i, seed=seed, image_size=image_size, split=split)


_COLOUR_WORDS = {c: c for c in COLOURS}
_SHAPE_WORDS = {**{s: (s, False) for s in SHAPES}, **{p: (s, True) for s, p in PLURALS.items()}}
_SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
_COUNT_WORDS = {"one": 1, "single": 1, "two": 2, "pair": 2, "three": 3}
_VERTICAL = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
_HORIZONTAL = {"left": "left", "right": "right"}
_CENTER = {"center", "centre", "middle"}


def attributes_in_caption(caption: str) -> dict[str, Any]:
    """Read the main object's attributes back from a caption (generated ones included).

    The first colour / shape / size word is taken as the main object's (captions name it
    first). Count comes from a number word, else 1 for a singular noun, else None;
    position joins the vertical and horizontal words ("upper left" -> "top left").
    Attributes not mentioned are None.

    Returns:
        {"colour", "shape", "size", "position", "count", "background"} -> value or None.
    """
    words = re.findall(r"[a-z]+", caption.lower())

    def first(table: dict[str, Any]) -> Any:
        return next((table[w] for w in words if w in table), None)

    shape_plural = first(_SHAPE_WORDS)
    shape, plural = shape_plural if shape_plural else (None, None)
    count = first(_COUNT_WORDS)
    if count is None and plural is False:
        count = 1
    v, h = first(_VERTICAL), first(_HORIZONTAL)
    if v and h:
        position = f"{v} {h}"
    elif v or h:
        position = v or h
    else:
        position = "center" if any(w in _CENTER for w in words) else None
    background = None
    for i, w in enumerate(words[:-1]):
        if w in BACKGROUNDS and words[i + 1] in ("background", "backdrop"):
            background = w
            break
    return {
        "colour": first(_COLOUR_WORDS),
        "shape": shape,
        "size": first(_SIZE_WORDS),
        "position": position,
        "count": count,
        "background": background,
    }
