"""Properties over random segments and people: the two evaluators agree row for row, `next_change` never misses
a flip, and both written forms round-trip. The random segments include arithmetic on the sides of comparisons
(with numbers that overflow, divide by zero and meet values that are no number), also inside event
predicates, and `in` / `contains` / `starts_with` against another field."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import numpy as np
from hypothesis import HealthCheck, given, settings

from cdp_lang.percentiles import population_percentiles
from cdp_segmentation.domain import (
    Aggregate,
    And,
    Columns,
    Condition,
    Date,
    EventCondition,
    EventPredicate,
    InSegment,
    Not,
    Now,
    Or,
    Performed,
    compile_segment,
    from_json,
    parse,
    to_json,
    to_text,
)
from cdp_segmentation.domain.nodes import (
    ARITHMETIC,
    COMPARISONS,
    CONDITION_OPS,
    EVENT_TYPES,
    ORDERINGS,
    Arithmetic,
    Comparison,
    FieldRef,
    Percentile,
    comparison,
    leaves,
)

DAY = 86_400.0
JAN_1 = 1_767_225_600.0  # 2026-01-01T00:00:00Z, the middle of the times below

ISO_TEXTS = [
    "2026-01-01",
    "2026-01-01T00:00:00Z",
    "2025-12-01T12:30:00+02:00",
    "2026-02-10T00:00:00",
    "2026-01-15T08:00:00.250Z",
]
# Values and literals come from small overlapping pools, so that equal, near and differently typed pairs
# meet often; a few arbitrary floats and texts keep the rest honest.
STRINGS = ["", "a", "ab", "b", "pro", "Pro", "é", "a@x.com", "1", *ISO_TEXTS, "not a date", "1767225600"]
NUMBERS = [
    0,
    1,
    -1,
    2,
    0.5,
    1.0,
    2.0,
    -2.5,
    1e11,
    1e11 + 1,  # just above it a number is read as milliseconds
    JAN_1,
    JAN_1 - 30 * DAY,
    JAN_1 + 3 * DAY + 0.5,
    JAN_1 * 1000,
    JAN_1 * 1000 + 1,
    (JAN_1 + 12 * 3600) * 1000 + 1,
    2**53,
    2**53 + 1,
    2**60,
    10**400,  # no float holds it: missing
    math.nan,
    math.inf,
    -math.inf,
]
SCALARS = [None, True, False, *NUMBERS, *STRINGS]
VALUES = [
    *SCALARS,
    [],
    ["a", 1],
    [1.0, True],
    [["a"]],
    ["pro", None, "b"],
    [JAN_1],
    {"city": "a"},
    {"city": ["a"], "geo": {"lat": 1}},
]
LITERALS = [v for v in SCALARS if v is not None and not (isinstance(v, float) and not math.isfinite(v))]
LITERALS = [v for v in LITERALS if not isinstance(v, int) or isinstance(v, bool) or abs(v) < 2**64]
ISO_LITERALS = ISO_TEXTS
SEGMENT_IDS = ["s1", "s2", "s3"]  # s3 is in no member set and has no array: nobody is in it

scalar_values = st.one_of(st.sampled_from(SCALARS), st.floats(), st.text(max_size=3))
values = st.recursive(
    scalar_values,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["city", "geo", "lat"]), inner, max_size=2)
    ),
    max_leaves=4,
)
values = st.one_of(st.sampled_from(VALUES), values)

number_literals = st.one_of(
    st.sampled_from([v for v in LITERALS if isinstance(v, int | float) and not isinstance(v, bool)]),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda v: v + 0.0),  # -0.0 is written 0.0
)
string_literals = st.one_of(st.sampled_from(STRINGS), st.text(max_size=2))
scalar_literals = st.one_of(st.sampled_from(LITERALS), number_literals, string_literals)
time_literals = st.one_of(
    st.sampled_from([0.0, 3600.0, -3600.0, 3 * DAY, -7 * DAY, -30 * DAY]).map(Now),
    st.sampled_from(ISO_LITERALS).map(Date),
)


# Numbers in arithmetic: zero (division by it), ones that overflow together, and arbitrary ones.
arithmetic_numbers = st.one_of(
    st.sampled_from([0, 1, -1, 2, 3, 0.5, 0.1, -0.25, 1e300, 1e-300, 2**53 + 1, JAN_1]), number_literals
)
PERCENTS = [0.0, 10.0, 50.0, 90.0, 99.5, 100.0]


# Built once per set of paths: a recursive strategy built again on every draw of a composite (and
# validated again) cost much of this module's time; the values drawn are the same.
_EXPRESSIONS: dict[tuple, st.SearchStrategy] = {}


def expressions(paths, percentiles=True, max_leaves=4):
    """Sides of a comparison: numbers, fields and percentiles joined by + - * /."""
    key = (tuple(paths), percentiles, max_leaves)
    if key not in _EXPRESSIONS:
        leaf = [arithmetic_numbers, st.sampled_from(paths).map(FieldRef), st.sampled_from(paths).map(FieldRef)]
        if percentiles:
            leaf.append(st.builds(Percentile, st.sampled_from(paths), st.sampled_from(PERCENTS)))
        _EXPRESSIONS[key] = st.recursive(
            st.one_of(*leaf),
            lambda inner: st.builds(Arithmetic, st.sampled_from(ARITHMETIC), inner, inner),
            max_leaves=max_leaves,
        )
    return _EXPRESSIONS[key]


@st.composite
def arithmetic_conditions(draw, paths, percentiles=True):
    """A comparison with arithmetic on one side or both (or a plain one, when the draw has none)."""
    left, right = draw(expressions(paths, percentiles)), draw(expressions(paths, percentiles))
    op = draw(st.sampled_from(COMPARISONS))
    found = [*leaves(left), *leaves(right)]
    if not any(isinstance(leaf, FieldRef | Percentile) for leaf in found):
        left = Arithmetic("-", FieldRef(draw(st.sampled_from(paths))), left)
    if op not in ORDERINGS and any(isinstance(leaf, Percentile) for leaf in found):
        op = draw(st.sampled_from(ORDERINGS))
    return comparison(left, op, right)


@st.composite
def conditions(draw, paths):
    path = draw(st.sampled_from(paths))
    op = draw(st.sampled_from([*CONDITION_OPS, "arithmetic", "arithmetic"]))
    if op == "arithmetic":
        return draw(arithmetic_conditions(paths))
    if op == "exists":
        return Condition(path, op)
    if op in ("in", "contains", "starts_with") and draw(st.integers(0, 2)) == 0:
        return Condition(path, op, FieldRef(draw(st.sampled_from(paths))))
    if op == "in":
        return Condition(path, op, tuple(draw(st.lists(scalar_literals, min_size=1, max_size=4))))
    if op == "contains":
        return Condition(path, op, draw(scalar_literals))
    if op == "starts_with":
        return Condition(path, op, draw(string_literals))
    other = draw(st.sampled_from(["literal", "literal", "time", "field", "percentile"]))
    if other == "field":
        return Condition(path, op, FieldRef(draw(st.sampled_from(paths))))
    if other == "percentile" and op in ORDERINGS:
        percent = draw(st.sampled_from([0.0, 10.0, 50.0, 90.0, 99.5, 100.0]))
        return Condition(path, op, Percentile(draw(st.sampled_from(paths)), percent))
    if other == "time":
        value = draw(time_literals)
        if isinstance(value, Now) and op not in ORDERINGS:
            value = Date(ISO_LITERALS[0])
        return Condition(path, op, value)
    return Condition(path, op, draw(scalar_literals))


event_predicates = st.builds(
    EventPredicate,
    names=st.sampled_from([(), ("A",), ("A", "B")]),
    type=st.sampled_from(EVENT_TYPES),
    where=st.sampled_from(
        [
            (),
            (EventCondition(("properties", "total"), ">", 50),),
            (
                EventCondition(("properties", "plan"), "in", ("pro", "team")),
                EventCondition(("context", "ip"), "exists"),
            ),
        ]
    ),
)
windows = st.sampled_from([None, DAY, 30 * DAY])


@st.composite
def aggregates(draw):
    op = draw(st.sampled_from(["count", "sum", "avg", "min", "max"]))
    return Aggregate(
        op,
        draw(event_predicates),
        None if op == "count" else ("properties", "total"),
        draw(windows),
        draw(st.sampled_from(["=", "!=", "<", "<=", ">", ">="])),
        draw(st.one_of(st.integers(-1, 3), st.sampled_from([0.5, 2.0]))),
    )


def segments(paths):
    leaves = st.one_of(
        conditions(paths),
        conditions(paths),
        arithmetic_conditions(paths),
        aggregates(),
        st.builds(Performed, event_predicates, windows),
        st.sampled_from(SEGMENT_IDS).map(InSegment),
    )
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            inner.map(Not),
            st.lists(inner, min_size=2, max_size=3).map(lambda items: And(tuple(items))),
            st.lists(inner, min_size=2, max_size=3).map(lambda items: Or(tuple(items))),
        ),
        max_leaves=5,
    )


RECORD_PATHS = [
    ("traits", "a"),
    ("traits", "b"),
    ("traits", "nested"),
    ("traits", "nested", "city"),
    ("traits", "nested", "geo", "lat"),
    ("consent", "email"),
    ("consent", "purpose:ads.personalised"),  # a key holding a dot, beside the key it would split into
    ("consent", "purpose:ads"),
    ("consent", "purpose:ads", "personalised"),
    ("scores", "s"),
]
RECORD_FIELDS = sorted({f"{path[0]}.{path[1]}" for path in RECORD_PATHS})
nows = st.floats(JAN_1 - 60 * DAY, JAN_1 + 60 * DAY)


def member_sets(size):
    return st.lists(st.sets(st.sampled_from(SEGMENT_IDS[:2])), min_size=size, max_size=size)


def member_arrays(sets):
    return {segment: np.array([segment in row for row in sets], dtype=bool) for segment in SEGMENT_IDS[:2]}


def assert_agree(segment, columns, records, sets, now):
    if segment.percentiles:  # the per-profile evaluator is told them, the vectorised one takes its rows'
        segment = compile_segment(segment.node, population_percentiles(segment.percentiles, records))
    vectorised = segment.evaluate_columns(columns, member_arrays(sets), now)
    assert vectorised.dtype == bool and vectorised.shape == (len(records),)
    per_profile = [segment.evaluate(record, row, now) for record, row in zip(records, sets, strict=True)]
    assert vectorised.tolist() == per_profile, to_text(segment.node)


def single_conditions(path, others=()):
    """Every operator with every literal of the pools (and every kind of time) on one path; compared with each
    of `others` as a field and as a percentile."""
    strings = [v for v in LITERALS if isinstance(v, str)]
    yield Condition(path, "exists")
    yield Condition(path, "in", tuple(LITERALS))
    yield Condition(path, "in", ("a", 1, True))
    for literal in LITERALS:
        yield Condition(path, "in", (literal,))
        yield Condition(path, "contains", literal)
        for op in ("=", "!=", "<", "<=", ">", ">="):
            yield Condition(path, op, literal)
    for literal in strings:
        yield Condition(path, "starts_with", literal)
    for op in ("=", "!=", "<", "<=", ">", ">="):
        for text in ISO_LITERALS:
            yield Condition(path, op, Date(text))
    for op in ORDERINGS:
        for offset in (0.0, -30 * DAY, 3 * DAY + 0.5, -DAY):
            yield Condition(path, op, Now(offset))
    for op in ("=", "!=", "<", "<=", ">", ">="):
        for other in others:
            yield Condition(path, op, FieldRef(other))
    for op in ORDERINGS:
        for other in others:
            for percent in (0.0, 25.0, 90.0, 100.0):
                yield Condition(path, op, Percentile(other, percent))
    field = FieldRef(path)
    for other in others:
        yield Condition(path, "in", FieldRef(other))
        yield Condition(path, "contains", FieldRef(other))
        yield Condition(path, "starts_with", FieldRef(other))
        second = FieldRef(other)
        for op in ("=", "!=", "<", "<=", ">", ">="):
            for sign in ARITHMETIC:
                yield Comparison(Arithmetic(sign, field, second), op, 1)
                yield Comparison(field, op, Arithmetic(sign, second, 2))
                yield Comparison(Arithmetic(sign, second, field), op, Arithmetic("*", field, 0.5))
            yield Comparison(0, op, Arithmetic("/", field, second))
            yield Comparison(Arithmetic("*", field, field), op, Arithmetic("-", 1e300, second))
        for op in ORDERINGS:
            yield Comparison(field, op, Arithmetic("*", Percentile(other, 50.0), 0.5))


def test_every_operator_literal_and_value_agree():
    records = [{"traits.x": value, "traits.n": {"city": value}} for value in VALUES]
    records += [{}, {"traits.n": "not an object"}]
    # pairs for comparisons of one field with another
    records += [{"traits.x": a, "traits.y": b} for a in VALUES[::3] for b in VALUES[::4]]
    checked = 0
    sets = [set() for _ in records]
    columns = Columns.from_records(records)
    paths = (("traits", "x"), ("traits", "n", "city"), ("traits", "y"))
    for path in paths[:2]:
        for node in single_conditions(path, paths):
            for now in (JAN_1, JAN_1 + 30 * DAY + 0.5):
                assert_agree(compile_segment(node), columns, records, sets, now)
                checked += 1
    assert checked > 1000


def test_in_contains_and_starts_with_against_a_field_agree_for_every_pair_of_values():
    """Every scalar of the pools against every list (and every value against every value) on both sides of
    `in`, `contains` and `starts_with`: equal under the language's typing (1 = 1.0, never true or "1"), a
    prefix only of a string by a string, in both evaluators."""
    lists = [v for v in VALUES if isinstance(v, list)] + [[1, 1.0, True, "1"], [False, 0, ""], [JAN_1, 2**53 + 1]]
    pairs = [(a, b) for a in VALUES for b in lists] + [(b, a) for a in VALUES for b in lists]
    pairs += [(a, b) for a in VALUES for b in VALUES]
    records = [{"traits.x": a, "traits.y": b, "traits.n": {"city": a}} for a, b in pairs]
    columns = Columns.from_records(records)
    sets = [set() for _ in records]
    for path in (("traits", "x"), ("traits", "n", "city")):
        for op in ("in", "contains", "starts_with"):
            for other in (("traits", "y"), ("traits", "x")):
                assert_agree(compile_segment(Condition(path, op, FieldRef(other))), columns, records, sets, JAN_1)
                assert_agree(compile_segment(Condition(other, op, FieldRef(path))), columns, records, sets, JAN_1)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), node=segments(RECORD_PATHS), now=nows)
def test_both_evaluators_agree_on_records(data, node, now):
    segment = compile_segment(node)
    fields = sorted(set(RECORD_FIELDS) | segment.fields)
    records = data.draw(st.lists(st.dictionaries(st.sampled_from(fields), values), min_size=1, max_size=20))
    sets = data.draw(member_sets(len(records)))
    assert_agree(segment, Columns.from_records(records), records, sets, now)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), node=arithmetic_conditions(RECORD_PATHS), now=nows)
def test_both_evaluators_agree_on_arithmetic(data, node, now):
    """Comparisons with arithmetic on their own (inside and/or a difference can hide), `!=` included."""
    segment = compile_segment(node)
    fields = sorted(set(RECORD_FIELDS) | segment.fields)
    records = data.draw(st.lists(st.dictionaries(st.sampled_from(fields), values), min_size=1, max_size=20))
    assert_agree(segment, Columns.from_records(records), records, [set() for _ in records], now)


TYPED_PATHS = [
    ("traits", "f"),
    ("traits", "i"),
    ("traits", "b"),
    ("traits", "u"),
    ("traits", "o"),
    ("traits", "m"),
    ("traits", "m", "city"),
    ("traits", "u", "x"),  # a sub-path into a typed array: nothing there
    ("traits", "absent"),
]


@st.composite
def typed_populations(draw):
    size = draw(st.integers(1, 20))

    def column(strategy):
        return draw(st.lists(strategy, min_size=size, max_size=size))

    floats = column(
        st.one_of(st.sampled_from([float(v) for v in NUMBERS if not isinstance(v, int) or abs(v) < 2**64]), st.floats())
    )
    ints = column(st.one_of(st.integers(-3, 3), st.sampled_from([int(JAN_1), int(JAN_1 * 1000), 2**53 + 1])))
    bools = column(st.booleans())
    texts = column(st.sampled_from(STRINGS))
    objects = column(st.one_of(st.none(), st.sampled_from(STRINGS)))
    mixed = column(values)
    arrays = {
        "traits.f": np.array(floats, dtype=np.float64),
        "traits.i": np.array(ints, dtype=np.int64),
        "traits.b": np.array(bools, dtype=bool),
        "traits.u": np.array(texts, dtype=str),
        "traits.o": np.array(objects, dtype=object),
        "traits.m": mixed,
    }
    records = [
        {
            "traits.f": floats[i],
            "traits.i": ints[i],
            "traits.b": bools[i],
            "traits.u": texts[i],
            "traits.o": objects[i],
            "traits.m": mixed[i],
        }
        for i in range(size)
    ]
    return size, arrays, records


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), node=segments(TYPED_PATHS), population=typed_populations(), now=nows)
def test_both_evaluators_agree_on_typed_arrays(data, node, population, now):
    segment = compile_segment(node)
    size, arrays, records = population
    computed = {}
    for field in sorted(f for f in segment.fields if f.startswith("computed.")):
        column = data.draw(
            st.lists(st.one_of(st.none(), st.integers(0, 5), st.sampled_from([0.5, 2.0])), min_size=size, max_size=size)
        )
        computed[field] = np.array([math.nan if v is None else float(v) for v in column])
        for record, value in zip(records, column, strict=True):
            record[field] = value
    sets = data.draw(member_sets(size))
    assert_agree(segment, Columns.from_arrays(size, {**arrays, **computed}), records, sets, now)


def test_every_operator_literal_and_value_agree_on_typed_arrays():
    floats = [float(v) for v in NUMBERS if not isinstance(v, int) or abs(v) < 2**64]
    size = max(len(floats), len(VALUES))

    def cycled(pool):
        return [pool[i % len(pool)] for i in range(size)]

    columns = {
        "traits.f": cycled(floats),
        "traits.i": cycled([-1, 0, 1, 2, int(JAN_1), int(JAN_1 * 1000), 2**53 + 1]),
        "traits.b": cycled([True, False]),
        "traits.u": cycled(STRINGS),
        "traits.o": cycled([None, *STRINGS]),
        "traits.m": cycled(VALUES),
    }
    arrays = {
        "traits.f": np.array(columns["traits.f"], dtype=np.float64),
        "traits.i": np.array(columns["traits.i"], dtype=np.int64),
        "traits.b": np.array(columns["traits.b"], dtype=bool),
        "traits.u": np.array(columns["traits.u"], dtype=str),
        "traits.o": np.array(columns["traits.o"], dtype=object),
        "traits.m": columns["traits.m"],
    }
    records = [{field: column[i] for field, column in columns.items()} for i in range(size)]
    sets = [set() for _ in records]
    population = Columns.from_arrays(size, arrays)
    for path in TYPED_PATHS:
        for node in single_conditions(path, TYPED_PATHS[:7:2]):
            assert_agree(compile_segment(node), population, records, sets, JAN_1 + 0.5)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(node=arithmetic_conditions(TYPED_PATHS), population=typed_populations(), now=nows)
def test_both_evaluators_agree_on_arithmetic_over_typed_arrays(node, population, now):
    size, arrays, records = population
    segment = compile_segment(node)
    assert_agree(segment, Columns.from_arrays(size, arrays), records, [set() for _ in records], now)


time_values = st.one_of(
    st.floats(JAN_1 - 90 * DAY, JAN_1 + 90 * DAY),
    st.floats(JAN_1 - 90 * DAY, JAN_1 + 90 * DAY).map(lambda seconds: seconds * 1000),
    st.integers(int(JAN_1 - 90 * DAY), int(JAN_1 + 90 * DAY)),
    st.sampled_from([*ISO_TEXTS, "not a date", True, None, [JAN_1]]),
)
offsets = st.integers(-60, 60).map(lambda days: days * DAY) | st.integers(-100_000, 100_000).map(float)


@settings(max_examples=300, deadline=None)
@given(
    value=time_values,
    op=st.sampled_from(ORDERINGS),
    offset=offsets,
    now=nows,
    fractions=st.lists(st.floats(0.0, 1.0, exclude_min=True, exclude_max=True), max_size=5),
)
def test_next_change_is_the_exact_instant_a_time_comparison_flips(value, op, offset, now, fractions):
    segment = compile_segment(Condition(("traits", "t"), op, Now(offset)))
    record = {"traits.t": value}
    at_now = segment.evaluate(record, now=now)
    change = segment.next_change(record, now=now)
    if change is None:
        for later in (now + 1.0, now + DAY, now + 365 * DAY, now + 1e10):
            assert segment.evaluate(record, now=later) == at_now
        return
    assert change > now
    assert segment.evaluate(record, now=change) != at_now
    assert segment.evaluate(record, now=change + 1e-3) != at_now
    before = math.nextafter(change, -math.inf)
    if before > now:
        assert segment.evaluate(record, now=before) == at_now
    for fraction in fractions:
        instant = now + (change - now) * fraction
        if now < instant < change:
            assert segment.evaluate(record, now=instant) == at_now


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    node=segments([("traits", "t"), ("traits", "u"), ("computed", "c")]),
    now=nows,
    fractions=st.lists(st.floats(0.0, 1.0, exclude_min=True, exclude_max=True), min_size=1, max_size=5),
)
def test_membership_holds_until_next_change(data, node, now, fractions):
    segment = compile_segment(node)
    fields = sorted({"traits.t", "traits.u", "computed.c"} | segment.fields)
    record = data.draw(st.dictionaries(st.sampled_from(fields), st.one_of(time_values, values)))
    members = data.draw(st.sets(st.sampled_from(SEGMENT_IDS)))
    at_now = segment.evaluate(record, members, now)
    change = segment.next_change(record, members, now)
    assert change is None or change > now
    until = change if change is not None else now + 400 * DAY
    instants = [now + (until - now) * fraction for fraction in fractions]
    if change is not None:
        instants.append(math.nextafter(change, -math.inf))
    for instant in instants:
        if now < instant < until:
            assert segment.evaluate(record, members, instant) == at_now
    if not segment.time_dependent:
        assert change is None


STEPS = ["plan", "a", "first name", "purpose:email", "0", "a-b", "é", "and", "now", "x_1"]
path_tails = st.lists(st.sampled_from(STEPS), min_size=1, max_size=3).map(tuple)
# A profile field's step may hold a dot (the consent key of the category "ads.personalised"); an event
# field's may not (the profile service reads the dot as a step), so event paths keep `path_tails`.
DOTTED_STEPS = ["purpose:ads.personalised", "purpose:ads", "personalised", "a.b", ".", "x."]
profile_tails = st.lists(st.sampled_from(STEPS + DOTTED_STEPS), min_size=1, max_size=3).map(tuple)
any_text = st.text(max_size=8)


@st.composite
def any_conditions(draw):
    path = (draw(st.sampled_from(["traits", "computed", "consent", "scores"])), *draw(profile_tails))
    op = draw(st.sampled_from(CONDITION_OPS))
    literal = st.one_of(st.integers(-(10**30), 10**30), number_literals, any_text, st.booleans())
    if op == "exists":
        return Condition(path, op)
    if op == "in":
        return Condition(path, op, tuple(draw(st.lists(literal, min_size=1, max_size=3))))
    if op in ("in", "contains", "starts_with") and draw(st.integers(0, 3)) == 0:
        other = (draw(st.sampled_from(["traits", "computed", "consent", "scores"])), *draw(profile_tails))
        return Condition(path, op, FieldRef(other))
    if op == "starts_with":
        return Condition(path, op, draw(any_text))
    if op in ("=", "!=", "<", "<=", ">", ">=") and draw(st.integers(0, 3)) == 0:
        paths = [path, *(tuple([root, *draw(profile_tails)]) for root in ("traits", "computed", "consent", "scores"))]
        return draw(arithmetic_conditions(paths))
    if op in ("=", "!=", "<", "<=", ">", ">=") and draw(st.integers(0, 3)) == 0:
        other = (draw(st.sampled_from(["traits", "computed", "consent", "scores"])), *draw(profile_tails))
        if op in ORDERINGS and draw(st.booleans()):
            return Condition(path, op, Percentile(other, draw(st.floats(0, 100).map(lambda v: v + 0.0))))
        return Condition(path, op, FieldRef(other))
    if op in ("=", "!=", "<", "<=", ">", ">=") and draw(st.booleans()):
        offset = draw(st.integers(-(10**8), 10**8).map(float))
        value = Now(offset) if op in ORDERINGS else Date(draw(st.sampled_from(ISO_LITERALS)))
        return Condition(path, op, value)
    return Condition(path, op, draw(literal))


@st.composite
def any_events(draw):
    names = tuple(sorted(draw(st.sets(st.text(min_size=1, max_size=6), max_size=3))))
    where_paths = draw(st.lists(path_tails, max_size=3, unique=True))
    where = []
    for tail in where_paths:
        condition = draw(any_conditions())
        root = draw(st.sampled_from(["properties", "context"]))
        if isinstance(condition, Comparison):
            condition = Condition(tail, "=", 1)  # arithmetic is not on an event
        profile_only = isinstance(condition.value, Now | Date | FieldRef | Percentile)  # not on an event
        value = condition.value if not profile_only else 1
        op = condition.op if not profile_only else "="
        where.append(EventCondition((root, *tail), op, value))
    if draw(st.integers(0, 2)) == 0:  # arithmetic over the event's own fields
        paths = [(draw(st.sampled_from(["properties", "context"])), *draw(path_tails)) for _ in range(2)]
        found = draw(arithmetic_conditions(paths, percentiles=False))
        if isinstance(found, Comparison):
            where.insert(draw(st.integers(0, len(where))), found)
    return EventPredicate(names, draw(st.sampled_from(EVENT_TYPES)), tuple(where))


@st.composite
def any_aggregates(draw):
    op = draw(st.sampled_from(["count", "sum", "avg", "min", "max", "performed"]))
    within = draw(st.one_of(st.none(), st.integers(1, 10**7).map(float)))
    if op == "performed":
        return Performed(draw(any_events()), within)
    property_path = None if op == "count" else ("properties", *draw(path_tails))
    comparison = draw(st.sampled_from(["=", "!=", "<", "<=", ">", ">="]))
    return Aggregate(op, draw(any_events()), property_path, within, comparison, draw(number_literals))


any_segments = st.recursive(
    st.one_of(any_conditions(), any_aggregates(), any_text.filter(bool).map(InSegment)),
    lambda inner: st.one_of(
        inner.map(Not),
        st.lists(inner, min_size=2, max_size=3).map(lambda items: And(tuple(items))),
        st.lists(inner, min_size=2, max_size=3).map(lambda items: Or(tuple(items))),
    ),
    max_leaves=6,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(node=any_segments)
def test_text_and_json_forms_round_trip(node):
    text = to_text(node)
    assert parse(text) == node, text
    assert to_text(parse(text)) == text
    assert from_json(to_json(node)) == node
    assert compile_segment(parse(text)).computed_traits == compile_segment(node).computed_traits
