"""A condition's event aggregate computed from a view's events agrees with the profile service's computed trait
for the same definition (`computed_traits`), so a condition means the same whichever source answers it.

This test reads the profile service's domain (test-only: the library itself imports no service).
"""

from __future__ import annotations

import math

import hypothesis.strategies as st
from hypothesis import HealthCheck, assume, given, settings

from cdp_kit.profile_client import definition_message
from cdp_lang import Event, InvalidArgument, ProfileView, compile_condition
from cdp_lang.condition import _event_aggregates
from cdp_lang.nodes import (
    ARITHMETIC,
    COMPARISONS,
    CONDITION_OPS,
    Arithmetic,
    Comparison,
    EventCondition,
    EventPredicate,
    FieldRef,
    Performed,
    comparison,
    leaves,
)
from cdp_lang.text import to_text
from cdp_profile.api import definition_from_message
from cdp_profile.domain.computed import MISSING, ComputedTrait

NOW = 1_790_000_000.0
DAY = 86_400.0
NAMES = ["Order Completed", "Order Refunded"]
TYPES = ["track", "page", "identify"]
SCALARS = [0, 1, 2, 1.0, 2.5, -1, "", "a", "ab", "b", "1", True, False]
VALUES = [*SCALARS, None, ["a", 1], [True], {"a": 1}, float("nan"), float("inf"), 2**70]
# What an event's payload holds where conditions read it: numbers more often than not (arithmetic needs
# them), some that overflow together.
NUMBERS = [0, 1, 2, 1.0, 2.5, -1, 0.5, -0.0, 1e308, 2**53 + 1]
payload_values = st.one_of(st.sampled_from(NUMBERS), st.sampled_from(NUMBERS), st.sampled_from(VALUES))
# Numbers in arithmetic: zero (division by it), ones that overflow together, and small ones.
OPERANDS = [0, 1, -1, 2, 0.5, 1e308, 1e-308, 2**53 + 1]

event_fields = st.sampled_from([("properties", "total"), ("properties", "tag")]).map(FieldRef)
expressions = st.recursive(
    st.one_of(st.sampled_from(OPERANDS), event_fields, event_fields),
    lambda inner: st.builds(Arithmetic, st.sampled_from(ARITHMETIC), inner, inner),
    max_leaves=4,
)


@st.composite
def arithmetic(draw) -> EventCondition | Comparison:
    """A comparison with arithmetic over the event's fields (or the plain condition it comes down to)."""
    left, op, right = draw(expressions), draw(st.sampled_from(COMPARISONS)), draw(expressions)
    if (not isinstance(left, Arithmetic) and not isinstance(right, Arithmetic)) or not any(
        isinstance(leaf, FieldRef) for leaf in (*leaves(left), *leaves(right))
    ):
        left = Arithmetic("*", draw(event_fields), left)
    node = comparison(left, op, right)
    assert isinstance(node, Comparison)
    return node


@st.composite
def where(draw) -> EventCondition | Comparison:
    key = draw(st.sampled_from(["total", "tag"]))
    op = draw(st.sampled_from([*CONDITION_OPS, "arithmetic", "arithmetic"]))
    if op == "arithmetic":
        return draw(arithmetic())
    if op == "exists":
        return EventCondition(("properties", key), op)
    if op == "in":
        return EventCondition(("properties", key), op, tuple(draw(st.lists(st.sampled_from(SCALARS), min_size=1))))
    if op in ("<", "<=", ">", ">=", "starts_with"):
        value = draw(st.sampled_from([s for s in SCALARS if not isinstance(s, bool)]))
        if op == "starts_with" and not isinstance(value, str):
            value = "a"
        return EventCondition(("properties", key), op, value)
    return EventCondition(("properties", key), op, draw(st.sampled_from(SCALARS)))


