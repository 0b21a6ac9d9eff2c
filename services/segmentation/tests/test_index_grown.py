"""Creating a segment indexes that segment, not every live one: the field index was built again from every
live segment at each create going live (about 10 µs a segment: 30 ms of the 3,000th create). It grows by
the created segment (index.py, `grown`), and what it grows to is what building it whole gives, through
drawn creates, updates and deletions of every kind the index tells apart.

In process, against a real nats-server and the memory store (test_engine's engine)."""

from __future__ import annotations

import random

import pytest

import cdp_segmentation.catalogue as catalogue_module
import cdp_segmentation.index as index_module
from cdp_kit.errors import InvalidArgument
from cdp_segmentation.domain import parse
from cdp_segmentation.index import FieldIndex

from .test_engine import change, changed, create
from .test_many_segments import many  # noqa: F401  (fixture)


def view(index: FieldIndex) -> dict:
    """Everything an index answers with, segments named by id (comparable across two builds)."""

    def ids(affected) -> list:
        return [(segment.id, direct) for segment, direct in affected]

    return {
        "order": index.order,
        "position": index._position,
        "direct": {name: sorted(found) for name, found in index.direct.items() if found},
        "readers": {name: [s.id for s in found] for name, found in index.readers.items()},
        "thresholds": {name: (t, ids(found)) for name, (t, found) in index.thresholds.items()},
        "windows": {name: (o, ids(found)) for name, (o, found) in index.windows.items()},
        "equalities": {
            name: {word: ids(found) for word, found in words.items()} for name, words in index.equalities.items()
        },
        "window_tests": {name: [test.__name__ for test in tests] for name, tests in index._window_tests.items()},
        "indexed": {name: sorted(found) for name, found in index.indexed.items() if found},
        "percentiles": sorted(index.percentiles),
        "percentile_readers": {
            key: [(s.id, field, sub) for s, field, sub in found] for key, found in index.percentile_readers.items()
        },
        "percentile_everyone": {key: [s.id for s in found] for key, found in index.percentile_everyone.items()},
        "percentile_sources": sorted(index.percentile_sources),
        "time_segments": ids(index.time_segments),
        # (comparisons with the same offset in either order: the earliest of their flips is the same)
        "flips": sorted(
            (name, sub, offsets, sorted(zip(offsets, map(repr, tests), strict=True)))
            for name, sub, offsets, tests in index.flips.groups
        ),
        "flip_tests": index.flips.tests,
        "all": ids(index.all),
        "on_empty": sorted(index.on_empty),
        "from_empty": sorted(index._from_empty),
        "needs": {name: {word: sorted(found) for word, found in words.items()} for name, words in index._needs.items()},
        "needing": sorted(index._needing),
        "unconditional": {name: sorted(found) for name, found in index._unconditional.items() if found},
        "dependents": {name: sorted(found) for name, found in index._dependents.items()},
        "serving": sorted(index.serving),
    }


async def test_creating_a_segment_indexes_it_alone(many, monkeypatch):  # noqa: F811
    engine, *_ = many
    for i in range(60):
        await create(engine, f"s{i}", f"scores.s{i % 7} > {i}" if i % 2 else f'traits.country = "C{i}"')
    walked: list[str] = []
    for name in ("threshold", "equality", "window", "requirement"):
        original = getattr(index_module, name)

        def spy(plan, _original=original, _name=name):
            walked.append(_name)
            return _original(plan)

        monkeypatch.setattr(index_module, name, spy)
    await create(engine, "one_more", "scores.s3 > 0.25")
    # Each of the index's four questions asked of the created segment only (of all 61 before).
    assert sorted(walked) == ["equality", "requirement", "threshold", "window"]
    monkeypatch.undo()
    assert view(engine.index) == view(FieldIndex(engine._serving()))


DEFINITIONS = [
    "scores.a > {n}",
    "scores.a <= {n}",
    'traits.country = "C{m}"',
    'traits.plan in ["p{m}", "q{m}"] and traits.age > {n}',
    'traits.city = "X{m}" or traits.tier = "T{m}"',
    "traits.seen < now - {d}d",
    "traits.seen > now - {d}d and scores.a > 1",
    "not traits.email exists",
    "computed.orders < {n}",
    'in_segment("{ref}") and traits.plan = "p{m}"',
    'not in_segment("{ref}")',
    "scores.b >= percentile(scores.b, 90)",
    "scores.a * 2 > traits.age",
    'traits.tags contains "v{m}"',
    "traits.seen < now",
]


async def test_an_index_grown_by_each_create_is_the_index_built_whole(many):  # noqa: F811
    engine, *_ = many
    rng = random.Random(7)
    await engine.handle(
        [changed([change(f"p{i}", traits={"plan": f"p{i % 3}", "age": float(i)}) for i in range(9)], 1)]
    )
    created: list[str] = []
    for step in range(90):
        action = rng.random()
        if action < 0.75 or len(created) < 3:
            text = rng.choice(DEFINITIONS).format(
                n=rng.randint(0, 5), m=rng.randint(0, 4), d=rng.randint(1, 5), ref=rng.choice(created or ["x"])
            )
            if "in_segment" in text and not created:
                continue
            segment_id = f"g{step}"
            await create(engine, segment_id, text)
            created.append(segment_id)
        elif action < 0.9:
            segment_id = rng.choice(created)
            await engine.update(segment_id, parse(f"scores.a > {rng.randint(0, 5)}"))
            await engine.wait_live(segment_id)
        else:
            segment_id = rng.choice(created)
            if any(segment_id in s.compiled.segments for s in engine.segments.values()):
                continue  # referred to: refused
            await engine.delete(segment_id)
            created.remove(segment_id)
        assert view(engine.index) == view(FieldIndex(engine._serving())), step


async def test_creating_a_segment_checks_the_segments_it_reaches_not_every_segment(many, monkeypatch):  # noqa: F811
    # The graph check walked every segment's references at every create: no segment refers to a new one,
    # so a cycle through it or an unknown reference it brings is among the segments it reaches.
    engine, *_ = many
    for i in range(60):
        await create(engine, f"s{i}", f"scores.s{i} > 0.5" if i != 4 else 'in_segment("s3")')
    checked: list[list[str]] = []
    original = catalogue_module.check_segment_graph

    def spy(refs):
        checked.append(sorted(refs))
        return original(refs)

    monkeypatch.setattr(catalogue_module, "check_segment_graph", spy)
    await create(engine, "near", 'in_segment("s4") and scores.x > 1')
    assert checked == [["near", "s3", "s4"]]
    with pytest.raises(InvalidArgument, match="gone"):
        await engine.create("dangling", parse('in_segment("s1") or in_segment("gone")'))
    with pytest.raises(InvalidArgument, match="selfish → selfish"):
        await engine.create("selfish", parse('in_segment("selfish")'))
    checked.clear()
    with pytest.raises(InvalidArgument, match="near → s4 → s3 → near"):
        await engine.update("s3", parse('in_segment("near")'))  # an update: the whole graph, as before
    assert len(checked[0]) == 61
