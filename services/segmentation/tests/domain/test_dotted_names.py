"""A field name that holds a dot - a consent key for the category "ads.personalised", which the collector
accepts and the profile stores as `consent.purpose:ads.personalised` - is reachable in both written forms.

The text puts such a step between backticks (`` consent.`purpose:ads.personalised` ``), the JSON tree gives
the path as a list of its steps (`["consent", "purpose:ads.personalised"]`). Both refused it before: a
backticked step could not hold a dot, and a JSON path was split at every dot. What existing definitions say
is unchanged: without backticks (or as a JSON string) a dot still starts a step into the value.
"""

from __future__ import annotations

import pytest

from cdp_kit.errors import InvalidArgument
from cdp_lang.percentiles import spec_of
from cdp_segmentation.domain import (
    Aggregate,
    Columns,
    Condition,
    EventCondition,
    EventPredicate,
    SegmentSyntaxError,
    compile_segment,
    from_json,
    parse,
    to_json,
    to_text,
)
from cdp_segmentation.domain.nodes import FieldRef, Percentile

ADS = ("consent", "purpose:ads.personalised")
TEXT = "consent.`purpose:ads.personalised` = true"
TREE = {"field": ["consent", "purpose:ads.personalised"], "op": "=", "value": True}
# The profile's flat fields (cdp_kit.profile_fields): one consent key with a dot, and its neighbour without.
GRANTED = {"consent.purpose:ads.personalised": True, "consent.purpose:ads": False}
REFUSED = {"consent.purpose:ads.personalised": False, "consent.purpose:ads": True}


def test_a_consent_key_with_a_dot_is_named_between_backticks_and_round_trips():
    node = parse(TEXT)
    assert node == Condition(ADS, "=", True)
    assert to_text(node) == TEXT
    assert parse(to_text(node)) == node


def test_the_json_tree_names_it_as_a_list_of_steps_and_writes_it_back_so():
    node = from_json(TREE)
    assert node == parse(TEXT)
    assert to_json(node) == TREE
    assert from_json(to_json(node)) == node
    # A path without a dot in a step is written as it always was, and may be given as a list too.
    assert to_json(parse('traits.address.city = "Berlin"'))["field"] == "traits.address.city"
    assert from_json({"field": ["traits", "address", "city"], "op": "exists"}) == parse("traits.address.city exists")


def test_existing_definitions_mean_what_they_meant():
    """Without backticks, or as a JSON string, a dot still starts a step into the value."""
    plain = parse("consent.purpose:ads.personalised = true")
    assert plain == Condition(("consent", "purpose:ads", "personalised"), "=", True)
    assert from_json({"field": "consent.purpose:ads.personalised", "op": "=", "value": True}) == plain
    assert to_text(plain) == "consent.purpose:ads.personalised = true"
    assert to_json(plain)["field"] == "consent.purpose:ads.personalised"
    assert plain != parse(TEXT)


def test_the_segment_reads_the_profiles_consent_key_in_both_evaluators():
    for node in (parse(TEXT), from_json(TREE)):
        segment = compile_segment(node)
        assert [segment.evaluate(GRANTED), segment.evaluate(REFUSED), segment.evaluate({})] == [True, False, False]
        columns = Columns.from_records([GRANTED, REFUSED, {}])
        assert segment.evaluate_columns(columns).tolist() == [True, False, False]
        assert "consent.purpose:ads.personalised" in segment.fields


def test_other_fields_percentiles_and_arithmetic_take_such_a_name_too():
    texts = [
        "traits.`a.b` = consent.`purpose:ads.personalised`",
        "scores.`model.v2` >= percentile(scores.`model.v2`, 90)",
        "traits.`a.b` * 2 > traits.`c.d`.e",
        "consent.`purpose:ads.personalised` exists and not traits.`first name.last` contains traits.`x.y`",
    ]
    for text in texts:
        node = parse(text)
        assert to_text(node) == text
        assert from_json(to_json(node)) == node
    assert parse(texts[0]).value == FieldRef(("consent", "purpose:ads.personalised"))
    # A percentile is kept under a key of its path: one with a dotted name is not another path's.
    dotted = spec_of(Percentile(("scores", "model.v2"), 90.0)).key
    assert dotted != spec_of(Percentile(("scores", "model", "v2"), 90.0)).key == "scores.model.v2@90"


def test_an_event_fields_name_holds_no_dot_in_either_form():
    """The profile service reads a dot in an event filter's path as a step into an object, so a property
    named `a.b` cannot be told from `b` inside `a`: refused, naming why, rather than counting other events."""
    for text in (
        'count(event = "Order Completed" and properties.`a.b` > 1) >= 1',
        "sum(properties.`a.b`) > 1",
        'count(event = "Order Completed" and properties.x > properties.`a.b` * 2) >= 1',
    ):
        with pytest.raises(SegmentSyntaxError) as refused:
            parse(text)
        assert "cannot hold a dot" in str(refused.value)
    with pytest.raises(InvalidArgument) as refused:
        from_json({"performed": {"where": [{"path": ["properties", "a.b"], "op": "exists"}]}})
    assert refused.value.field == "definition.performed.where[0].path" and "cannot hold a dot" in str(refused.value)
    # As steps they are what they always were.
    node = parse('count(event = "Order Completed" and properties.a.b > 1) >= 1')
    assert isinstance(node, Aggregate)
    assert node.event == EventPredicate(
        ("Order Completed",), "track", (EventCondition(("properties", "a", "b"), ">", 1),)
    )


@pytest.mark.parametrize(
    "tree",
    [
        {"field": ["consent"], "op": "exists"},
        {"field": ["traits", ""], "op": "exists"},
        {"field": ["traits", "a`b"], "op": "exists"},
        {"field": ["traits", 1], "op": "exists"},
        {"field": [], "op": "exists"},
    ],
)
def test_a_list_path_is_refused_where_a_string_would_be(tree):
    with pytest.raises(InvalidArgument) as refused:
        from_json(tree)
    assert refused.value.field == "definition.field"


def test_an_empty_backticked_name_is_refused():
    with pytest.raises(SegmentSyntaxError) as refused:
        parse("traits.`` = 1")
    assert (refused.value.line, refused.value.column) == (1, 8)
