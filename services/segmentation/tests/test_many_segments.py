"""A customer with many segments: the work of one profile change, and of defining one more segment, follows
what the change can move, not how many segments there are (the graph check on a create:
domain/test_graph_scale.py).

In process, against a real nats-server and the memory store (test_engine's engine): the segments a change
evaluates are counted with a spy on each live segment's predicate.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest
from google.protobuf import json_format

import cdp_lang.compiler
import cdp_segmentation.index as index_module
from cdp_kit.bus import Bus, profiles_stream, segments_stream
from cdp_kit.storage import open_store
from cdp_segmentation.domain import compile_segment, parse
from cdp_testing.fakes import T0, Clock

from .test_engine import Profile, change, changed, create, make_engine, moves, published

DAY = 86_400.0


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


async def test_a_change_of_a_field_many_time_segments_read_schedules_from_the_windows_that_can_flip_first(
    many, monkeypatch
):
    # A person's timer is the earliest flip of any of their time comparisons. It was found by asking every
    # time-based segment for its next change after every evaluation of one: with 200 segments on
    # traits.last_seen_at (one window each), three quarters of what a change of it cost.
    engine, *_ = many
    for days in range(1, 61):
        await create(engine, f"away_{days}d", f"traits.seen_at < now - {days}d")
    await create(engine, "back", "traits.seen_at > now - 12h")
    await engine.handle([changed([change("p1", traits={"seen_at": T0 - 10 * DAY})], 1)])
    flips = []
    for module in (cdp_lang.compiler, index_module):
        original = getattr(module, "flip_time", None)
        if original is not None:

            def counting(test, record, now, _original=original):
                flips.append(test.offset)
                return _original(test, record, now)

            monkeypatch.setattr(module, "flip_time", counting)
    await engine.handle([changed([change("p1", traits={"seen_at": T0 - 20.5 * DAY}, at=T0 + 1.0)], 2)])
    assert len(flips) <= 3, len(flips)
    assert engine._due["p1"] == pytest.approx(T0 + 0.5 * DAY, abs=1e-3)  # away_21d is the next to flip
    assert set(engine.membership("p1")) == {f"away_{days}d" for days in range(1, 21)}


class Held:
    """A live segment as TimeFlips reads it."""

    def __init__(self, text: str) -> None:
        self.compiled = compile_segment(parse(text))


def test_the_next_flip_is_every_time_segments_next_change_at_its_earliest():
    rng = random.Random(11)
    now = 1_790_000_000.0
    ops = ["<", "<=", ">", ">="]
    texts = []
    for _ in range(80):
        field = rng.choice(["traits.a", "traits.b", "traits.c.d"])
        amount = rng.choice([1, 2, 7, 30, 90, 365])
        unit = rng.choice(["s", "m", "h", "d"])
        sign = rng.choice(["-", "+"])
        test = f"{field} {rng.choice(ops)} now {sign} {amount}{unit}"
        shape = rng.randrange(4)
        if shape == 1:
            test = f'{test} and traits.plan = "pro"'
        elif shape == 2:
            test = f"not ({test}) or traits.x > {rng.randrange(5)}"
        elif shape == 3:
            test = f"{test} and traits.a > now - 3d"
        texts.append(test)
    for trial in range(400):
        chosen = [Held(text) for text in rng.sample(texts, rng.randrange(1, 40))]
        flips = index_module.TimeFlips(chosen)

        def a_time():
            base = now + rng.choice([-1, 1]) * rng.choice([0, 1, 60, 3600, 86_400, 7 * 86_400, 400 * 86_400])
            base += rng.choice([0.0, 0.5, 1e-6])
            form = rng.randrange(4)
            if form == 0:
                return base * 1000.0  # milliseconds
            if form == 1:
                return datetime.fromtimestamp(round(base), UTC).isoformat()
            if form == 2:
                return "not a time"
            return base

        fields = {"traits.a": a_time(), "traits.b": a_time(), "traits.c": {"d": a_time()}, "traits.plan": "pro"}
        if rng.random() < 0.2:
            del fields["traits.a"]
        at = now + rng.choice([0.0, 0.25, 86_400.0])
        expected = min(
            (t for held in chosen if (t := held.compiled.next_change(fields, (), at)) is not None), default=None
        )
        assert flips.next_flip(fields, at) == expected, (trial, fields, at)


async def test_a_person_first_seen_is_evaluated_against_the_segments_their_fields_or_an_empty_profile_can_move(
    many,
):
    # Every live segment was evaluated for a person first seen (an anonymous visitor's first change): all
    # 3,000 of a customer's segments for a profile of two fields.
    engine, *_ = many
    for i in range(40):
        await create(engine, f"s{i}", f"scores.s{i} > 0.5")
    await create(engine, "no_email", "not traits.email exists")
    await create(engine, "not_s1", 'not in_segment("s1")')
    await create(engine, "pro_no_email", 'in_segment("no_email") and traits.plan = "pro"')
    await create(engine, "s3_ref", 'in_segment("s3") or scores.s4 > 2')
    evaluated = spy_on(engine)
    await engine.handle([changed([change("p1", scores={"s3": 0.9}, traits={"plan": "pro"})], 1)])
    assert sorted(evaluated) == ["no_email", "not_s1", "pro_no_email", "s3", "s3_ref"]
    assert set(engine.membership("p1")) == {"s3", "s3_ref", "no_email", "not_s1", "pro_no_email"}
    evaluated.clear()
    await engine.handle([changed([change("p2", scores={"s1": 0.9}, traits={"email": "x"})], 2)])
    assert sorted(evaluated) == ["no_email", "not_s1", "pro_no_email", "s1"]
    assert set(engine.membership("p2")) == {"s1"}


async def test_memberships_of_persons_first_seen_are_what_evaluating_every_segment_finds(many):
    engine, *_ = many
    definitions = [
        "traits.a > 1",
        "not traits.a > 1",
        "traits.a exists",
        "not traits.b exists",
        'traits.b = "x" or traits.c < now - 1d',
        "not (traits.c > now - 2d)",
        'in_segment("d1") and not in_segment("d0")',
        'not in_segment("d2") and traits.d.e = 3',
        "traits.a > traits.d.e",
        "not traits.a != 2",
        'in_segment("d5") or in_segment("d7")',
    ]
    for i, text in enumerate(definitions):
        await create(engine, f"d{i}", text)
    rng = random.Random(5)
    values = {
        "a": [0.0, 2.0, 5.0, "x", True],
        "b": ["x", "y", 1.0],
        "c": [T0 - 3 * DAY, T0 - 0.5 * DAY, "nope"],
        "d": [{"e": 3.0}, {"e": 1.0}, {}, "flat"],
    }
    for n in range(200):
        traits = {name: rng.choice(options) for name, options in values.items() if rng.random() < 0.5}
        person = f"p{n}"
        first = change(person)
        for name, value in traits.items():  # (nested values and booleans too)
            json_format.ParseDict(value, first.traits[name])
        await engine.handle([changed([first], n + 1)])
        held = engine.persons[person]
        expected: set[str] = set()
        for segment_id in engine.index.order:
            if engine.segments[segment_id].compiled.predicate(held.fields, expected, engine.clock()):
                expected.add(segment_id)
        assert set(held.members) == expected, (traits, held.members)


async def test_a_person_first_seen_is_evaluated_against_a_segment_on_a_percentile_alone(many):
    # `percentile(scores.a, 50) > 5` reads no field of the person: it holds for an empty profile once the
    # population's median passes 5, after the index was built.
    engine, _store = many
    await engine.handle([changed([change(f"p{i}", scores={"a": 1.0}) for i in range(5)], 1)])
    await create(engine, "median_high", "percentile(scores.a, 50) > 5")
    assert engine.membership("p0") == {}
    await engine.handle([changed([change(f"p{i}", scores={"a": 10.0}, at=T0 + 1) for i in range(5)], 2)])
    engine.clock.now = T0 + engine.percentile_interval  # the next round's boundary
    await engine.recompute_percentiles()
    assert set(engine.membership("p0")) == {"median_high"}
    await engine.handle([changed([change("newcomer", traits={"plan": "pro"}, at=T0 + 10)], 3)])
    assert set(engine.membership("newcomer")) == {"median_high"}


async def test_a_change_of_a_field_compared_with_now_evaluates_the_windows_it_crossed(many, nats_server):
    # One segment per inactivity window (`traits.seen_at < now - 12d`): a change of seen_at, made by every
    # event of every person, evaluated all of them; only a window the field moved across can flip (the rest
    # had, at this instant, the outcome they have for the new value: their earlier flips fired as timers).
    engine, *_ = many
    for days in range(1, 31):
        await create(engine, f"away_{days}d", f"traits.seen_at < now - {days}d")
    await create(engine, "lapsed_pro", 'in_segment("away_20d") and traits.plan = "pro"')
    await engine.handle([changed([change("p1", traits={"seen_at": T0 - 25.5 * DAY, "plan": "pro"})], 1)])
    assert set(engine.membership("p1")) == {f"away_{d}d" for d in range(1, 26)} | {"lapsed_pro"}
    evaluated = spy_on(engine)
    # The windows crossed are decided from the new time, not evaluated (their whole definition is that
    # comparison); the one referring to a window that flipped is evaluated.
    decided = engine.decided
    await engine.handle([changed([change("p1", traits={"seen_at": T0 - 21.5 * DAY}, at=T0 + 1)], 2)])
    assert evaluated == [] and engine.decided - decided == 4  # away_22d..away_25d
    assert set(engine.membership("p1")) == {f"away_{d}d" for d in range(1, 22)} | {"lapsed_pro"}
    decided = engine.decided
    await engine.handle([changed([change("p1", traits={"seen_at": T0 - 0.5 * DAY}, at=T0 + 2)], 3)])
    assert evaluated == ["lapsed_pro"] and engine.decided - decided == 21  # 1d..21d crossed; 20d flipped
    assert engine.membership("p1") == {}
    # The person's timer follows the field, crossed or not: away_1d is entered half a day later, on time.
    assert engine._due["p1"] == pytest.approx(T0 + 0.5 * DAY, abs=1e-3)
    evaluated.clear()
    await engine.handle([changed([change("p1", traits={"seen_at": T0 - 0.25 * DAY}, at=T0 + 3)], 4)])
    assert evaluated == [] and engine._due["p1"] == pytest.approx(T0 + 0.75 * DAY, abs=1e-3)
    assert moves(await published(nats_server.url))[-1] == ("p1", "lapsed_pro", "exit", "event")


async def test_memberships_of_windows_kept_through_changes_and_time_are_what_evaluating_every_segment_finds(many):
    engine, *_ = many
    clock = engine.clock
    texts = [f"traits.t {op} now {sign} {n}{unit}" for op, sign, n, unit in (
        ("<", "-", 1, "d"), ("<=", "-", 2, "d"), (">", "-", 3, "d"), (">=", "-", 36, "h"), ("<", "+", 1, "d"),
        (">", "+", 12, "h"), ("<", "-", 90, "m"), (">", "-", 7, "d"),
    )]  # fmt: skip
    texts += ['in_segment("w0") and not in_segment("w2")', "traits.t < now - 2d and traits.u > 1"]
    for i, text in enumerate(texts):
        await create(engine, f"w{i}", text)
    rng = random.Random(3)
    for step in range(400):
        clock.now += rng.choice([0.0, 60.0, 3_600.0, 0.4 * DAY, 2 * DAY])
        person = f"p{rng.randrange(4)}"
        value = rng.choice(
            [clock.now - rng.uniform(-2, 10) * DAY, (clock.now - rng.uniform(0, 4) * DAY) * 1000.0, "soon", None]
        )
        await engine.handle([changed([change(person, traits={"t": value, "u": 2.0}, at=clock.now)], step + 1)])
        for person_id, held in engine.persons.items():
            expected: set[str] = set()
            for segment_id in engine.index.order:
                if engine.segments[segment_id].compiled.predicate(held.fields, expected, clock.now):
                    expected.add(segment_id)
            # A person whose timer is due now is brought to it by the next batch (theirs, or the timer loop's).
            if engine._due.get(person_id, float("inf")) > clock.now:
                assert set(held.members) == expected, (step, person_id, held.fields, clock.now)


async def test_a_field_compared_with_now_appearing_or_vanishing_decides_every_window_without_evaluating_it(
    many, nats_server
):
    # A person's first last_seen_at (every event's field) evaluated every window of it: 600 of 3,000 segments.
    # Each window's whole definition is the comparison: its outcome is the new time against now + offset.
    engine, *_ = many
    for days in range(1, 31):
        await create(engine, f"away_{days}d", f"traits.seen_at < now - {days}d")
    await create(engine, "lapsed_pro", 'in_segment("away_20d") and traits.plan = "pro"')
    await engine.handle([changed([change("p1", traits={"plan": "pro"})], 1)])
    evaluated = spy_on(engine)
    decided = engine.decided
    await engine.handle([changed([change("p1", traits={"seen_at": T0 - 25.5 * DAY}, at=T0 + 1)], 2)])
    assert evaluated == ["lapsed_pro"] and engine.decided - decided == 30  # lapsed_pro: away_20d flipped
    assert set(engine.membership("p1")) == {f"away_{d}d" for d in range(1, 26)} | {"lapsed_pro"}
    evaluated.clear()
    decided = engine.decided
    await engine.handle([changed([change("p1", traits={"seen_at": None}, at=T0 + 2)], 3)])
    assert evaluated == ["lapsed_pro"] and engine.decided - decided == 30
    assert engine.membership("p1") == {}
    exits = [m for m in moves(await published(nats_server.url)) if m[2] == "exit"]
    assert len(exits) == 26 and exits[-1] == ("p1", "lapsed_pro", "exit", "event")
