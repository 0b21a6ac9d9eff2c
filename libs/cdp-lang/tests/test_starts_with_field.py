"""`starts_with` against another field (`traits.email starts_with traits.first_name`): what it means for one
person and a population alike, how it is written back, and how bad input is refused where it is."""

from __future__ import annotations

import pytest

from cdp_lang import InvalidArgument, ProfileView, SegmentSyntaxError, compile_condition, from_json, parse, to_json
from cdp_lang.columns import Columns
from cdp_lang.compiler import compile_segment
from cdp_lang.nodes import Condition, FieldRef
from cdp_lang.text import to_text

NOW = 1_790_000_000.0


def agreed(text: str, records: list[dict]) -> list[bool]:
    """Each record's answer, checked to be the same from the per-profile and the vectorised evaluator."""
    segment = compile_segment(parse(text))
    per_profile = [segment.evaluate(record, now=NOW) for record in records]
    assert segment.evaluate_columns(Columns.from_records(records), now=NOW).tolist() == per_profile, text
    return per_profile


def test_a_field_starts_with_another_fields_string():
    records = [
        {"traits.email": "anna.k@example.com", "traits.first_name": "anna"},
        {"traits.email": "anna.k@example.com", "traits.first_name": "Anna"},  # by code point: case matters
        {"traits.email": "bob@example.com", "traits.first_name": "anna"},
        {"traits.email": "anna", "traits.first_name": "anna"},  # a string starts with itself
        {"traits.email": "anna", "traits.first_name": ""},  # and with the empty string
        {"traits.email": "", "traits.first_name": ""},
        {"traits.email": "anna.k@example.com"},  # no value on the right: false
        {"traits.first_name": "anna"},  # nor on the left
        {"traits.email": "anna.k@example.com", "traits.first_name": None},
        {"traits.email": "123", "traits.first_name": 1},  # a number is no prefix
        {"traits.email": 123, "traits.first_name": "1"},  # and has none
        {"traits.email": "true", "traits.first_name": True},  # nor is a bool
        {"traits.email": ["anna"], "traits.first_name": "anna"},  # a list is no string
        {"traits.email": "anna", "traits.first_name": ["anna"]},
        {"traits.email": {"a": "anna"}, "traits.first_name": "anna"},
    ]
    assert agreed("traits.email starts_with traits.first_name", records) == [
        True,
        False,
        False,
        True,
        True,
        True,
        False,
        False,
        False,
        False,
        False,
        False,
        False,
        False,
        False,
    ]
    # `not` is plain negation: no value makes starts_with false, so its negation holds
    assert agreed("not traits.email starts_with traits.first_name", records[6:9]) == [True, True, True]


def test_sub_paths_on_either_side_and_the_same_field_on_both():
    records = [
        {"traits.contact": {"email": "ops@acme.io"}, "traits.team": {"prefix": "ops@"}},
        {"traits.contact": {"email": "dev@acme.io"}, "traits.team": {"prefix": "ops@"}},
        {"traits.contact": "ops@acme.io", "traits.team": {"prefix": "ops@"}},  # not an object: no value
    ]
    assert agreed("traits.contact.email starts_with traits.team.prefix", records) == [True, False, False]
    assert agreed("traits.a starts_with traits.a", [{"traits.a": "x"}, {"traits.a": 1}, {}]) == [True, False, False]


def test_many_distinct_pairs_agree_in_the_vectorised_evaluator():
    # The vectorised evaluator tests each distinct pair of strings once: many rows share few pairs here.
    names = ["", "a", "ab", "abc", "b", "é", "éa"]
    records = [{"traits.x": x, "traits.y": y} for x in names for y in names] * 3
    answers = agreed("traits.x starts_with traits.y", records)
    assert answers == [record["traits.x"].startswith(record["traits.y"]) for record in records]


def test_both_written_forms_round_trip():
    text = "traits.email starts_with traits.first_name and traits.`full name` starts_with traits.a.b"
    node = parse(text)
    assert to_text(node) == text
    assert from_json(to_json(node)) == node
    assert parse("traits.email starts_with traits.first_name") == Condition(
        ("traits", "email"), "starts_with", FieldRef(("traits", "first_name"))
    )
    assert to_json(parse("traits.email starts_with traits.first_name")) == {
        "field": "traits.email",
        "op": "starts_with",
        "value": {"field": "traits.first_name"},
    }
    # a literal prefix is what it was
    assert parse('traits.email starts_with "ops@"') == Condition(("traits", "email"), "starts_with", "ops@")


def test_a_condition_on_one_person_reads_both_fields():
    condition = compile_condition("traits.email starts_with traits.first_name")
    assert condition.reads.fields == {"traits.email", "traits.first_name"}
    assert not condition.reads.time
    assert condition.evaluate(ProfileView.of(traits={"email": "anna@x.io", "first_name": "anna"}), NOW)
    assert not condition.evaluate(ProfileView.of(traits={"email": "anna@x.io"}), NOW)
    assert condition.next_change(ProfileView.of(traits={"email": "anna@x.io", "first_name": "anna"}), NOW) is None
    assert compile_condition(condition.to_json()).text == condition.text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("traits.email starts_with", "line 1, column 25: expected a string (the prefix) or a field, found end"),
        ("traits.email starts_with 3", "column 26: expected a string (the prefix) or a field, found '3'"),
        ("traits.email starts_with traits", "column 26: expected a string (the prefix) or a field"),
        ("traits.email starts_with properties.x", "column 26: expected a string (the prefix) or a field"),
        ("traits.email\n  starts_with now", "line 2, column 15: expected a string (the prefix) or a field"),
    ],
)
def test_bad_text_is_refused_at_its_position(text, message):
    with pytest.raises(SegmentSyntaxError) as error:
        parse(text, "definition.text")
    assert error.value.field == "definition.text"
    assert message in str(error.value.description), error.value.description


@pytest.mark.parametrize(
    ("tree", "field", "message"),
    [
        ({"field": "traits.e", "op": "starts_with", "value": {"field": 3}}, "definition.value.field", "not a field"),
        (
            {"field": "traits.e", "op": "starts_with", "value": {"field": "nowhere.x"}},
            "definition.value.field",
            "not a field",
        ),
        ({"field": "traits.e", "op": "starts_with", "value": {"path": "traits.x"}}, "definition.value.path", "unknown"),
        ({"field": "traits.e", "op": "starts_with", "value": 3}, "definition.value", "must be a string"),
    ],
)
def test_a_bad_tree_names_its_json_path(tree, field, message):
    with pytest.raises(InvalidArgument) as error:
        from_json(tree)
    assert error.value.field == field
    assert message in error.value.description, error.value.description


def test_on_an_event_field_starts_with_still_takes_a_string():
    # inside an event predicate the profile service compares with values: no other field there
    with pytest.raises(SegmentSyntaxError, match="column 47: expected a string"):
        parse('performed("A" and properties.path starts_with properties.x)')
    with pytest.raises(InvalidArgument) as error:
        from_json(
            {"performed": {"where": [{"path": "properties.p", "op": "starts_with", "value": {"field": "traits.x"}}]}}
        )
    assert error.value.field == "definition.performed.where[0].value"
