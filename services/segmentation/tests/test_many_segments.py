"""A customer with many segments: the work of one profile change, and of defining one more segment, follows
what the change can move, not how many segments there are (the graph check on a create:
domain/test_graph_scale.py).

In process, against a real nats-server and the memory store (test_engine's engine): the segments a change
evaluates are counted with a spy on each live segment's predicate.
"""

from __future__ import annotations

import random

import pytest

from cdp_kit.bus import Bus, profiles_stream, segments_stream
from cdp_kit.storage import open_store
from cdp_testing.fakes import T0, Clock

from .test_engine import Profile, change, changed, create, make_engine, moves, published


@pytest.fixture
async def many(nats_server):
    """test_engine's engine: one partition, the memory store, a fake profile service, a fixed clock."""
    async with open_store("memory://") as store, Bus.connect(nats_server.url, name="segmentation-test") as bus:
        await bus.ensure_streams(profiles_stream(), segments_stream())
        engine = await make_engine(store, bus, Clock(T0), Profile())
        try:
            yield engine, store
        finally:
            await engine.stop()


def spy_on(engine) -> list[str]:
    """The ids of the segments evaluated from now on, in order."""
    evaluated: list[str] = []
    for segment in engine.segments.values():
        original = segment.predicate

        def spy(record, members, now, _original=original, _id=segment.id):
            evaluated.append(_id)
            return _original(record, members, now)

        segment.predicate = spy
    return evaluated


async def test_a_change_of_a_field_many_segments_compare_with_words_evaluates_those_holding_its_values(
    many, nats_server
):
    # One segment per country, a few per group of countries, and one referring to a country's: a change of
    # the country evaluated every one of them (20 here, hundreds at a customer), whatever it moved.
    engine, *_ = many
    for i in range(20):
        await create(engine, f"c{i}", f'traits.country = "C{i}"')
    await create(engine, "c1_or_c2", 'traits.country in ["C1", "C2"]')
    await create(engine, "c3_or_c4", 'traits.country in ["C3", "C4"]')
    await create(engine, "c2_pro", 'in_segment("c2") and traits.plan = "pro"')
    await engine.handle([changed([change("p1", traits={"country": "C1", "plan": "pro"})], 1)])
    assert set(engine.membership("p1")) == {"c1", "c1_or_c2"}

    evaluated = spy_on(engine)
    await engine.handle([changed([change("p1", traits={"country": "C2"}, at=T0 + 1.0)], 2)])
    assert sorted(evaluated) == ["c1", "c1_or_c2", "c2", "c2_pro"]  # c1_or_c2 holds both words: once
    assert set(engine.membership("p1")) == {"c2", "c1_or_c2", "c2_pro"}

    evaluated.clear()
    await engine.handle([changed([change("p1", traits={"country": "C9"}, at=T0 + 2.0)], 3)])
    assert sorted(evaluated) == ["c1_or_c2", "c2", "c2_pro", "c9"]
    assert set(engine.membership("p1")) == {"c9"}

    # A value that is no text is outside all of them: only the word the field left is evaluated.
    evaluated.clear()
    await engine.handle([changed([change("p1", traits={"country": 7.0}, at=T0 + 3.0)], 4)])
    assert evaluated == ["c9"]
    assert engine.membership("p1") == {}
    evaluated.clear()
    await engine.handle([changed([change("p1", traits={"country": "C3"}, at=T0 + 4.0)], 5)])
    assert sorted(evaluated) == ["c3", "c3_or_c4"]
    assert set(engine.membership("p1")) == {"c3", "c3_or_c4"}
    # ... and the field gone (null) leaves them as a value that is no text does.
    evaluated.clear()
    await engine.handle([changed([change("p1", traits={"country": None}, at=T0 + 5.0)], 6)])
    assert sorted(evaluated) == ["c3", "c3_or_c4"]
    assert engine.membership("p1") == {}
    published_moves = [m for m in moves(await published(nats_server.url)) if m[0] == "p1"]
    assert published_moves[-2:] == [("p1", "c3", "exit", "event"), ("p1", "c3_or_c4", "exit", "event")]


async def test_memberships_through_the_word_index_are_what_evaluating_every_segment_finds(many):
    engine, *_ = many
    words = ["a", "b", "c", "d", "e"]
    for i, word in enumerate(words):
        await create(engine, f"is_{word}", f'traits.w = "{word}"')
        await create(engine, f"in_{i}", f'traits.w in ["{word}", "{words[(i + 1) % 5]}"]')
    await create(engine, "is_b_ref", 'in_segment("is_b") or traits.w = 1')
    values = [*words, "z", 1.0, True, None]
    rng = random.Random(7)
    for seq in range(1, 300):
        person = f"p{rng.randrange(6)}"
        await engine.handle([changed([change(person, traits={"w": rng.choice(values)}, at=T0 + seq)], seq)])
        for person_id, held in engine.persons.items():
            expected = set()
            for segment_id in engine.index.order:  # dependencies first, as an evaluation goes
                segment = engine.segments[segment_id]
                if segment.compiled.predicate(held.fields, expected, engine.clock()):
                    expected.add(segment_id)
            assert set(held.members) == expected, (seq, person_id, held.fields)
