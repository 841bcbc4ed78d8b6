"""Hard negative captions made from a labelled caption and its attributes: the built-in shapes' vocabulary.

For a caption of `mmcl.data.synthetic` (main object first, optional position phrase, optional distractor
named last as "and a green cross" / "next to a green cross") and the sample's attributes, each subset edits
exactly one thing, and only where the result is a *true* negative (false of the image, not just of the
caption):

    replace_colour    the main object's colour -> another colour          (never the distractor's class)
    replace_shape     the main object's shape -> another shape             (never the distractor's class)
    swap_att          the colours of the main object and the distractor are exchanged (their shapes differ)
    swap_obj          the two noun phrases change places around the position phrase, so the position now
                      describes the distractor (which is elsewhere)
    change_count      "two squares" -> "three squares"; counts read as exact, singular negatives say "one"
    change_position   the position phrase -> one sharing no direction with the truth ("top left" -> "bottom")

    negatives = shape_negatives(caption, info, random.Random(key))   # {subset: negative caption}

`info` is the sample's json as `mmcl.data.sources` writes it for the built-in shapes: `attributes`
(colour, shape, count, position, ...), `distractor` ("green cross" or None) and `distractor_position`
(absent in shards written before it existed: then `swap_obj` is made only where it is certain). Any other
labelled caption set plugs in the same way: a `Vocabulary` (does a json carry my attributes? caption, json,
rng -> {subset: negative}) registered in `VOCABULARIES`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mmcl.data.synthetic import COLOURS, PLURALS, POSITIONS, SHAPES, position_phrases

SUBSETS: tuple[str, ...] = (
    "replace_colour",
    "replace_shape",
    "swap_att",
    "swap_obj",
    "change_count",
    "change_position",
)

_SINGULAR = {p: s for s, p in PLURALS.items()}
_DET = r"a single|a pair of|an|a|one|two|three"
_MAIN = re.compile(
    rf"\b(?P<det>{_DET}) (?:(?P<size>[a-z]+) )?(?P<colour>{'|'.join(COLOURS)}) "
    rf"(?P<noun>{'|'.join(sorted([*SHAPES, *PLURALS.values()], key=len, reverse=True))})\b"
)
_ROWS, _COLS = ("top", "center", "bottom"), ("left", "right")


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _fix_articles(text: str) -> str:
    """'a orange' -> 'an orange' after an edit (the generator's own captions are already right)."""
    return re.sub(r"\b(a|an) ([a-z]+)", lambda m: f"{_a(m[2])} {m[2]}", text)


def _fix_frame(text: str) -> str:
    """'there is' / 'there are' agreeing with the noun phrase after it."""
    m = re.match(r"there (is|are) (?P<rest>.*)", text)
    if not m:
        return text
    first = _MAIN.match(m["rest"])
    plural = first is not None and first["noun"] in _SINGULAR
    return f"there {'are' if plural else 'is'} {m['rest']}"


def _directions(position: str) -> set[str]:
    """The direction words of a cell name: 'top left' -> {'top', 'left'}, 'center' -> {'center'}."""
    return set(position.split())


def _distractor_span(caption: str, distractor: str | None) -> tuple[int, str] | None:
    """(start of the connective, connective) when the caption names the distractor at its end."""
    if not distractor:
        return None
    for conn in ("and", "next to"):
        tail = f" {conn} {_a(distractor)} {distractor}"
        if caption.endswith(tail):
            return len(caption) - len(tail), conn
    return None


def _position_span(caption: str, position: str, count: int, start: int) -> tuple[int, int] | None:
    """Where the caption's phrase for `position` sits (searched after `start`), longest phrase first."""
    for phrase in sorted(position_phrases(position, count), key=len, reverse=True):
        i = caption.find(f" {phrase}", start)
        if i >= 0:
            return i + 1, i + 1 + len(phrase)
    return None


def _noun_phrase(det: str, size: str | None, colour: str, shape: str, count: int) -> str:
    noun = shape if count == 1 else PLURALS[shape]
    return " ".join(w for w in (det, size, colour, noun) if w)


def shape_negatives(caption: str, info: dict[str, Any], rng: random.Random) -> dict[str, str]:
    """One hard negative per subset this caption supports (see the module docstring).

    Args:
        caption: a caption of the built-in generator.
        info: the sample's json: `attributes`, `distractor`, optionally `distractor_position`.
        rng: picks the replacement values and phrasings (seed it per sample for a reproducible set).

    Returns:
        subset -> negative caption; a subset is missing where no true negative can be made (e.g. `swap_att`
        when the caption does not name a distractor).
    """
    attrs = info["attributes"]
    colour, shape, count, position = attrs["colour"], attrs["shape"], int(attrs["count"]), attrs["position"]
    m = _MAIN.search(caption)
    if m is None or m["colour"] != colour:
        return {}
    size = m["size"]
    distractor = info.get("distractor")
    d_colour, d_shape = distractor.split() if distractor else (None, None)
    head, tail = caption[: m.start()], caption[m.end() :]
    out: dict[str, str] = {}

    def with_main(np_: str, rest: str = tail) -> str:
        return _fix_frame(_fix_articles(head + np_ + rest))

    colours = [c for c in COLOURS if c != colour and (c, shape) != (d_colour, d_shape)]
    out["replace_colour"] = with_main(f"{m['det']} {size + ' ' if size else ''}{rng.choice(colours)} {m['noun']}")
    shapes = [s for s in SHAPES if s != shape and (colour, s) != (d_colour, d_shape)]
    out["replace_shape"] = with_main(_noun_phrase(m["det"], size, colour, rng.choice(shapes), count))

    new_count = rng.choice([c for c in (1, 2, 3) if c != count])
    det = {1: rng.choice(["one", "a single"]), 2: "two", 3: "three"}[new_count]
    out["change_count"] = with_main(_noun_phrase(det, size, colour, shape, new_count))

    span = _position_span(caption, position, count, m.end())
    if span is not None:
        if count > 1:  # a group lies on a line: another line parallel to it is certainly elsewhere
            lines = _ROWS if position in _ROWS else _COLS
            choices = [p for p in lines if p != position]
        else:
            choices = [p for p in POSITIONS if not _directions(p) & _directions(position)]
        phrase = rng.choice(position_phrases(rng.choice(choices), count))
        out["change_position"] = caption[: span[0]] + phrase + caption[span[1] :]

    found = _distractor_span(caption, distractor)
    if found is not None:
        cut, conn = found
        if d_colour != colour and d_shape != shape:  # with a shared shape the swap describes the same scene
            main = _noun_phrase(m["det"], size, d_colour, shape, count)
            middle = caption[m.end() : cut]
            out["swap_att"] = with_main(main, f"{middle} {conn} {_a(colour)} {colour} {d_shape}")
        d_position = info.get("distractor_position")
        # A group's line never holds the distractor (the generator keeps the line free); a single object's
        # position must share no direction with the distractor's cell.
        certain = count > 1 or (d_position is not None and not _directions(d_position) & _directions(position))
        if span is not None and certain:
            middle = caption[m.end() : cut]
            out["swap_obj"] = _fix_frame(_fix_articles(f"{head}{_a(distractor)} {distractor}{middle} {conn} {m[0]}"))
    return {k: out[k] for k in SUBSETS if k in out and out[k] != caption}


def _is_shapes(info: dict[str, Any]) -> bool:
    attrs = info.get("attributes")
    return (
        isinstance(attrs, dict)
        and attrs.get("colour") in COLOURS
        and attrs.get("shape") in SHAPES
        and attrs.get("count") in (1, 2, 3)
        and isinstance(attrs.get("position"), str)
    )


@dataclass(frozen=True)
class Vocabulary:
    """A labelled caption set whose attributes are known.

    Attributes:
        accepts: whether a sample's json carries this vocabulary's attributes.
        negatives: (caption, json, rng) -> {subset: negative caption}.
        subsets: every subset `negatives` can make.
    """

    accepts: Callable[[dict[str, Any]], bool]
    negatives: Callable[[str, dict[str, Any], random.Random], dict[str, str]]
    subsets: tuple[str, ...]


VOCABULARIES: dict[str, Vocabulary] = {"shapes": Vocabulary(_is_shapes, shape_negatives, SUBSETS)}


def vocabulary_for(info: dict[str, Any]) -> str | None:
    """The name of the first vocabulary whose attributes this sample's json carries, or None."""
    return next((name for name, v in VOCABULARIES.items() if v.accepts(info)), None)
