"""A person first seen is evaluated against the segments that can hold for them, not every segment reading
one of their fields: a segment that needs one of a few words in a field (`traits.plan in ["p2", "q2"] and
traits.age > 40`, `traits.city = "X3" or traits.tier = "T8"`) is a candidate only for a person holding one
of them (index.py, `requirement`). Counted with a spy on each live segment's predicate; memberships compared
with a full evaluation over drawn definitions and persons."""

from __future__ import annotations

import random

import pytest
from google.protobuf import json_format

from cdp_segmentation.domain import compile_segment, parse

from .test_engine import change, changed, create
from .test_many_segments import many, spy_on  # noqa: F401  (fixture)


async def test_a_person_first_seen_is_evaluated_against_the_segments_needing_the_words_they_hold(many):  # noqa: F811
    # One segment per plan and age, one per city or tier (a customer's hundreds of them): a visitor with a
    # plan and an age was evaluated against every plan segment, 200 here, of which one could hold.
    engine, *_ = many
    for i in range(200):
        await create(engine, f"plan{i}", f'traits.plan in ["p{i}", "q{i}"] and traits.age > {i % 90}')
        await create(engine, f"place{i}", f'traits.city = "X{i}" or traits.tier = "T{i}"')
    await create(engine, "adult", "traits.age >= 18")  # needs no word: evaluated for anyone with an age
    await create(engine, "pro_adult", 'in_segment("adult") and traits.plan = "pro"')
    evaluated = spy_on(engine)
    await engine.handle([changed([change("v1", traits={"plan": "p2", "age": 30.0})], 1)])
    assert sorted(evaluated) == ["adult", "plan2", "pro_adult"]  # pro_adult: it refers to adult
    assert set(engine.membership("v1")) == {"plan2", "adult"}
    evaluated.clear()
    await engine.handle([changed([change("v2", traits={"city": "X7", "tier": "T9", "plan": "x"})], 2)])
    assert sorted(evaluated) == ["place7", "place9"]
    assert set(engine.membership("v2")) == {"place7", "place9"}
    evaluated.clear()
    third = change("v3", traits={"plan": 2.0, "age": 10.0})
    json_format.ParseDict(["X1"], third.traits["city"])
    await engine.handle([changed([third], 3)])
    assert sorted(evaluated) == ["adult", "pro_adult"]  # a number or a list is no word: none of them holds
    assert engine.membership("v3") == {}


@pytest.mark.parametrize(
    ("text", "needs"),
    [
        ('traits.a = "x"', {("traits.a", ("x",))}),
        ('traits.a in ["x", "y"] and traits.b > 1', {("traits.a", ("x", "y"))}),
        ('traits.a in ["x", "y"] and traits.b = "z"', {("traits.b", ("z",))}),  # the narrower one
        ('traits.a = "x" or traits.b in ["y"]', {("traits.a", ("x",)), ("traits.b", ("y",))}),
        ('(traits.a = "x" or traits.b = "y") and traits.c < now - 1d', {("traits.a", ("x",)), ("traits.b", ("y",))}),
        ('traits.a = "x" or traits.b > 1', None),  # the other side holds without a word
        ('not traits.a = "x"', None),
        ('traits.a in ["x", 1]', None),  # a number holds it too
        ('traits.a.b = "x"', None),  # a sub-path: not a top-level field's value
        ('traits.a != "x"', None),
        ('traits.a = "x" and in_segment("s")', {("traits.a", ("x",))}),
    ],
)
def test_what_a_definition_needs_is_found_only_where_nothing_else_holds_it(text, needs):
    from cdp_segmentation.index import requirement

    found = requirement(compile_segment(parse(text)).plan)
    assert (None if found is None else {(name, tuple(sorted(words))) for name, words in found}) == needs


async def test_memberships_of_persons_first_seen_with_needed_words_are_what_evaluating_every_segment_finds(many):  # noqa: F811
    engine, *_ = many
    definitions = [
        'traits.a = "x" and traits.n > 1',
        'traits.a in ["x", "y"] and not traits.b exists',
        'traits.a = "y" or traits.b = "z"',
        '(traits.a = "x" or traits.b in ["z", "w"]) and traits.c < now - 1d',
        'traits.b = "w" and in_segment("d2")',
        "not traits.n > 1",
        'in_segment("d0") or (traits.b = "z" and traits.n < 3)',
        'not in_segment("d2") and traits.a = "x"',
        'traits.a = "x" and traits.c > now - 2d',
    ]
    for i, text in enumerate(definitions):
        await create(engine, f"d{i}", text)
    rng = random.Random(11)
    values = {
        "a": ["x", "y", "q", 1.0, ["x"]],
        "b": ["z", "w", "v", True],
        "c": [engine.clock() - 3 * 86_400.0, engine.clock() - 0.5 * 86_400.0],
        "n": [0.0, 2.0, 5.0, "x"],
    }
    for n in range(300):
        traits = {name: rng.choice(options) for name, options in values.items() if rng.random() < 0.6}
        person = f"p{n}"
        first = change(person)
        for name, value in traits.items():
            json_format.ParseDict(value, first.traits[name])
        await engine.handle([changed([first], n + 1)])
        held = engine.persons[person]
        expected: set[str] = set()
        for segment_id in engine.index.order:
            if engine.segments[segment_id].compiled.predicate(held.fields, expected, engine.clock()):
                expected.add(segment_id)
        assert set(held.members) == expected, (traits, held.members)
