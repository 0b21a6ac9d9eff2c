"""The one-person API a second user (orchestration) relies on: compile, evaluate, reads, next_change."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cdp_lang import (
    CompiledCondition,
    Event,
    InvalidArgument,
    ProfileView,
    SegmentSyntaxError,
    compile_condition,
)

NOW = 1_790_000_000.0  # 2026-09-21
DAY = 86_400.0


def order(at: float, total: object = 60, **context: object) -> Event:
    return Event("track", "Order Completed", at, {"total": total}, context)


def test_a_condition_reads_every_part_of_a_profile():
    condition = compile_condition(
        'traits.plan = "pro" and computed.orders_90d >= 3 and consent.purpose:email = true'
        ' and scores.churn_risk < 0.8 and not in_segment("support_open")'
    )
    person = ProfileView.of(
        traits={"plan": "pro"},
        computed={"orders_90d": 3.0},
        consent={"purpose:email": True},
        scores={"churn_risk": 0.2},
        segments=["vip"],
    )
    assert condition.evaluate(person, NOW)
    assert not condition.evaluate(ProfileView.of(traits={"plan": "pro"}), NOW)  # missing fields fail
    assert not condition.evaluate(
        ProfileView(person.fields, segments={"support_open"}), NOW
    )  # a segment it must not be in
    withdrawn = dict(person.fields, **{"consent.purpose:email": False})
    assert not condition.evaluate(ProfileView(withdrawn, {"vip"}), NOW)


def test_text_and_json_compile_to_the_same_condition():
    text = compile_condition('traits.plan in ["pro", "team"] and traits.created_at < now - 30d')
    tree = compile_condition(text.to_json())
    assert isinstance(tree, CompiledCondition)
    assert tree.node == text.node and tree.text == text.text
    assert compile_condition(text.text).node == text.node  # the canonical text reads back
    old = ProfileView.of(traits={"plan": "team", "created_at": NOW - 31 * DAY})
    new = ProfileView.of(traits={"plan": "team", "created_at": NOW - 29 * DAY})
    assert text.evaluate(old, NOW) and tree.evaluate(old, NOW)
    assert not text.evaluate(new, NOW) and not tree.evaluate(new, NOW)


def test_errors_name_the_field_and_the_position():
    with pytest.raises(SegmentSyntaxError) as text_error:
        compile_condition('traits.plan = "pro" and\n  traits.age >> 3', field="steps[2].condition")
    assert text_error.value.field == "steps[2].condition"
    assert (text_error.value.line, text_error.value.column) == (2, 15)
    assert "line 2, column 15" in str(text_error.value)

    with pytest.raises(InvalidArgument) as tree_error:
        compile_condition({"and": [{"field": "traits.plan", "op": "=", "value": "pro"}, {"field": "traits.age"}]})
    assert tree_error.value.field == "condition.and[1].op"

    with pytest.raises(InvalidArgument) as kind_error:
        compile_condition(42, field="exit.condition")  # type: ignore[arg-type]
    assert kind_error.value.field == "exit.condition"


def test_a_caller_may_offer_fields_under_roots_of_its_own():
    # A journey reads the properties its instance started with as entry.<name>, beside the profile's fields.
    roots = ("traits", "computed", "consent", "scores", "entry")
    text = compile_condition('entry.total > 100 and entry.cart.currency = "EUR" and traits.plan = "pro"', roots=roots)
    tree = compile_condition(text.to_json(), roots=roots)
    assert tree.node == text.node
    assert text.reads.fields == {"entry.total", "entry.cart", "traits.plan"}
    person = {"traits.plan": "pro", "entry.total": 120, "entry.cart": {"currency": "EUR"}}
    assert text.evaluate(ProfileView(person), NOW) and tree.evaluate(ProfileView(person), NOW)
    assert not text.evaluate(ProfileView({**person, "entry.total": 80}), NOW)
    # Without them the profile's roots are the only ones, and the error says which those are.
    with pytest.raises(SegmentSyntaxError) as text_error:
        compile_condition("entry.total > 100")
    assert "traits, computed, consent or scores" in str(text_error.value)
    with pytest.raises(InvalidArgument) as tree_error:
        compile_condition({"field": "entry.total", "op": ">", "value": 100})
    assert tree_error.value.field == "condition.field"


def test_reads_say_what_the_answer_depends_on():
    condition = compile_condition(
        'traits.plan = "pro" and in_segment("vip") and performed(event = "Support Ticket Opened", within 1d)'
    )
    reads = condition.reads
    [trait] = condition.computed_traits
    assert reads.fields == {"traits.plan", f"computed.{trait['name']}"}
    assert reads.segments == {"vip"}
    assert [predicate.names for predicate in reads.events] == [("Support Ticket Opened",)]
    assert reads.time  # the ticket leaves the 1-day window as time passes
    assert reads.matches(Event("track", "Support Ticket Opened", NOW))
    assert not reads.matches(Event("track", "Order Completed", NOW))
    assert not reads.matches(Event("page", "Support Ticket Opened", NOW))  # track events unless it says so

    static = compile_condition('traits.plan = "pro"').reads
    assert static.fields == {"traits.plan"} and not static.segments and not static.events and not static.time


def test_event_conditions_from_the_views_events():
    condition = compile_condition(
        'count(event = "Order Completed" and properties.total > 50 and context.locale = "de-DE", within 7d) >= 2'
    )
    in_window = [order(NOW - 6 * DAY, locale="de-DE"), order(NOW - DAY, locale="de-DE")]
    assert condition.evaluate(ProfileView(events=in_window), NOW)
    # Each one that fails a part of the predicate does not count.
    for other in (
        order(NOW - 8 * DAY, locale="de-DE"),  # outside the window
        order(NOW - DAY, total=40, locale="de-DE"),  # where: total
        order(NOW - DAY, locale="en-US"),  # where: context
        order(NOW - DAY, total="60", locale="de-DE"),  # a string is not a number
        Event("track", "Order Refunded", NOW - DAY, {"total": 60}, {"locale": "de-DE"}),  # name
        Event("page", "Order Completed", NOW - DAY, {"total": 60}, {"locale": "de-DE"}),  # type
    ):
        assert not condition.evaluate(ProfileView(events=[in_window[0], other]), NOW), other
    # The window is `at + within > now`: an event exactly 7 days old has left it.
    assert not condition.evaluate(ProfileView(events=[in_window[1], order(NOW - 7 * DAY, locale="de-DE")]), NOW)


def test_value_aggregates_skip_what_is_not_a_number():
    events = [order(NOW - DAY, 10), order(NOW - DAY, 30), order(NOW - DAY, True), order(NOW - DAY, None)]
    view = ProfileView(events=events)
    for text, expected in (
        ('sum(properties.total, "Order Completed") = 40', True),
        ('avg(properties.total, "Order Completed") = 20', True),
        ('min(properties.total, "Order Completed") = 10', True),
        ('max(properties.total, "Order Completed") = 30', True),
        ('count("Order Completed") = 4', True),
    ):
        assert compile_condition(text).evaluate(view, NOW) is expected, text
    # Nothing matched: count and sum are 0, avg, min and max have no value (every comparison fails).
    empty = ProfileView(events=[])
    assert compile_condition('count("Order Completed") < 1').evaluate(empty, NOW)
    assert compile_condition('sum(properties.total, "Order Completed") = 0').evaluate(empty, NOW)
    assert not compile_condition('avg(properties.total, "Order Completed") < 1000').evaluate(empty, NOW)
    assert compile_condition('not avg(properties.total, "Order Completed") < 1000').evaluate(empty, NOW)


def test_without_events_the_computed_trait_answers():
    condition = compile_condition('count("Order Completed", within 30d) >= 3')
    [trait] = condition.computed_traits
    assert trait["op"] == "count" and trait["event_names"] == ["Order Completed"] and trait["window"] == "30d"
    key = f"computed.{trait['name']}"
    assert condition.evaluate(ProfileView({key: 3.0}), NOW)
    assert not condition.evaluate(ProfileView({key: 2.0}), NOW)
    # Given events, they answer, whatever the field holds.
    assert not condition.evaluate(ProfileView({key: 3.0}, events=[order(NOW - DAY)]), NOW)


def test_identify_events_are_read_from_their_traits():
    event = Event.from_json(
        {"type": "identify", "traits": {"plan": "pro"}, "timestamp": "2026-09-20T00:00:00Z"}, field="event"
    )
    assert event.type == "identify" and event.payload == {"plan": "pro"}
    condition = compile_condition('performed(type = "identify" and properties.plan = "pro")')
    assert condition.evaluate(ProfileView(events=[event]), NOW)


def test_event_from_json_reads_segment_events_and_names_a_bad_key():
    event = Event.from_json(
        {
            "type": "track",
            "event": "Order Completed",
            "properties": {"total": 60},
            "context": {"locale": "de-DE"},
            "timestamp": 1_789_999_000_000,  # milliseconds
        }
    )
    assert event == Event("track", "Order Completed", 1_789_999_000.0, {"total": 60}, {"locale": "de-DE"})
    assert Event.from_json({"type": "page", "name": "Pricing", "timestamp": NOW}).name == "Pricing"
    with pytest.raises(InvalidArgument) as error:
        Event.from_json({"event": "Order Completed"}, field="events[3]")
    assert error.value.field == "events[3].timestamp"


def test_next_change_is_when_time_alone_changes_the_answer():
    trial = compile_condition("traits.trial_ends_at < now + 3d")
    person = ProfileView.of(traits={"trial_ends_at": NOW + 5 * DAY})
    assert not trial.evaluate(person, NOW)
    flips = trial.next_change(person, NOW)
    assert flips is not None and trial.evaluate(person, flips) and not trial.evaluate(person, flips - 1)

    ticket = compile_condition('performed("Support Ticket Opened", within 1d)')
    opened = ProfileView(events=[Event("track", "Support Ticket Opened", NOW - 3600)])
    assert ticket.evaluate(opened, NOW)
    leaves = ticket.next_change(opened, NOW)
    assert leaves == NOW - 3600 + DAY and not ticket.evaluate(opened, leaves)

    assert compile_condition('traits.plan = "pro"').next_change(person, NOW) is None


def test_the_library_stands_without_segmentation():
    """Orchestration must not import the segmentation service: neither may the language."""
    script = (
        "import sys, pkgutil, importlib, cdp_lang\n"
        "for module in pkgutil.iter_modules(cdp_lang.__path__):\n"
        "    importlib.import_module('cdp_lang.' + module.name)\n"
        "print(sorted(name for name in sys.modules if name.startswith('cdp_segmentation')))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
