"""Merges and splits, case by case (the random-event-set equivalences are in test_properties)."""

from __future__ import annotations

import pytest

from cdp_kit.errors import FailedPrecondition, InvalidArgument, NotFound
from cdp_profile.domain import ComputedTrait, ComputedTraits, Profile, ProfileChange, Retention
from cdp_profile.records import decode_entry, decode_profile, encode_entry, encode_profile, timeline_key

DAY = 86400.0
NOW = 100 * DAY
DEFS = ComputedTraits(
    [
        ComputedTrait("orders", "count", event_names=("Order Completed",)),
        ComputedTrait("revenue", "sum", event_names=("Order Completed",), property="total"),
        ComputedTrait("aov", "avg", event_names=("Order Completed",), property="total"),
        ComputedTrait("orders_7d", "count", event_names=("Order Completed",), window="7d"),
        ComputedTrait("first_order", "first", event_names=("Order Completed",), property="total"),
    ]
)


def order(ev, event_id, at, total, *identifiers):
    return ev(event_id, "track", "Order Completed", at, properties={"total": total}, identifiers=identifiers)


def two_people(ev):
    ann = Profile.new("ann")
    ann.apply(order(ev, "a1", NOW - 10 * DAY, 10, "user_id:ann"), DEFS, now=NOW)
    ann.apply(
        ev("a2", "identify", at=NOW - 2 * DAY, traits={"plan": "free"}, identifiers=("user_id:ann",)), DEFS, now=NOW
    )
    bob = Profile.new("bob")
    bob.apply(order(ev, "b1", NOW - 1 * DAY, 30, "anonymous_id:b1"), DEFS, now=NOW)
    bob.apply(ev("b2", "identify", at=NOW - 5 * DAY, traits={"plan": "pro", "city": "Oslo"}), DEFS, now=NOW)
    return ann, bob


def test_merge_recombines_everything_and_reports_only_what_changed(ev):
    ann, bob = two_people(ev)
    change = ann.merge(bob, merge_id="m1", at=NOW, defs=DEFS, now=NOW)
    assert change.merged == ["bob"]
    assert change.computed == {"orders": 2, "revenue": 40.0, "aov": 20.0, "orders_7d": 1}  # first_order stays 10
    assert change.traits == {"city": "Oslo"}  # ann's plan is newer than bob's
    assert [e.event_id for e in change.timeline_added] == ["b2", "b1"]
    view = ann.view(now=NOW)
    assert view.merged_from == ["bob"]
    assert view.traits["plan"].value == "free"
    assert [v.value for v in ann.trait_history("plan")] == ["pro", "free"]
    assert (view.event_count, view.first_seen, view.last_seen) == (4, NOW - 10 * DAY, NOW - 1 * DAY)
    assert view.identifiers == {"user_id:ann", "anonymous_id:b1"}
    assert [m.to_doc() for m in ann.merges] == [{"merge_id": "m1", "winner": "ann", "loser": "bob", "at": NOW}]
    # The loser is an empty shell now: nothing is shared between two live profiles.
    assert bob.view(now=NOW).event_count == 0 and bob.timeline() == []


def test_merge_is_idempotent_and_refuses_nonsense(ev):
    ann, bob = two_people(ev)
    ann.merge(bob, merge_id="m1", at=NOW, defs=DEFS, now=NOW)
    assert not ann.merge(Profile.new("bob"), merge_id="m1", at=NOW, defs=DEFS, now=NOW)
    with pytest.raises(InvalidArgument):
        ann.merge(ann, merge_id="m2", at=NOW, defs=DEFS, now=NOW)
    carl = Profile.new("carl")
    carl.merge(Profile.new("dora"), merge_id="m3", at=NOW, defs=DEFS, now=NOW)
    other = Profile.new("eve")
    other.merge(Profile.new("dora"), merge_id="m4", at=NOW, defs=DEFS, now=NOW)
    with pytest.raises(FailedPrecondition):
        carl.merge(other, merge_id="m5", at=NOW, defs=DEFS, now=NOW)


