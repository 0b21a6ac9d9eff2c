"""What a segment means for one person, checked with both evaluators (per profile and vectorised)."""

from __future__ import annotations

import numpy as np
import pytest

from cdp_segmentation.domain import Columns, compile_segment, parse

NOW = 1_790_000_000.0  # 2026-09-21
DAY = 86_400.0
JAN_1 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def both(text, record, members=(), now=NOW):
    """The answer for `record`, after checking both evaluators give it."""
    segment = compile_segment(parse(text))
    one = segment.evaluate(record, members, now)
    # A second, empty row: the vectorised answer must come from the record's own row.
    columns = Columns.from_records([record, {}])
    many = segment.evaluate_columns(columns, {m: np.array([True, False]) for m in members}, now)
    assert many.dtype == bool and many.shape == (2,)
    assert bool(many[0]) == one, f"{text} on {record}: per profile {one}, vectorised {bool(many[0])}"
    return one


MISSING = object()


def x(value):
    return {} if value is MISSING else {"traits.x": value}


@pytest.mark.parametrize(
    ("value", "text", "expected"),
    [
        # Missing, null and non-finite values fail every comparison, `!=` included; `not` is plain negation.
        (MISSING, 'traits.x != "pro"', False),
        (None, 'traits.x != "pro"', False),
        (float("nan"), "traits.x != 1", False),
        (float("inf"), "traits.x > 1", False),
        (10**400, "traits.x exists", False),
        (MISSING, 'not traits.x = "pro"', True),
        (None, "traits.x exists", False),
        ("", "traits.x exists", True),
        ([], "traits.x exists", True),
        # `!=` holds for a present value that is not equal, whatever its type.
        (5, 'traits.x != "pro"', True),
        (True, "traits.x != 1", True),
        ([1], "traits.x != 1", True),
        ({"a": 1}, 'traits.x != "a"', True),
        ("pro", 'traits.x != "pro"', False),
        (1.0, "traits.x != 1", False),
        # Numbers compare numerically, bools are not numbers, strings compare only with strings.
        (1, "traits.x = 1.0", True),
        (2**53 + 1, "traits.x = 9007199254740992", True),  # doubles: beyond 2**53 ints round
        (True, "traits.x = 1", False),
        (1, "traits.x = true", False),
        ("1", "traits.x = 1", False),
        (1, 'traits.x = "1"', False),
        (True, "traits.x = true", True),
        (False, "traits.x != true", True),
        (True, "traits.x > false", False),  # bools have no order
        ("b", 'traits.x > "a"', True),
        ("B", 'traits.x > "a"', False),  # by code point
        ("é", 'traits.x > "z"', True),
        (5, 'traits.x > "a"', False),
        ("5", "traits.x > 1", False),
        # in, contains, starts_with.
        ("AT", 'traits.x in ["DE", "AT"]', True),
        (2.0, 'traits.x in ["2", 2]', True),
        (True, "traits.x in [1, 2]", False),
        (1, "traits.x in [true]", False),
        ("info@example.com", 'traits.x contains "@example"', True),
        (["a", 1], "traits.x contains 1.0", True),
        (["a", 1], "traits.x contains true", False),
        ([["a"]], 'traits.x contains "a"', False),
        ("123", "traits.x contains 2", False),
        ("Dr Who", 'traits.x starts_with "Dr"', True),
        (["Dr"], 'traits.x starts_with "Dr"', False),
    ],
)
def test_comparison_rules(value, text, expected):
    assert both(text, x(value)) is expected


