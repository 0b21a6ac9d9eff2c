"""Conditions through the language: profile conditions and event filters."""

from __future__ import annotations

import pytest

from cdp_kit.errors import InvalidArgument
from cdp_orchestration.domain.conditions import event_filter, profile_condition
from cdp_orchestration.domain.view import Event, PersonView


def event(name: str = "Order Completed", type: str = "track", **properties: object) -> Event:
    return Event("e1", name, 0.0, type=type, properties=properties, context={"locale": "de-DE"})


def test_event_filters_in_text_and_json_mean_the_same() -> None:
    text = event_filter("Order Completed", 'properties.total >= 50 and properties.currency in ["EUR", "USD"]', "f")
    tree = event_filter(
        "Order Completed",
        [
            {"path": "properties.total", "op": ">=", "value": 50},
            {"path": "properties.currency", "op": "in", "value": ["EUR", "USD"]},
        ],
        "f",
    )
    for f in (text, tree):
        assert f.matches(event(total=50, currency="EUR"))
        assert f.matches(event(total=50.5, currency="USD"))
        assert not f.matches(event(total=49, currency="EUR"))
        assert not f.matches(event(total="50", currency="EUR"))  # a string is not a number
        assert not f.matches(event(currency="EUR"))  # missing never matches
        assert not f.matches(event("Order Refunded", total=60, currency="EUR"))


def test_event_filter_operators_follow_the_languages_value_rules() -> None:
    assert event_filter(None, "properties.sku exists", "f").matches(event("Anything", sku="x"))
    assert event_filter(None, 'context.locale starts_with "de"', "f").matches(event())
    assert event_filter(None, 'properties.tags contains "sale"', "f").matches(event(tags=["new", "sale"]))
    assert event_filter(None, "properties.gift = true", "f").matches(event(gift=True))
    assert not event_filter(None, "properties.gift = true", "f").matches(event(gift=1))
    assert event_filter(None, 'properties.plan != "free"', "f").matches(event(plan="pro"))
    assert not event_filter(None, 'properties.plan != "free"', "f").matches(event())
    assert event_filter(["A", "B"], None, "f").matches(event("B"))
    assert not event_filter("A", None, "f").matches(event("A", type="page"))
    assert event_filter("A", None, "f", event_type="any").matches(event("A", type="page"))


