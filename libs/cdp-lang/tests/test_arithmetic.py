"""Arithmetic on the sides of a comparison (`traits.ltv > 2 * traits.avg_order`), and `in` / `contains`
against another field (`traits.country in traits.allowed_countries`): what they mean for one person and a
population alike, how they are written back, and how bad text is refused at its position."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cdp_lang import InvalidArgument, ProfileView, SegmentSyntaxError, compile_condition, from_json, parse, to_json
from cdp_lang.columns import Columns
from cdp_lang.compiler import compile_segment
from cdp_lang.nodes import MAX_DEPTH, Arithmetic, Comparison, Condition, FieldRef
from cdp_lang.text import to_text

NOW = 1_790_000_000.0


def agreed(text: str, records: list[dict]) -> list[bool]:
    """Each record's answer, checked to be the same from the per-profile and the vectorised evaluator."""
    segment = compile_segment(parse(text))
    per_profile = [segment.evaluate(record, now=NOW) for record in records]
    assert segment.evaluate_columns(Columns.from_records(records), now=NOW).tolist() == per_profile, text
    return per_profile


def test_the_briefs_examples_mean_what_they_say():
    assert agreed(
        "traits.ltv > 2 * traits.avg_order",
        [{"traits.ltv": 201, "traits.avg_order": 100}, {"traits.ltv": 200, "traits.avg_order": 100}],
    ) == [True, False]
    # `/` binds tighter than `-`: 10 - 27 / 3 = 1, not (10 - 27) / 3
    assert agreed(
        "computed.orders_30d - computed.orders_90d / 3 < 0",
        [{"computed.orders_30d": 10, "computed.orders_90d": 27}, {"computed.orders_30d": 8, "computed.orders_90d": 27}],
    ) == [False, True]
    assert agreed("scores.churn_risk * 100 >= 50", [{"scores.churn_risk": 0.5}, {"scores.churn_risk": 0.49}, {}]) == [
        True,
        False,
        False,
    ]


def test_precedence_and_parentheses():
    record = [{"traits.a": 2, "traits.b": 3, "traits.c": 4}]
    assert agreed("traits.a + traits.b * traits.c = 14", record) == [True]  # 2 + 12
    assert agreed("(traits.a + traits.b) * traits.c = 20", record) == [True]
    assert agreed("traits.c - traits.b - traits.a = -1", record) == [True]  # (4 - 3) - 2: left to right
    assert agreed("traits.c - (traits.b - traits.a) = 3", record) == [True]
    assert agreed("traits.c / traits.a / traits.a = 1", record) == [True]
    assert agreed("traits.a > traits.b - 2 * traits.c + 7", record) == [False]  # 3 - 8 + 7 = 2
    assert agreed("traits.a >= traits.b - 2 * traits.c + 7", record) == [True]


def test_no_number_on_either_side_makes_the_comparison_false_not_equal_included():
    records = [
        {"traits.a": 1},  # b missing
        {"traits.a": 1, "traits.b": None},
        {"traits.a": 1, "traits.b": "2"},  # a string is not a number
        {"traits.a": 1, "traits.b": True},  # nor is a bool
        {"traits.a": 1, "traits.b": [2]},
        {"traits.a": 1, "traits.b": math.inf},
        {"traits.a": 1, "traits.b": math.nan},
    ]
    for op in ("=", "!=", "<", "<=", ">", ">="):
        assert agreed(f"traits.a {op} traits.b + 1", records) == [False] * len(records)
    # `not` is plain negation: without a value the comparison is false, so its negation holds
    assert agreed("not traits.a != traits.b + 1", records) == [True] * len(records)
    assert agreed("traits.a != traits.b + 1", [{"traits.a": 1, "traits.b": 1}]) == [True]


def test_division_by_zero_and_overflow_are_no_value_and_nan_never_matches():
    records = [
        {"traits.a": 1, "traits.b": 0},
        {"traits.a": 0, "traits.b": 0},  # 0 / 0
        {"traits.a": 1, "traits.b": -0.0},
        {"traits.a": 1e308, "traits.b": 1e-308},  # overflows to infinity
    ]
    for op in ("=", "!=", "<", "<=", ">", ">="):
        for text in (f"traits.a / traits.b {op} 0", f"0 {op} traits.a / traits.b", f"traits.a / traits.b * 0 {op} 0"):
            assert agreed(text, records) == [False] * len(records), text
    assert agreed("traits.a * traits.a > 0", [{"traits.a": 1e200}]) == [False]  # 1e400 is no float
    assert agreed("traits.a * traits.a - traits.a * traits.a = 0", [{"traits.a": 1e200}]) == [False]
    assert agreed("traits.a / traits.b = 0.5", [{"traits.a": 1, "traits.b": 2}]) == [True]


