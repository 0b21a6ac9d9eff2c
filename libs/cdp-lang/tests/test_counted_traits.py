"""A named computed trait of kind count or sum (`computed.orders`) that a person lacks reads as 0, as the
event-condition form (`count(event = "Order Completed") < 1`) always read: someone who never ordered has 0
orders, not no value. The compiler cannot know a trait's kind from its name, so its caller says which
fields are counted (`counted=`, field keys such as "computed.orders"); other kinds (last, min, ...) and
fields not named there stay missing. Both evaluators agree, and `compile_condition` takes the same."""

from __future__ import annotations

import pytest

from cdp_lang import ProfileView, compile_condition, parse
from cdp_lang.columns import Columns
from cdp_lang.compiler import compile_segment

NOW = 1_790_000_000.0
COUNTED = frozenset({"computed.orders", "computed.spent"})
NEVER = {"traits.plan": "pro"}  # never ordered: no computed.orders at all
ONCE = {"computed.orders": 1.0, "computed.spent": 40.0}
NULL = {"computed.orders": None}


def answers(text: str, records: list[dict], counted=COUNTED) -> list[bool]:
    """Each record's answer, the per-profile and the vectorised evaluator checked to agree."""
    segment = compile_segment(parse(text), counted=counted)
    per_profile = [segment.evaluate(record, now=NOW) for record in records]
    assert segment.evaluate_columns(Columns.from_records(records), now=NOW).tolist() == per_profile, text
    return per_profile


def test_a_counted_trait_a_person_lacks_reads_as_zero():
    records = [NEVER, ONCE, NULL]
    assert answers("computed.orders < 1", records) == [True, False, True]
    assert answers("computed.orders = 0", records) == [True, False, True]
    assert answers("computed.orders != 1", records) == [True, False, True]
    assert answers("computed.orders >= 1", records) == [False, True, False]
    assert answers("not computed.orders >= 1", records) == [True, False, True]
    assert answers("computed.orders in [0, 2]", records) == [True, False, True]
    assert answers("computed.spent <= 10", records) == [True, False, True]
    # 0 is a value: it exists
    assert answers("computed.orders exists", records) == [True, True, True]
    # arithmetic reads 0 too: 0 + 0 / 4 = 0, and 1 + 40 / 4 = 11
    assert answers("computed.orders + computed.spent / 4 < 1", records) == [True, False, True]


def test_other_kinds_and_fields_not_named_counted_stay_missing():
    records = [NEVER, {"computed.last_order_total": 5.0}]
    assert answers("computed.last_order_total < 10", records) == [False, True]
    assert answers("computed.orders < 1", [NEVER], counted=frozenset()) == [False]  # as before
    assert answers("traits.orders < 1", [NEVER]) == [False]  # only computed fields the caller names


def test_the_segment_records_which_of_its_fields_it_read_as_counted():
    segment = compile_segment(parse("computed.orders < 1 and computed.last < 3"), counted=COUNTED)
    assert segment.counted == frozenset({"computed.orders"})
    assert compile_segment(parse("computed.orders < 1")).counted == frozenset()


@pytest.mark.parametrize("text", ["computed.orders < 1", "computed.orders = 0 and traits.plan exists"])
def test_a_condition_on_one_person_reads_it_as_zero_too(text):
    condition = compile_condition(text, counted=COUNTED)
    assert condition.evaluate(ProfileView.of(traits={"plan": "pro"}), NOW)
    assert not condition.evaluate(ProfileView.of(computed={"orders": 2.0}), NOW)
    assert not compile_condition(text).evaluate(ProfileView.of(traits={"plan": "pro"}), NOW)  # not named: missing