def test_events_after_a_merge_go_to_the_part_that_owns_their_identifier(ev):
    ann, bob = two_people(ev)
    ann.merge(bob, merge_id="m1", at=NOW, defs=DEFS, now=NOW)
    ann.apply(order(ev, "x1", NOW, 5, "email:new@x.io", "anonymous_id:b1"), DEFS, now=NOW)  # bob's
    ann.apply(order(ev, "x2", NOW, 7, "email:new@x.io"), DEFS, now=NOW)  # bob's now: x1 taught it that email
    ann.apply(order(ev, "x3", NOW, 11, "device_id:unknown"), DEFS, now=NOW)  # nobody's: the root
    ann.update_traits({"vip": True}, source="api", at=NOW, event_id="w1", now=NOW)  # API writes: the root
    restored, mine, theirs = ann.split("bob", merge_id="m1", defs=DEFS, now=NOW)
    assert [e.event_id for e in restored.timeline()] == ["b2", "b1", "x1", "x2"]
    assert [e.event_id for e in ann.timeline()] == ["a1", "a2", "x3"]
    assert restored.view(now=NOW).computed["revenue"] == 42.0
    assert ann.view(now=NOW).computed["revenue"] == 21.0
    assert ann.view(now=NOW).traits["vip"].value is True
    assert "vip" not in restored.view(now=NOW).traits
    assert mine.split == ["bob"] and theirs.split_from == "ann"
    assert mine.computed == {"orders": 2, "revenue": 21.0, "aov": 10.5, "orders_7d": 1}
    assert mine.traits == {"city": None}
    assert theirs.traits == {"plan": "pro", "city": "Oslo"}
    assert theirs.computed == {"orders": 3, "revenue": 42.0, "aov": 14.0, "orders_7d": 3, "first_order": 30}


def test_splitting_an_unknown_merge_is_not_found(ev):
    ann, bob = two_people(ev)
    with pytest.raises(NotFound):
        ann.split("bob", merge_id="m1", defs=DEFS, now=NOW)
    ann.merge(bob, merge_id="m1", at=NOW, defs=DEFS, now=NOW)
    with pytest.raises(NotFound):
        ann.split("bob", merge_id="other", defs=DEFS, now=NOW)
    ann.split("bob", merge_id="m1", defs=DEFS, now=NOW)
    with pytest.raises(NotFound):
        ann.split("bob", merge_id="m1", defs=DEFS, now=NOW)


def test_an_event_applied_to_both_people_before_the_merge_counts_once(ev):
    """identity re-resolved a redelivered event to the winner before the profile saw the merge."""
    ann, bob = two_people(ev)
    shared = order(ev, "dup", NOW - 3 * DAY, 100, "anonymous_id:b1")
    bob.apply(shared, DEFS, now=NOW)
    ann.apply(shared, DEFS, now=NOW)
    ann.merge(bob, merge_id="m1", at=NOW, defs=DEFS, now=NOW)
    view = ann.view(now=NOW)
    assert view.computed["orders"] == 3 and view.computed["revenue"] == 140.0 and view.computed["orders_7d"] == 2
    assert view.event_count == 5
    assert [e.event_id for e in ann.timeline()].count("dup") == 1
    assert not ann.apply(shared, DEFS, now=NOW)


def test_the_combined_timeline_keeps_retention(ev):
    ann = Profile.new("ann", retention=Retention(max_events=3))
    bob = Profile.new("bob", retention=Retention(max_events=3))
    for i, at in enumerate([1.0, 4.0, 6.0]):
        ann.apply(order(ev, f"a{i}", at, 1), DEFS, now=NOW)
    for i, at in enumerate([2.0, 3.0, 5.0]):
        bob.apply(order(ev, f"b{i}", at, 1), DEFS, now=NOW)
    change = ann.merge(bob, merge_id="m1", at=NOW, defs=DEFS, now=NOW)
    assert [e.event_id for e in ann.timeline()] == ["a1", "b2", "a2"]
    assert [e.event_id for e in change.timeline_removed] == ["a0"]  # bob's dropped entries never showed here
    assert [e.event_id for e in change.timeline_added] == ["b2"]
    assert ann.view(now=NOW).computed["orders"] == 6  # retention bounds the timeline, not the counts


def test_merging_under_changed_definitions_drops_or_rebuilds_the_losers_states(ev):
    ann, bob = two_people(ev)
    changed = ComputedTraits(
        [ComputedTrait("orders", "count", event_names=("Order Completed",), window="30d")]  # was lifetime
    )
    ann.merge(bob, merge_id="m1", at=NOW, defs=changed, now=NOW)
    assert ann.view(now=NOW).computed == {"orders": 2}  # rebuilt from the timelines; the rest dropped


def test_split_follows_the_merge_tree(ev):
    people = {name: Profile.new(name) for name in ("a", "b", "c", "d")}
    for name, profile in people.items():
        profile.apply(order(ev, f"{name}1", NOW - DAY, 1, f"user_id:{name}"), DEFS, now=NOW)
    people["b"].merge(people["c"], merge_id="bc", at=NOW, defs=DEFS, now=NOW)
    people["a"].merge(people["b"], merge_id="ab", at=NOW, defs=DEFS, now=NOW)
    people["a"].merge(people["d"], merge_id="ad", at=NOW, defs=DEFS, now=NOW)
    a = people["a"]
    assert a.view(now=NOW).merged_from == ["b", "c", "d"]
    b, _, theirs = a.split("b", merge_id="ab", defs=DEFS, now=NOW)
    assert b.view(now=NOW).merged_from == ["c"] and a.view(now=NOW).merged_from == ["d"]
    assert [m.merge_id for m in b.merges] == ["bc"] and [m.merge_id for m in a.merges] == ["ad"]
    assert theirs.computed["orders"] == 2


