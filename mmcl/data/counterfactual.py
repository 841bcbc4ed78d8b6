"""Counterfactual scenes of the built-in generator: the same picture with one thing changed, and its caption.

Text-only hard negatives (NegCLIP) teach a model that "a red circle left of a cross" is not "a cross left of a
red circle" from the caption side only. A counterfactual *image* (TripletCLIP, CounterCurate, Winoground's
pairs) gives the other direction: the scene re-rendered with the one change the negative caption describes.
Each edit changes exactly one thing and only where the result is certainly a different scene:

    replace_colour    the main object(s) take another colour            (never the distractor's class)
    replace_shape     the main object(s) take another shape             (never the distractor's class)
    swap_att          the main object(s) and the distractor exchange colours (their shapes differ)
    swap_obj          a single main object and the distractor exchange places
    change_count      a group of two gains a third object on its line, a group of three loses one
    change_position   the main object(s) move to a cell / line sharing no direction with the original

The edited scene is rendered with the original sample's random stream (`render_scene`), so background,
noise and object jitter stay the same, and captioned by the generator's own captioner, so the two captions
differ only where the scenes do (a pair whose captions come out equal, because the caption left the edited
attribute unsaid, is no counterfactual: `counterfactual` returns None for it).

    cf = counterfactual(7, "swap_att", split="test")   # SyntheticSample of the edited scene, or None
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

from mmcl.data.synthetic import (
    CLASSNAMES,
    COLOURS,
    LINES,
    POSITIONS,
    SHAPES,
    Scene,
    SyntheticSample,
    generate,
    render_scene,
    scene_of,
)

Edit = Callable[[Scene, random.Random], "Scene | None"]
EDITS: dict[str, Edit] = {}


def _edit(name: str) -> Callable[[Edit], Edit]:
    def register(fn: Edit) -> Edit:
        EDITS[name] = fn
        return fn

    return register


def _directions(position: str) -> set[str]:
    return set(position.split())


def _distractor_class(scene: Scene) -> tuple[str | None, str | None]:
    return tuple(scene.distractor.split()) if scene.distractor else (None, None)  # type: ignore[return-value]


@_edit("replace_colour")
def _replace_colour(scene: Scene, rng: random.Random) -> Scene:
    d = _distractor_class(scene)
    colours = [c for c in COLOURS if c != scene.colour and (c, scene.shape) != d]
    return dataclasses.replace(scene, colour=rng.choice(colours))


@_edit("replace_shape")
def _replace_shape(scene: Scene, rng: random.Random) -> Scene:
    d = _distractor_class(scene)
    shapes = [s for s in SHAPES if s != scene.shape and (scene.colour, s) != d]
    return dataclasses.replace(scene, shape=rng.choice(shapes))


@_edit("swap_att")
def _swap_att(scene: Scene, rng: random.Random) -> Scene | None:
    d_colour, d_shape = _distractor_class(scene)
    if d_colour is None or d_colour == scene.colour or d_shape == scene.shape:
        return None  # with a shared colour or shape the swap shows the same scene
    return dataclasses.replace(scene, colour=d_colour, distractor=f"{scene.colour} {d_shape}")


@_edit("swap_obj")
def _swap_obj(scene: Scene, rng: random.Random) -> Scene | None:
    if scene.distractor is None or scene.count != 1:
        return None
    new_position = next(name for name, cell in POSITIONS.items() if cell == scene.d_cell)
    return dataclasses.replace(scene, cells=[scene.d_cell], position=new_position, d_cell=scene.cells[0])


@_edit("change_count")
def _change_count(scene: Scene, rng: random.Random) -> Scene | None:
    if scene.count == 1:
        return None  # a group lies on a line, a single object in a cell: not one change
    line = LINES[scene.position]
    cells = line if scene.count == 2 else scene.cells[:2]  # the generator keeps the line free of the distractor
    return dataclasses.replace(scene, count=len(cells), cells=list(cells))


@_edit("change_position")
def _change_position(scene: Scene, rng: random.Random) -> Scene | None:
    if scene.count == 1:
        choices = [
            p
            for p, cell in POSITIONS.items()
            if not _directions(p) & _directions(scene.position) and cell != scene.d_cell
        ]
        if not choices:
            return None
        p = rng.choice(choices)
        return dataclasses.replace(scene, position=p, cells=[POSITIONS[p]])
    parallel = ("top", "center", "bottom") if scene.position in ("top", "center", "bottom") else ("left", "right")
    old = LINES[scene.position]
    choices = [p for p in parallel if p != scene.position and scene.d_cell not in LINES[p]]
    if not choices:
        return None
    p = rng.choice(choices)
    return dataclasses.replace(scene, position=p, cells=[LINES[p][old.index(c)] for c in scene.cells])


def counterfactual(
    index: int, subset: str, seed: int = 0, image_size: int = 64, split: str = "train"
) -> SyntheticSample | None:
    """Sample `index` re-rendered with the `subset` edit (see the module docstring), with its own caption.

    Returns None where the edit does not apply to this scene or its caption would not tell the two apart.
    """
    if subset not in EDITS:
        raise ValueError(f"unknown counterfactual edit {subset!r} (choose from {', '.join(EDITS)})")
    scene = scene_of(index, seed, split)
    edited = EDITS[subset](scene, random.Random(f"mmcl-counterfactual/{split}/{seed}/{index}/{subset}"))
    if edited is None or edited == scene:
        return None
    assert f"{edited.colour} {edited.shape}" in CLASSNAMES
    sample = render_scene(edited, index, seed, image_size, split)
    original = generate(index, seed, image_size, split)
    return None if sample.caption == original.caption else sample