def test_numbers_compare_as_doubles_like_literals():
    # the same IEEE doubles in both evaluators: 0.1 + 0.2 is not 0.3
    assert agreed("traits.a + traits.b = 0.3", [{"traits.a": 0.1, "traits.b": 0.2}]) == [False]
    assert agreed("traits.a + 0.2 > 0.3", [{"traits.a": 0.1}]) == [True]
    assert agreed("traits.a * 1 = traits.b", [{"traits.a": 1, "traits.b": 1.0}]) == [True]  # 1 equals 1.0
    assert agreed("traits.a.b * 2 = 4", [{"traits.a": {"b": 2}}, {"traits.a": 2}]) == [True, False]  # sub-paths


def test_percentile_as_an_operand_in_a_segment():
    node = parse("scores.clv >= percentile(scores.clv, 90) * 0.5")
    records = [{"scores.clv": float(v)} for v in range(1, 21)]
    vectorised = compile_segment(node).evaluate_columns(Columns.from_records(records))
    # the 90th percentile of 1..20 is 18.1: half of it is 9.05
    assert np.flatnonzero(vectorised).tolist() == list(range(9, 20))
    held: dict = {}
    segment = compile_segment(node, held)
    assert [s.key for s in segment.percentiles] == ["scores.clv@90"]
    assert not any(segment.evaluate(r) for r in records)  # no value held yet: false
    held["scores.clv@90"] = 18.1
    assert [i for i, r in enumerate(records) if segment.evaluate(r)] == list(range(9, 20))
    with pytest.raises(SegmentSyntaxError, match="before percentile"):
        parse("scores.clv = percentile(scores.clv, 90) * 0.5")


def test_contains_another_field():
    records = [
        {"traits.tags": ["a", "vip"], "traits.favourite_tag": "vip"},
        {"traits.tags": ["a", "b"], "traits.favourite_tag": "vip"},
        {"traits.tags": "very vip", "traits.favourite_tag": "vip"},  # a string contains a substring
        {"traits.tags": [1, 2.0], "traits.favourite_tag": 2},  # numbers equal as numbers
        {"traits.tags": [True], "traits.favourite_tag": 1},  # types do not mix
        {"traits.tags": ["vip"]},  # nothing on the right: false
        {"traits.tags": ["vip"], "traits.favourite_tag": ["vip"]},  # a list is not a scalar
        {"traits.tags": "123", "traits.favourite_tag": 2},  # a number is not in a string
        {"traits.favourite_tag": "vip"},
    ]
    assert agreed("traits.tags contains traits.favourite_tag", records) == [
        True,
        False,
        True,
        True,
        False,
        False,
        False,
        False,
        False,
    ]


def test_in_another_field():
    records = [
        {"traits.country": "DE", "traits.allowed_countries": ["AT", "DE"]},
        {"traits.country": "CH", "traits.allowed_countries": ["AT", "DE"]},
        {"traits.country": 1, "traits.allowed_countries": [1.0, "x"]},
        {"traits.country": True, "traits.allowed_countries": [1]},  # types do not mix
        {"traits.country": "DE", "traits.allowed_countries": "DE"},  # not a list: false
        {"traits.country": "DE"},
        {"traits.country": ["DE"], "traits.allowed_countries": [["DE"], "DE"]},  # a list is not a value
        {"traits.allowed_countries": [None]},  # no value is in nothing
    ]
    assert agreed("traits.country in traits.allowed_countries", records) == [
        True,
        False,
        True,
        False,
        False,
        False,
        False,
        False,
    ]