@pytest.mark.parametrize(
    ("value", "text", "expected"),
    [
        # Numbers are epoch seconds, or milliseconds above 1e11; ISO-8601 strings, no zone meaning UTC.
        (JAN_1, 'traits.x = date("2026-01-01T00:00:00Z")', True),
        (JAN_1 * 1000, 'traits.x = date("2026-01-01")', True),
        (int(JAN_1), 'traits.x = date("2026-01-01T01:00:00+01:00")', True),
        ("2026-01-01T00:00:00Z", 'traits.x = date("2026-01-01")', True),
        ("2026-01-01T00:00:00", 'traits.x = date("2026-01-01T00:00:00Z")', True),
        ("2026-01-01", 'traits.x < date("2026-01-01T00:00:01Z")', True),
        ("2026-01-01T02:00:00+02:00", 'traits.x = date("2026-01-01")', True),
        ("yesterday", 'traits.x < date("2030-01-01")', False),
        ("yesterday", 'traits.x != date("2030-01-01")', False),  # no time: even != is false
        (True, 'traits.x < date("2030-01-01")', False),
        ([JAN_1], 'traits.x < date("2030-01-01")', False),
        # Against now.
        (NOW - 31 * DAY, "traits.x < now - 30d", True),
        (NOW - 29 * DAY, "traits.x < now - 30d", False),
        ((NOW - 31 * DAY) * 1000, "traits.x < now - 30d", True),
        (NOW + 2 * DAY, "traits.x <= now + 3d", True),
        (NOW + 4 * DAY, "traits.x <= now + 3d", False),
        (NOW, "traits.x >= now", True),
        (MISSING, "not traits.x < now", True),
    ],
)
def test_time_rules(value, text, expected):
    assert both(text, x(value)) is expected


def test_sub_paths_step_into_objects_only():
    record = {"traits.address": {"city": "Berlin", "geo": {"lat": 52.5}}, "traits.tags": ["a"]}
    assert both('traits.address.city = "Berlin"', record)
    assert both("traits.address.geo.lat > 50", record)
    assert not both("traits.address.city.name exists", record)
    assert not both("traits.tags.a exists", record)
    assert not both("traits.missing.a exists", record)
    assert both("traits.address exists", record)


def test_membership_of_other_segments():
    assert both('in_segment("vip")', {}, members={"vip"})
    assert not both('in_segment("vip")', {}, members={"other"})
    assert both('not in_segment("churned") and in_segment("vip")', {}, members=("vip",))
    segment = compile_segment(parse('in_segment("vip")'))
    assert not segment.evaluate_columns(Columns.from_records([{}, {}])).any()  # no array: nobody is a member


def test_event_aggregates_read_their_computed_trait():
    orders = 'count("Order Completed", within 30d) >= 3'
    revenue = 'sum(properties.total, "Order Completed") > 500'
    segment = compile_segment(parse(f"{orders} and {revenue}"))
    count_key, sum_key = (f"computed.{d['name']}" for d in segment.computed_traits)
    assert both(orders, {count_key: 3})
    assert not both(orders, {count_key: "3"})
    assert both('count("Order Completed", within 30d) = 0', {count_key: None})
    assert both(revenue, {sum_key: 500.5})
    assert both(f"{orders} and {revenue}", {count_key: 4, sum_key: 501})


def test_columns_from_arrays_reads_typed_arrays():
    columns = Columns.from_arrays(
        4,
        {
            "traits.plan": np.array(["pro", "free", "pro", ""], dtype=object),
            "traits.email": np.array(["a@x.com", None, "b@y.com", None], dtype=object),
            "scores.clv": np.array([10.0, np.nan, 150.0, np.inf]),
            "consent.email": np.array([True, False, True, False]),
            "traits.age": np.array([30, 40, 50, 60]),
            "traits.country": np.array(["DE", "AT", "CH", "DE"]),
            "traits.mixed": [1, "1", True, None],
        },
    )
    assert columns.size == 4

    def rows(text, now=NOW):
        return compile_segment(parse(text)).evaluate_columns(columns, now=now).tolist()

    assert rows('traits.plan = "pro" and scores.clv >= 100') == [False, False, True, False]
    assert rows("not traits.email exists") == [False, True, False, True]
    assert rows("scores.clv != 10") == [False, False, True, False]  # NaN and inf are missing
    assert rows("consent.email = true and traits.age < 45") == [True, False, False, False]
    assert rows('traits.country in ["DE", "CH"]') == [True, False, True, True]
    assert rows("traits.mixed = 1") == [True, False, False, False]
    assert rows("traits.plan.x exists or traits.nothing exists") == [False, False, False, False]