def test_a_split_moves_the_identifiers_identity_gave_back_to_the_restored_person(ev):
    """A support trial undid a merge made through a shared tablet: identity gave the tablet's anonymous id
    back to the other person, but the survivor's profile still listed it (an event of the tablet after the
    merge had been attributed to the survivor's part)."""
    ann, bob = two_people(ev)
    ann.merge(bob, merge_id="m1", at=NOW, defs=DEFS, now=NOW)
    ann.apply(order(ev, "t1", NOW, 5, "user_id:ann", "anonymous_id:tablet"), DEFS, now=NOW)  # ann's part
    assert "anonymous_id:tablet" in ann.view(now=NOW).identifiers
    restored, _, _ = ann.split("bob", merge_id="m1", defs=DEFS, now=NOW, given=["anonymous_id:tablet"])
    assert ann.view(now=NOW).identifiers == {"user_id:ann"}
    assert restored.view(now=NOW).identifiers == {"anonymous_id:b1", "anonymous_id:tablet"}
    # The event itself stays where it was applied: it was attributed to ann when it came.
    assert [e.event_id for e in ann.timeline()] == ["a1", "a2", "t1"]


def _stored_after(changes, records=None):
    """The timeline records a store holds after writing `changes` as the engine does (`Engine.writes`: a
    Put per entry added, a Delete per entry removed, keyed by the entry's origin)."""
    records = {} if records is None else records
    for change in changes:
        for entry in change.timeline_added:
            records[timeline_key(entry)] = encode_entry(entry)
        for entry in change.timeline_removed:
            records.pop(timeline_key(entry), None)
    return records


def test_a_duplicate_the_merge_took_out_leaves_the_store_too(ev):
    """The loser's copy of an event both persons had is taken off its timeline by the merge; its stored
    entry must go with it, or the profile loaded again holds the event twice (ListEvents, export) and a
    backfill counts it twice."""
    ann, bob = two_people(ev)
    shared = order(ev, "dup", NOW - 3 * DAY, 100, "anonymous_id:b1")
    bob.apply(shared, DEFS, now=NOW)
    ann.apply(shared, DEFS, now=NOW)
    # every entry both hold, as their event batches wrote them
    records = _stored_after([ProfileChange(p.person_id, timeline_added=p.timeline()) for p in (ann, bob)])
    _stored_after([ann.merge(bob, merge_id="m1", at=NOW, defs=DEFS, now=NOW)], records)
    loaded = decode_profile(encode_profile(ann), [decode_entry(doc) for doc in records.values()], ann.retention)
    assert [e.event_id for e in loaded.timeline()] == [e.event_id for e in ann.timeline()]
    assert [e.event_id for e in loaded.timeline()].count("dup") == 1
    loaded.backfill(DEFS.get("orders"), now=NOW)
    assert loaded.view(now=NOW).computed["orders"] == ann.view(now=NOW).computed["orders"] == 3
    assert not loaded.apply(order(ev, "dup", NOW - 3 * DAY, 100), DEFS, now=NOW)  # still applied once


def test_a_batch_of_merges_deletes_each_losers_copy_of_an_event_they_shared(ev):
    """Two merges folded into one write (one batch of identity notices): carl's copy of the event bob's
    part brought in is deleted, not cancelled against bob's entry of the same event id."""
    ann = Profile.new("ann")
    bob, carl = Profile.new("bob"), Profile.new("carl")
    shared = order(ev, "e5", NOW - DAY, 5)
    records = _stored_after([bob.apply(shared, DEFS, now=NOW), carl.apply(shared, DEFS, now=NOW)])
    records = _stored_after([ann.apply(order(ev, "a1", NOW - 2 * DAY, 1), DEFS, now=NOW)], records)
    folded = ann.merge(bob, merge_id="m1", at=NOW, defs=DEFS, now=NOW)
    folded.combine(ann.merge(carl, merge_id="m2", at=NOW, defs=DEFS, now=NOW))
    _stored_after([folded], records)
    assert sorted(records) == sorted(timeline_key(entry) for entry in ann.timeline())
    loaded = decode_profile(encode_profile(ann), [decode_entry(doc) for doc in records.values()], ann.retention)
    assert [e.event_id for e in loaded.timeline()] == ["a1", "e5"]