def test_both_written_forms_round_trip():
    texts = [
        "traits.ltv > 2 * traits.avg_order",
        "computed.orders_30d - computed.orders_90d / 3 < 0",
        "scores.churn_risk * 100 >= 50",
        "(traits.a + 1) * 2 > 3 and (traits.b > 1 or traits.c < 2)",
        "traits.a - (traits.b - 1) > -2.5",
        "traits.a / (traits.b * 2) != 1.5",
        "5 < traits.x",
        "percentile(scores.c, 10) < scores.c / 2",
        "traits.tags contains traits.favourite_tag and traits.country in traits.allowed_countries",
        "traits.`first name` * 2 = traits.a.b",
    ]
    for text in texts:
        node = parse(text)
        assert to_text(node) == text
        assert from_json(to_json(node)) == node
    assert parse("(traits.a + 1) > 2") == parse("traits.a + 1 > 2")
    assert parse("((traits.a)) > 2") == Condition(("traits", "a"), ">", 2)  # no arithmetic: as before
    assert parse("traits.a * 2 > 1") != parse("traits.a * 2.0 > 1")  # numbers kept as written
    assert to_json(parse("traits.ltv > 2 * traits.avg_order")) == {
        "field": "traits.ltv",
        "op": ">",
        "value": {"*": [2, {"field": "traits.avg_order"}]},
    }
    assert to_json(parse("traits.a - 1 < 0")) == {"left": {"-": [{"field": "traits.a"}, 1]}, "op": "<", "right": 0}
    assert from_json({"field": "traits.c", "op": "in", "value": {"field": "traits.l"}}) == Condition(
        ("traits", "c"), "in", FieldRef(("traits", "l"))
    )
    # the "left" form of a plain comparison is that comparison
    assert from_json({"left": {"field": "traits.a"}, "op": ">", "right": 1}) == parse("traits.a > 1")
    assert parse("traits.a > traits.b * 2") == Comparison(
        FieldRef(("traits", "a")), ">", Arithmetic("*", FieldRef(("traits", "b")), 2)
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("traits.a * ", "line 1, column 12: expected a number, a field, percentile(...) or '('"),
        ("2 +", "line 1, column 4: expected a number, a field, percentile(...) or '('"),
        ('traits.a * "x" > 1', "column 12: expected a number, a field, percentile(...) or '(' (arithmetic works on "),
        ('traits.a > "x" + 1', "column 16: expected 'and', 'or' or end of input, found '+'; arithmetic works on"),
        ("traits.a > true * 2", "column 17: expected 'and', 'or' or end of input, found '*'"),
        ("traits.a > traits.b - 30d", "column 23: expected a number, a field"),
        ("traits.a > now - 1d + 1", "column 21: expected 'and', 'or' or end of input"),
        ("1 + 1 > 1", "column 1: expected a field on one side of the comparison"),
        ("2 * traits.a", "column 13: expected a comparison operator (=, !=, <, <=, >, >=) after arithmetic"),
        ("traits.a + 1 in [1]", "column 14: expected a comparison operator"),
        ("traits.a > (traits.b + 1", "column 25: expected an arithmetic operator (+, -, *, /) or ')'"),
        ("traits.a = percentile(scores.x, 9) * 2", "column 10: expected <, <=, > or >= before percentile"),
        ("traits.a * 2 > -", "column 17: expected a number after '-'"),
        ("traits.a in traits", "column 13: expected '[' (a list of values)"),
        ("traits.a contains properties.x", "column 19: expected a value (a string, a number, true or false)"),
    ],
)
def test_bad_arithmetic_is_refused_at_its_position(text, message):
    with pytest.raises(SegmentSyntaxError) as error:
        parse(text, "definition.text")
    assert error.value.field == "definition.text"
    assert message in str(error.value.description), error.value.description


@pytest.mark.parametrize(
    ("tree", "field", "message"),
    [
        ({"field": "traits.a", "op": ">", "value": {"*": [2]}}, "definition.value.*", "a list of two operands"),
        ({"field": "traits.a", "op": ">", "value": {"*": [2, "x"]}}, "definition.value.*[1]", "is not a number"),
        ({"field": "traits.a", "op": ">", "value": {"*": [2, True]}}, "definition.value.*[1]", "is not a number"),
        ({"field": "traits.a", "op": ">", "value": {"^": [2, 2], "*": [1, 1]}}, "definition.value", "one key"),
        ({"left": {"%": [1, 2]}, "op": ">", "right": 1}, "definition.left", "is not a number"),
        ({"left": 1, "op": ">", "right": 2}, "definition", "compare a field"),
        ({"left": {"field": "traits.a"}, "op": "in", "right": 2}, "definition.op", "is not a comparison"),
        ({"left": {"field": "traits.a"}, "op": ">"}, "definition.right", "is required"),
        ({"left": {"field": "nowhere.a"}, "op": ">", "right": 1}, "definition.left.field", "is not a field"),
        (
            {"left": {"*": [{"percentile": "scores.c", "percent": 5}, 2]}, "op": "=", "right": {"field": "scores.c"}},
            "definition.op",
            "cannot compare with a percentile",
        ),
        ({"field": "traits.c", "op": "in", "value": {"path": "traits.l"}}, "definition.value.path", "unknown key"),
        ({"field": "traits.c", "op": "contains", "value": {"field": 3}}, "definition.value.field", "not a field"),
        # starts_with takes another field too (test_starts_with_field.py), but never a list
        ({"field": "traits.c", "op": "starts_with", "value": ["x"]}, "definition.value", "a string"),
    ],
)
def test_bad_arithmetic_in_a_tree_names_its_json_path(tree, field, message):
    with pytest.raises(InvalidArgument) as error:
        from_json(tree)
    assert error.value.field == field
    assert message in error.value.description, error.value.description


