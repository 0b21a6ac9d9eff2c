"""Traits: provenance, full history, recency over arrival order, removal, "what did we know on date D"."""

from __future__ import annotations

import pytest

from cdp_kit.errors import InvalidArgument
from cdp_profile.domain import ComputedTraits, Profile, TraitVersion

NO_DEFS = ComputedTraits()
NOW = 1000.0


def identify(ev, event_id, at, source="web", **traits):
    return ev(event_id, "identify", at=at, traits=traits, source=source)


def test_identify_sets_traits_with_provenance_and_nested_objects_stay_whole(ev):
    profile = Profile.new("p")
    change = profile.apply(
        identify(ev, "e1", 10.0, plan="pro", address={"city": "Oslo", "zip": "0150"}), NO_DEFS, now=NOW
    )
    assert change.traits == {"plan": "pro", "address": {"city": "Oslo", "zip": "0150"}}
    view = profile.view(now=NOW)
    assert view.traits["plan"] == TraitVersion("pro", "web", "e1", 10.0, NOW)
    assert view.trait_values() == {"plan": "pro", "address": {"city": "Oslo", "zip": "0150"}}
    # A later address replaces the whole object: nested values are not merged key by key.
    profile.apply(identify(ev, "e2", 20.0, address={"city": "Lima"}), NO_DEFS, now=NOW)
    assert profile.view(now=NOW).trait_values()["address"] == {"city": "Lima"}


def test_a_late_older_event_is_kept_in_history_but_does_not_overwrite_a_newer_value(ev):
    profile = Profile.new("p")
    profile.apply(identify(ev, "new", 20.0, plan="team"), NO_DEFS, now=NOW)
    change = profile.apply(identify(ev, "old", 10.0, plan="free"), NO_DEFS, now=NOW)
    assert change.traits == {}
    assert change.event_ids == ["old"]
    assert profile.view(now=NOW).traits["plan"].value == "team"
    assert [v.event_id for v in profile.trait_history("plan")] == ["old", "new"]


def test_ties_on_event_time_go_to_the_greater_event_id_whatever_the_arrival_order(ev):
    for order in (["a", "b"], ["b", "a"]):
        profile = Profile.new("p")
        for event_id in order:
            profile.apply(identify(ev, event_id, 10.0, plan=f"plan-{event_id}"), NO_DEFS, now=NOW)
        assert profile.view(now=NOW).traits["plan"].value == "plan-b"


def test_the_same_value_again_records_provenance_but_is_not_a_change(ev):
    profile = Profile.new("p")
    profile.apply(identify(ev, "e1", 10.0, plan="pro"), NO_DEFS, now=NOW)
    change = profile.apply(identify(ev, "e2", 20.0, source="salesforce", plan="pro"), NO_DEFS, now=NOW)
    assert change.traits == {}
    assert profile.view(now=NOW).traits["plan"].source == "salesforce"
    assert len(profile.trait_history("plan")) == 2
    # A change of JSON type is a change: 1 is not True, 1 is not 1.0.
    profile.apply(identify(ev, "e3", 30.0, seats=1), NO_DEFS, now=NOW)
    assert profile.apply(identify(ev, "e4", 40.0, seats=True), NO_DEFS, now=NOW).traits == {"seats": True}
    assert profile.apply(identify(ev, "e5", 50.0, seats=1.0), NO_DEFS, now=NOW).traits == {"seats": 1.0}


def test_null_removes_a_trait_and_keeps_its_history(ev):
    profile = Profile.new("p")
    profile.apply(identify(ev, "e1", 10.0, phone="+4712345678"), NO_DEFS, now=NOW)
    change = profile.apply(identify(ev, "e2", 20.0, phone=None), NO_DEFS, now=NOW)
    assert change.traits == {"phone": None}
    view = profile.view(now=NOW)
    assert view.traits["phone"] == TraitVersion(None, "web", "e2", 20.0, NOW)  # removed, with who removed it
    assert "phone" not in view.trait_values()
    assert [v.value for v in profile.trait_history("phone")] == ["+4712345678", None]
    # Removing a trait that was never set changes nothing.
    assert profile.apply(identify(ev, "e3", 30.0, fax=None), NO_DEFS, now=NOW).traits == {}


def test_as_of_answers_what_we_knew_on_a_date(ev):
    profile = Profile.new("p")
    for event_id, at, plan in [("e1", 10.0, "free"), ("e3", 30.0, None), ("e2", 20.0, "pro")]:
        profile.apply(identify(ev, event_id, at, plan=plan), NO_DEFS, now=NOW)
    assert "plan" not in profile.view(now=NOW, as_of=5.0).traits
    assert profile.view(now=NOW, as_of=10.0).traits["plan"].value == "free"
    assert profile.view(now=NOW, as_of=25.0).traits["plan"].value == "pro"
    assert profile.view(now=NOW, as_of=30.0).traits["plan"].value is None
    assert profile.view(now=NOW).traits["plan"].value is None


def test_only_identify_sets_traits_and_group_calls_keep_membership_with_provenance(ev):
    profile = Profile.new("p")
    profile.apply(ev("t1", "track", at=10.0, traits={"plan": "context-only"}), NO_DEFS, now=NOW)
    change = profile.apply(ev("g1", "group", at=20.0, group_id="acme", traits={"plan": "enterprise"}), NO_DEFS, now=NOW)
    assert change.groups == {"acme": {"plan": "enterprise"}}
    assert change.traits == {}
    view = profile.view(now=NOW)
    assert view.traits == {}
    assert view.groups["acme"] == TraitVersion({"plan": "enterprise"}, "web", "g1", 20.0, NOW)
    assert "acme" not in profile.view(now=NOW, as_of=10.0).groups


def test_api_and_crm_writes_set_traits_idempotently_on_their_id(ev):
    profile = Profile.new("p")
    profile.apply(identify(ev, "e1", 10.0, plan="free"), NO_DEFS, now=NOW)
    change = profile.update_traits(
        {"plan": "pro", "owner": "kim"}, source="salesforce", at=15.0, event_id="sf-1", now=NOW
    )
    assert change.traits == {"plan": "pro", "owner": "kim"}
    assert change.event_ids == ["sf-1"]
    assert profile.view(now=NOW).traits["plan"] == TraitVersion("pro", "salesforce", "sf-1", 15.0, NOW)
    assert not profile.update_traits({"plan": "team"}, source="salesforce", at=16.0, event_id="sf-1", now=NOW)
    assert profile.view(now=NOW).traits["plan"].value == "pro"
    assert profile.view(now=NOW).event_count == 1  # writes are not events


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda p: p.update_traits(["plan"], source="api", at=1.0, event_id="w", now=NOW), "traits"),
        (lambda p: p.update_traits({"": 1}, source="api", at=1.0, event_id="w", now=NOW), "traits"),
        (lambda p: p.update_traits({"a": 1}, source="api", at=1.0, event_id="", now=NOW), "event_id"),
        (lambda p: p.update_traits({"a": 1}, source="", at=1.0, event_id="w", now=NOW), "source"),
        (lambda p: p.update_traits({"a": 1}, source="api", at="yesterday", event_id="w", now=NOW), "at"),
    ],
)
def test_bad_trait_writes_name_the_field(call, field):
    with pytest.raises(InvalidArgument) as caught:
        call(Profile.new("p"))
    assert caught.value.field == field


def test_unknown_event_types_are_refused(ev):
    with pytest.raises(InvalidArgument) as caught:
        Profile.new("p").apply(ev("e1", "click"), NO_DEFS, now=NOW)
    assert caught.value.field == "type"
    assert "identify" in caught.value.description
