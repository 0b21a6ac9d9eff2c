"""A copy of an event the profile applied already (the same event id again: a client's retry past the
collector's dedup window, identity resolving an event again) changes nothing, yet its id is still listed in
`profiles.changed`: orchestration holds a person's actions until a change lists their latest event, and
before, a copy never got one, so the person's actions waited the whole `profile_wait` (ten minutes).

The listing is a change with the id and nothing else: the same message an applied event that moves no
field gives (a "Page Viewed" no computed trait reads), which every reader of `profiles.changed` already
takes without a field moving. It is not an applied event: nothing counts it as one."""

from __future__ import annotations

from cdp.profile.v1 import profile_pb2
from cdp_kit.profile_fields import change_fields
from cdp_profile.changes import change_messages
from cdp_profile.domain import ComputedTrait, ComputedTraits, Profile, ProfileEvent

NOW = 1_790_000_000.0
ORDERS = ComputedTraits([ComputedTrait("orders", "count", event_names=("Order Completed",))])


def event(event_id: str, name: str = "Order Completed", at: float = NOW - 60, **fields) -> ProfileEvent:
    return ProfileEvent(event_id=event_id, type="track", name=name, at=at, source="web", **fields)


def published(person: str, change) -> list[profile_pb2.ProfileChanged]:
    messages = change_messages({person: change}, cause="event", now=NOW, partition_of=lambda _person: 0)
    return [c for m in messages for c in profile_pb2.ProfileChangedBatch.FromString(m.payload).changes]


def test_a_copy_of_an_applied_event_changes_nothing_and_is_listed_again():
    profile = Profile.new("p")
    first = profile.apply(event("web:o-1"), ORDERS, now=NOW)
    assert first.event_ids == ["web:o-1"] and first.computed == {"orders": 1}

    copy = profile.apply(event("web:o-1"), ORDERS, now=NOW)
    assert not copy  # nothing changed: no count, no timeline entry, no write of its own
    assert copy.event_ids == [] and copy.relisted == ["web:o-1"]
    assert profile.view(now=NOW).computed["orders"] == 1 and profile.view(now=NOW).event_count == 1

    [message] = published("p", copy)
    assert list(message.event_ids) == ["web:o-1"]
    assert change_fields(message) == {}  # what scoring, segmentation, crm and orchestration fold: nothing
    assert not message.removed and not message.merged and not message.split_from


def test_the_listing_is_the_message_an_event_that_moves_no_field_gives():
    # What the readers of `profiles.changed` already get for every event no computed trait reads: the
    # listing of a copy is that same message, so none of them has anything new to handle.
    profile = Profile.new("p")
    [viewed] = published("p", profile.apply(event("web:v-1", name="Page Viewed"), ORDERS, now=NOW))
    profile.apply(event("web:o-1"), ORDERS, now=NOW)
    [listing] = published("p", profile.apply(event("web:o-1"), ORDERS, now=NOW))
    viewed.ClearField("event_ids")
    listing.ClearField("event_ids")
    assert listing == viewed


def test_a_copy_reaching_a_merged_profile_is_listed_too():
    ann, bob = Profile.new("ann"), Profile.new("bob")
    bob.apply(event("web:b-1", identifiers=("anonymous_id:b1",)), ORDERS, now=NOW)
    ann.merge(bob, merge_id="m1", at=NOW, defs=ORDERS, now=NOW)
    copy = ann.apply(event("web:b-1", identifiers=("anonymous_id:b1",)), ORDERS, now=NOW)
    assert not copy and copy.relisted == ["web:b-1"]
    assert ann.view(now=NOW).computed["orders"] == 1
    assert [list(m.event_ids) for m in published("ann", copy)] == [["web:b-1"]]


def test_a_batch_folding_applied_events_and_a_copy_lists_each_once_and_counts_the_applied_only():
    profile = Profile.new("p")
    profile.apply(event("web:o-1"), ORDERS, now=NOW)
    folded = profile.apply(event("web:o-2"), ORDERS, now=NOW)
    folded.combine(profile.apply(event("web:o-1"), ORDERS, now=NOW))  # the copy comes within the batch
    folded.combine(profile.apply(event("web:o-3"), ORDERS, now=NOW))
    folded.combine(profile.apply(event("web:o-1"), ORDERS, now=NOW))  # and again
    assert folded.event_ids == ["web:o-2", "web:o-3"] and folded.relisted == ["web:o-1", "web:o-1"]
    assert folded.computed == {"orders": 3}
    [message] = published("p", folded)
    # In the order the profile met them: a reader that saw the first copy knows o-3 is still to come.
    assert list(message.event_ids) == ["web:o-2", "web:o-1", "web:o-3", "web:o-1"]


def test_a_copy_first_in_a_batch_is_listed_first():
    profile = Profile.new("p")
    profile.apply(event("web:o-1"), ORDERS, now=NOW)
    folded = profile.apply(event("web:o-1"), ORDERS, now=NOW)
    folded.combine(profile.apply(event("web:o-2"), ORDERS, now=NOW))
    assert [list(m.event_ids) for m in published("p", folded)] == [["web:o-1", "web:o-2"]]


def test_an_empty_change_is_still_not_published():
    assert published("p", Profile.new("p").expire(ORDERS, now=NOW)) == []