@pytest.mark.parametrize(
    ("names", "where", "field", "message"),
    [
        ("X", "properties.total >> 50", "f.where", "line 1, column 19"),
        ("X", "traits.plan = 1", "f.where", ""),
        ("", None, "f.event", ""),
        ("X", 5, "f.where", ""),
        ("X", [{"path": "total", "op": "=", "value": 1}], "f.where[0].path", ""),
    ],
)
def test_bad_event_filters_name_the_field(names: object, where: object, field: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        event_filter(names, where, "f")
    assert caught.value.field == field and message in caught.value.message


def test_profile_conditions_evaluate_on_the_view_with_segments() -> None:
    condition = profile_condition('scores.churn_risk > 0.8 and (in_segment("vip") or traits.plan = "pro")', "c")
    assert condition.fields == {"scores.churn_risk", "traits.plan"} and condition.segments == {"vip"}
    assert condition.holds(PersonView("p", {"scores.churn_risk": 0.9}, frozenset({"vip"})), 0.0)
    assert condition.holds(PersonView("p", {"scores.churn_risk": 0.9, "traits.plan": "pro"}), 0.0)
    assert not condition.holds(PersonView("p", {"scores.churn_risk": 0.5}, frozenset({"vip"})), 0.0)
    tree = profile_condition({"field": "consent.purpose:Marketing", "op": "=", "value": True}, "c")
    assert tree.holds(PersonView("p", {"consent.purpose:Marketing": True}), 0.0)
    with pytest.raises(InvalidArgument) as caught:
        profile_condition({"field": "traits.x", "op": "~"}, "c")
    assert caught.value.field == "c.op"


def test_a_profile_condition_reads_entry_fields_only_where_an_instance_can_supply_them() -> None:
    condition = profile_condition('entry.total > 100 and traits.plan = "pro"', "c", entry=True)
    assert condition.entry_fields == {"entry.total"} and condition.fields == {"traits.plan"}
    view = PersonView("p1", {"traits.plan": "pro"})
    assert condition.holds(view, 0.0, {"total": 120})
    assert not condition.holds(view, 0.0, {"total": 80})
    assert not condition.holds(view, 0.0)  # no entry: the field is missing, which never compares
    # Elsewhere (an arbiter rule) there is no entry: the language names the field's roots.
    with pytest.raises(InvalidArgument) as caught:
        profile_condition("entry.total > 100", "rules.suppressions[0].condition")
    assert caught.value.field == "rules.suppressions[0].condition"


def test_a_profile_condition_takes_arithmetic_and_field_membership_on_entry_and_profile_fields() -> None:
    condition = profile_condition(
        "entry.total > 2 * traits.avg_order and scores.churn_risk * 100 >= 50 and entry.sku in traits.wishlist",
        "c",
        entry=True,
    )
    assert condition.entry_fields == {"entry.total", "entry.sku"}
    assert condition.fields == {"traits.avg_order", "scores.churn_risk", "traits.wishlist"}
    view = PersonView("p1", {"traits.avg_order": 40, "scores.churn_risk": 0.5, "traits.wishlist": ["a", "b"]})
    assert condition.holds(view, 0.0, {"total": 81, "sku": "b"})
    assert not condition.holds(view, 0.0, {"total": 80, "sku": "b"})  # 80 > 80 no
    assert not condition.holds(view, 0.0, {"total": 81, "sku": "c"})
    assert not condition.holds(view, 0.0, {"total": "81", "sku": "b"})  # a string has no arithmetic: false
    assert not condition.holds(view, 0.0)
    assert condition.next_change(view, 0.0, {"total": 81, "sku": "b"}) is None
    tree = profile_condition(
        {"left": {"/": [{"field": "traits.a"}, {"field": "traits.b"}]}, "op": ">", "right": 1}, "c"
    )
    assert tree.holds(PersonView("p", {"traits.a": 3, "traits.b": 2}), 0.0)
    assert not tree.holds(PersonView("p", {"traits.a": 3, "traits.b": 0}), 0.0)  # division by zero: false
    favourite = profile_condition("traits.tags contains traits.favourite", "c")
    assert favourite.holds(PersonView("p", {"traits.tags": ["x", "vip"], "traits.favourite": "vip"}), 0.0)
    assert not favourite.holds(PersonView("p", {"traits.tags": ["x", "vip"]}), 0.0)


@pytest.mark.parametrize(
    ("source", "field", "message"),
    [
        ("traits.a * ", "c", "line 1, column 12: expected a number, a field"),
        ('traits.a + "x" > 1', "c", "line 1, column 12: expected a number, a field"),
        ("scores.clv >= percentile(scores.clv, 90) / 2", "c", "percentile(scores.clv, 90) is a percentile"),
        ({"field": "traits.a", "op": ">", "value": {"*": [2, "x"]}}, "c.value.*[1]", "is not a number"),
    ],
)
def test_bad_arithmetic_in_a_profile_condition_names_the_field(source: object, field: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        profile_condition(source, "c")
    assert caught.value.field == field and message in caught.value.message, caught.value.message


def test_an_event_filter_takes_arithmetic_on_the_events_own_fields() -> None:
    text = event_filter("Order Completed", "properties.total > properties.shipping * 2", "f")
    tree = event_filter(
        "Order Completed",
        [
            {
                "path": "properties.total",
                "op": ">",
                "value": {"*": [{"path": "properties.shipping"}, 2]},
            }
        ],
        "f",
    )
    for f in (text, tree):
        assert f.matches(event(total=21, shipping=10))
        assert not f.matches(event(total=20, shipping=10))
        assert not f.matches(event(total=21))  # no number: false
        assert not f.matches(event(total=21, shipping="10"))
    ratio = event_filter(None, "properties.total / properties.items != 10", "f")
    assert ratio.matches(event(total=30, items=2)) and not ratio.matches(event(total=30, items=0))


def test_an_event_filter_refuses_a_profile_field_in_its_arithmetic_naming_its_where() -> None:
    with pytest.raises(InvalidArgument) as caught:
        event_filter("X", "properties.total * traits.x > 100", "f")
    assert caught.value.field == "f.where"
    assert "line 1, column 20" in caught.value.message, caught.value.message
    assert "an event condition reads the event's own fields" in caught.value.message
