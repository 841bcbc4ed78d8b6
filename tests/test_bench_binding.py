"""bench_binding's never-seen-pairs check (`bench/bench_binding.py`): the training source shows no held-out
colour-shape pair anywhere (main object, distractor, counterfactual), the evaluation source only those pairs."""

from __future__ import annotations

from bench.bench_binding import HELDOUT_CLASSES, FilteredSynthetic
from mmcl.data.synthetic import PLURALS, attributes_in_caption

SINGULAR = {p: s for s, p in PLURALS.items()}


def _classes_in(caption: str) -> set[str]:
    """Every 'colour shape' pair a generated caption can name: the main object's and the distractor's."""
    main = attributes_in_caption(caption)
    words = caption.replace(",", " ").split()
    pairs = {f"{main['colour']} {main['shape']}"}
    pairs |= {f"{a} {SINGULAR.get(b, b)}" for a, b in zip(words, words[1:])}
    return pairs


def test_unseen_training_source_never_shows_a_held_out_pair() -> None:
    held = set(HELDOUT_CLASSES)
    samples = [s.resolve() for s in FilteredSynthetic(150, "train", HELDOUT_CLASSES, False, counterfactuals=True)]
    assert len(samples) == 150 and len({s.source for s in samples}) == 150
    with_cf = [s for s in samples if s.counterfactual is not None]
    assert len(with_cf) > 140  # nearly every scene has an edit that applies
    for s in samples:
        assert s.meta["classname"] not in held and (s.meta["distractor"] or "") not in held, s.source
        assert not _classes_in(s.caption) & held, s.caption
    for s in with_cf:
        assert not _classes_in(s.counterfactual.caption) & held, (s.source, s.counterfactual.caption)


def test_the_check_finds_held_out_pairs_in_unfiltered_data() -> None:
    """The test above can fail: in the generator's own stream, captions of the first 150 scenes and of their
    counterfactuals do name held-out pairs."""
    from mmcl.data.sources import SyntheticSource

    samples = [s.resolve() for s in SyntheticSource(150, "train", 0, 32, counterfactuals=True)]
    assert any(_classes_in(s.caption) & set(HELDOUT_CLASSES) for s in samples)


def test_unseen_evaluation_source_holds_only_the_held_out_pairs() -> None:
    samples = [s.resolve() for s in FilteredSynthetic(40, "val", HELDOUT_CLASSES, True)]
    assert len(samples) == 40 and {s.meta["classname"] for s in samples} <= set(HELDOUT_CLASSES)
    assert len({s.meta["classname"] for s in samples}) == len(HELDOUT_CLASSES)  # all four are there
