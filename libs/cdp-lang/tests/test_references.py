"""Comparisons whose other side is not a literal: another field of the person, or a percentile of the
population (segmentation's; a condition on one person refuses it)."""

from __future__ import annotations

import numpy as np
import pytest

from cdp_lang import InvalidArgument, ProfileView, SegmentSyntaxError, compile_condition, from_json, parse, to_json
from cdp_lang.columns import Columns
from cdp_lang.compiler import compile_segment
from cdp_lang.nodes import Condition, FieldRef, Percentile
from cdp_lang.text import to_text

NOW = 1_790_000_000.0
DAY = 86_400.0


def test_a_field_compared_with_another_field_reads_both_and_never_moves_with_time():
    condition = compile_condition("traits.last_order_total > traits.avg_order_total")
    assert condition.reads.fields == {"traits.last_order_total", "traits.avg_order_total"}
    assert not condition.reads.time

    def view(last, avg):
        return ProfileView.of(traits={"last_order_total": last, "avg_order_total": avg})

    assert condition.evaluate(view(120, 80.5), NOW)
    assert not condition.evaluate(view(80, 80.0), NOW)
    assert not condition.evaluate(view(120, None), NOW)  # no value on either side: false
    assert not condition.evaluate(view(None, 80), NOW)
    assert not condition.evaluate(view("120", 80), NOW)  # a string is not a number


def test_two_times_compare_as_what_they_hold_and_time_passing_changes_nothing():
    condition = compile_condition("traits.last_seen_at > traits.signed_up_at")
    person = ProfileView.of(traits={"last_seen_at": NOW - DAY, "signed_up_at": NOW - 30 * DAY})
    assert condition.evaluate(person, NOW)
    assert condition.next_change(person, NOW) is None
    assert condition.evaluate(person, NOW + 365 * DAY)
    iso = ProfileView.of(traits={"last_seen_at": "2026-03-01T00:00:00Z", "signed_up_at": "2026-01-01T00:00:00Z"})
    assert condition.evaluate(iso, NOW)


def test_not_equal_needs_a_value_on_the_other_side():
    condition = compile_condition("traits.plan != traits.previous_plan")
    assert condition.evaluate(ProfileView.of(traits={"plan": "pro", "previous_plan": "free"}), NOW)
    assert condition.evaluate(ProfileView.of(traits={"plan": 1, "previous_plan": "1"}), NOW)  # types differ
    assert not condition.evaluate(ProfileView.of(traits={"plan": "pro", "previous_plan": "pro"}), NOW)
    assert not condition.evaluate(ProfileView.of(traits={"plan": "pro"}), NOW)


def test_references_are_written_back_in_both_forms():
    text = "traits.a.b <= scores.c and scores.clv >= percentile(scores.clv, 90) and traits.x < percentile(traits.y.z, 12.5)"
    node = parse(text)
    assert to_text(node) == text
    assert from_json(to_json(node)) == node
    assert to_json(parse("scores.clv >= percentile(scores.clv, 90.0)")) == {
        "field": "scores.clv",
        "op": ">=",
        "value": {"percentile": "scores.clv", "percent": 90},
    }
    assert from_json({"field": "traits.a", "op": "=", "value": {"field": "traits.b"}}) == Condition(
        ("traits", "a"), "=", FieldRef(("traits", "b"))
    )
    assert parse("scores.clv >= percentile(scores.clv, 90)") == parse("scores.clv >= percentile(scores.clv, 90.0)")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("scores.c = percentile(scores.c, 90)", "line 1, column 10: expected <, <=, > or >= before percentile"),
        ("scores.c > percentile(scores.c, 101)", "expected a percent from 0 to 100"),
        ("scores.c > percentile(scores.c)", "expected ',' and the percent (0 to 100), found ')'"),
        ("scores.c > percentile(clv, 90)", "expected the field to take the percentile of"),
        ("traits.a > properties.total", "expected a value"),
    ],
)
def test_bad_references_are_refused_at_their_position(text, message):
    with pytest.raises(SegmentSyntaxError) as error:
        parse(text, "definition.text")
    assert error.value.field == "definition.text"
    assert message in error.value.description


def test_bad_references_in_a_tree_name_their_json_path():
    with pytest.raises(InvalidArgument) as error:
        from_json({"field": "scores.c", "op": "!=", "value": {"percentile": "scores.c", "percent": 50}})
    assert error.value.field == "definition.op"
    with pytest.raises(InvalidArgument) as error:
        from_json({"field": "scores.c", "op": ">", "value": {"percentile": "scores.c", "percent": -1}})
    assert error.value.field == "definition.value.percent"
    with pytest.raises(InvalidArgument) as error:
        from_json({"field": "scores.c", "op": ">", "value": {"field": "nowhere.c"}})
    assert error.value.field == "definition.value.field"


def test_a_condition_on_one_person_refuses_a_percentile_naming_it():
    with pytest.raises(InvalidArgument) as error:
        compile_condition('traits.plan = "pro" and scores.clv >= percentile(scores.clv, 90)', "journeys[0].entry")
    assert error.value.field == "journeys[0].entry"
    assert "percentile(scores.clv, 90)" in error.value.description
    assert "in_segment" in error.value.description
    with pytest.raises(InvalidArgument):
        compile_condition({"field": "scores.clv", "op": ">", "value": {"percentile": "scores.clv", "percent": 50}})


def test_the_top_decile_of_twenty():
    """Linear interpolation between the closest ranks: >= the 90th percentile of twenty distinct values is
    the two highest, however the population is evaluated."""
    node = parse("scores.clv >= percentile(scores.clv, 90)")
    records = [{"scores.clv": float(v)} for v in range(100, 120)] + [{"scores.clv": "n/a"}, {}]
    vectorised = compile_segment(node).evaluate_columns(Columns.from_records(records))
    assert np.flatnonzero(vectorised).tolist() == [18, 19]
    # The per-profile evaluator reads the value its owner keeps for it; without one, nobody is in.
    assert not any(compile_segment(node).evaluate(r) for r in records)
    held = {}
    segment = compile_segment(node, held)
    [spec] = segment.percentiles
    held[spec.key] = 100 + 0.9 * 19
    assert [i for i, r in enumerate(records) if segment.evaluate(r)] == [18, 19]
    # A chunk of a larger population is told the population's value.
    chunk = Columns.from_records(records[:10], percentiles={spec.key: 105.0})
    assert np.flatnonzero(segment.evaluate_columns(chunk)).tolist() == [5, 6, 7, 8, 9]
    assert isinstance(segment.node, Condition) and isinstance(segment.node.value, Percentile)
