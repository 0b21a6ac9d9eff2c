"""Identity's "Identifier Shared" events are the platform's, not the person's: the fraud trait that names
them still reads them, and the churn label's "activity" does not count them (a dormant account a new
account joined on its phone has not come back)."""

from __future__ import annotations

from cdp.events.v1 import events_pb2
from cdp_identity.codec import identifier_shared
from cdp_profile.domain import ComputedTrait, ComputedTraits, Profile, ProfileEvent, TimelineEntry
from cdp_profile.events import to_profile_event
from cdp_training.labels import LabelSpec
from cdp_training.learn import label_for
from cdp_training.simulator import _Event, _identifier_shared
from cdp_training.traits import COMPUTED_TRAITS

DAY = 86400.0
NOW = 100 * DAY


def _told_on_the_wire(person: str, at_ms: int) -> ProfileEvent:
    """Identity's event as its codec publishes it, decoded as profile decodes it."""
    batch = events_pb2.ResolvedEventBatch.FromString(
        identifier_shared(person, {"device_id": 3}, message_id="sh-1", at=at_ms, received=at_ms)
    )
    return to_profile_event(batch.events[0])


def test_identitys_event_as_published_is_a_platform_event_and_the_simulators_too():
    event = _told_on_the_wire("p1", int((NOW - 3600) * 1000))
    assert event.platform and event.name == "Identifier Shared"
    assert not event.user_id and not event.anonymous_id


def test_the_shipped_shared_device_trait_still_rises_without_moving_last_seen():
    defs = ComputedTraits([ComputedTrait.from_dict(COMPUTED_TRAITS["shared_device_accounts_24h"])])
    profile = Profile.new("p1")
    order = ProfileEvent("web:o1", "track", "Order Completed", NOW - 3 * 3600, "web", user_id="u1")
    profile.apply(order, defs, now=NOW)
    profile.apply(_told_on_the_wire("p1", int((NOW - 3600) * 1000)), defs, now=NOW)
    view = profile.view(now=NOW)
    assert view.computed["shared_device_accounts_24h"] == 3
    assert (view.last_seen, view.event_count) == (NOW - 3 * 3600, 1)


def test_a_platform_event_is_no_activity_for_the_churn_label():
    churn = LabelSpec.from_dict(label_for("churn_risk"))
    cutoff = NOW - 200 * DAY
    told_at = cutoff + churn.after + DAY  # inside the label's window
    told = _identifier_shared_entry(told_at)
    assert told.platform
    assert churn.label([told], cutoff) == (1.0,)  # lapsed: identity telling them of a newcomer is not a visit
    visit = TimelineEntry(told_at, "web:v1", "page", "Home", {}, "web", "p1", user_id="u1")
    assert churn.label([told, visit], cutoff) == (0.0,)
    # a label that names the event still reads it
    named = LabelSpec.from_dict({"kind": "goal_event", "window": "400d", "events": [{"name": "Identifier Shared"}]})
    assert named.label([told], cutoff) == (1.0,)


def _identifier_shared_entry(at: float) -> TimelineEntry:
    """The simulator's copy of identity's event, as a timeline entry."""
    cause = _Event("track", "Login", at, "web", {}, {}, {}, "u2", "a2", "m1")
    event = _identifier_shared(cause, {"device_id": 2, "anonymous_id": 2})
    return TimelineEntry(
        event.at, event.event_id, event.type, event.name, event.properties, event.source, "p1", shared=event.shared
    )