@st.composite
def event(draw) -> Event:
    payload = draw(st.dictionaries(st.sampled_from(["total", "tag"]), payload_values, max_size=2))
    return Event(
        draw(st.sampled_from(TYPES)),
        draw(st.sampled_from(NAMES)),
        NOW - draw(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0])) * DAY,
        payload,
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    names=st.lists(st.sampled_from(NAMES), max_size=2, unique=True),
    kind=st.sampled_from([*TYPES, "any"]),
    conditions=st.lists(where(), max_size=2, unique=True),
    events=st.lists(event(), max_size=6),
)
def test_an_event_counts_here_when_the_profile_service_counts_it(names, kind, conditions, events):
    predicate = EventPredicate(tuple(sorted(names)), kind, tuple(conditions))
    node = Performed(predicate, 2 * DAY)
    text = to_text(node)
    try:
        condition = compile_condition(text)
    except InvalidArgument:
        assume(False)  # two conditions the profile's `where` cannot hold together (see nodes.where_document)
    [definition] = condition.computed_traits
    trait = ComputedTrait.from_dict(definition)
    [aggregate] = _event_aggregates(condition.node).values()
    for one in events:
        profile_counts = trait.matches_event(one.type, one.name) and trait.extract(one.payload) is not MISSING
        assert aggregate.matches(one) == profile_counts, (text, one)
    in_window = [one for one in events if one.at + 2 * DAY > NOW and aggregate.matches(one)]
    assert condition.evaluate(ProfileView(events=events), NOW) == bool(in_window)


@settings(max_examples=200, deadline=None)
@given(
    op=st.sampled_from(["sum", "avg", "min", "max"]),
    values=st.lists(st.sampled_from(VALUES), max_size=6),
)
def test_value_aggregates_take_the_values_the_profile_service_takes(op, values):
    condition = compile_condition(f'{op}(properties.total, "Order Completed") > 0')
    trait = ComputedTrait.from_dict(condition.computed_traits[0])
    taken = [value for value in values if trait.extract({"total": value}) is not MISSING]
    taken = [float(value) for value in taken]
    events = [Event("track", "Order Completed", NOW, {"total": value}) for value in values]
    [aggregate] = _event_aggregates(condition.node).values()
    computed = aggregate.value(events, NOW)
    if op == "sum":
        assert computed == math.fsum(taken)
    elif not taken:
        assert computed is None
    else:
        expected = {"avg": math.fsum(taken) / len(taken), "min": min(taken), "max": max(taken)}[op]
        assert computed == expected


@settings(max_examples=400, deadline=None)
@given(
    conditions=st.lists(arithmetic(), min_size=1, max_size=2, unique=True),
    payloads=st.lists(
        st.dictionaries(st.sampled_from(["total", "tag"]), payload_values, max_size=2), min_size=1, max_size=8
    ),
)
def test_event_arithmetic_matches_what_the_profile_service_matches(conditions, payloads):
    """Arithmetic inside an event predicate, on its own: the language's matcher and the profile service's
    `$expr` agree event for event (no number, a division by zero, an overflow), also for the definition as
    segmentation registers it over gRPC (a protobuf Struct holds every number as a double)."""
    node = Performed(EventPredicate((), "any", tuple(conditions)))
    condition = compile_condition(to_text(node))
    [definition] = condition.computed_traits
    sent = definition_from_message(definition_message(definition))  # as segmentation registers it
    traits = (ComputedTrait.from_dict(definition), sent)
    [aggregate] = _event_aggregates(condition.node).values()
    for payload in payloads:
        one = Event("track", "Order Completed", NOW, payload)
        for trait in traits:
            assert aggregate.matches(one) == (trait.extract(one.payload) is not MISSING), (to_text(node), payload)


def test_a_sum_too_large_for_a_double_has_no_value_as_in_the_profile_service():
    """Two totals of 1e308 add up past the largest double: the profile service's trait is then no finite
    number, so `> 0` is false for it (a sum's missing value would be 0); here the same, not an error."""
    events = [Event("track", "Order Completed", NOW, {"total": 1e308}) for _ in range(2)]
    events.append(Event("track", "Order Completed", NOW, {"total": -1e308}))
    for op in ("sum", "avg"):
        condition = compile_condition(f'{op}(properties.total, "Order Completed") > 0')
        assert not condition.evaluate(ProfileView(events=events[:2]), NOW)
        assert condition.evaluate(ProfileView(events=events[:1]), NOW)