def sum_of(terms: int) -> str:
    return " + ".join(["traits.a"] * terms)


def test_arithmetic_counts_towards_the_nesting_limit():
    # a sum of n terms is n - 1 levels (each + is one, left to right)
    assert parse(f"{sum_of(MAX_DEPTH + 1)} > 1")
    with pytest.raises(SegmentSyntaxError) as error:
        parse(f"{sum_of(MAX_DEPTH + 2)} > 1", "definition.text")
    assert f"at most {MAX_DEPTH} levels" in error.value.description
    assert error.value.column == len(sum_of(MAX_DEPTH + 1)) + 2  # the + that is one too many
    # with and/or around it the levels add up
    with pytest.raises(InvalidArgument, match=f"at most {MAX_DEPTH}"):
        parse(f"traits.x > 1 and (traits.y > 1 or {sum_of(MAX_DEPTH)} > 1)")
    assert parse(f"traits.x > 1 and (traits.y > 1 or {sum_of(MAX_DEPTH - 1)} > 1)")
    # and so do parentheses, however many, without reading the text more than once per group
    with pytest.raises(SegmentSyntaxError, match=f"at most {MAX_DEPTH}"):
        parse("(" * 300 + "traits.a + 1" + ")" * 300 + " > 1")
    with pytest.raises(SegmentSyntaxError, match=f"at most {MAX_DEPTH}"):
        parse("traits.a > " + "(" * 300 + "traits.a + 1" + ")" * 300)
    # the tree form: stops at the first object deeper than the limit
    deep: object = {"field": "traits.a"}
    for _ in range(MAX_DEPTH + 1):
        deep = {"+": [deep, 1]}
    with pytest.raises(InvalidArgument) as error:
        from_json({"left": deep, "op": ">", "right": 1})
    assert f"at most {MAX_DEPTH}" in error.value.description
    assert error.value.field == "definition.left" + ".+[0]" * MAX_DEPTH


def test_a_condition_on_one_person_reads_every_field_of_its_arithmetic():
    condition = compile_condition("traits.ltv > 2 * traits.avg_order and scores.a.b - computed.c / 2 != 0")
    assert condition.reads.fields == {"traits.ltv", "traits.avg_order", "scores.a", "computed.c"}
    assert not condition.reads.time
    person = ProfileView.of(traits={"ltv": 300, "avg_order": 100}, scores={"a": {"b": 2}}, computed={"c": 2})
    assert condition.evaluate(person, NOW)
    assert condition.next_change(person, NOW) is None
    assert not condition.evaluate(ProfileView.of(traits={"ltv": 300, "avg_order": 100}), NOW)
    assert compile_condition(condition.to_json()).text == condition.text
    membership = compile_condition("traits.country in traits.allowed and traits.tags contains traits.fav")
    assert membership.reads.fields == {"traits.country", "traits.allowed", "traits.tags", "traits.fav"}
    assert membership.evaluate(
        ProfileView.of(traits={"country": "DE", "allowed": ["DE"], "tags": ["x"], "fav": "x"}), NOW
    )


def test_a_condition_on_one_person_refuses_a_percentile_inside_arithmetic_naming_it():
    for source in (
        "traits.x > 1 and scores.clv >= percentile(scores.clv, 90) / 2",
        "percentile(scores.clv, 90) - scores.clv < 1",
        {"left": {"*": [2, {"percentile": "scores.clv", "percent": 90}]}, "op": "<", "right": {"field": "scores.clv"}},
    ):
        with pytest.raises(InvalidArgument) as error:
            compile_condition(source, "journeys[0].entry")
        assert error.value.field == "journeys[0].entry"
        assert "percentile(scores.clv, 90)" in error.value.description
        assert "in_segment" in error.value.description
