"""The time orchestration reads an event at is never later than when the collector received it, as every
service reads it. The collector caps `timestamp` at `received_at`; an event stored before it did (a replay,
the stream's retention read again) may say it happened in 9999: without the cap here it would be a watched
event's `last_seen` for ever, so a suppression ("no offer within a day of a support contact") would never
lapse for that person, and a goal reached by it would be converted in 9999."""

from __future__ import annotations

from cdp.events.v1 import events_pb2
from cdp_kit.bus import subjects
from cdp_kit.storage import open_store
from cdp_orchestration.domain.rules import Rules, Suppression
from cdp_orchestration.engine import OrchestrationLogic
from cdp_orchestration.inputs import decode
from cdp_orchestration.journeys import Journeys
from cdp_orchestration.state import PERSONS

RECEIVED = 1_764_900_000.25
FUTURE = 253_402_300_799  # 9999-12-31T23:59:59Z


def message(*, timestamp: float | None, received: float | None = RECEIVED) -> bytes:
    event = events_pb2.Event(
        message_id="m-1", source_id="src", type=events_pb2.EVENT_TYPE_TRACK, event="Support Contacted"
    )
    if timestamp is not None:
        event.timestamp.FromMicroseconds(int(timestamp * 1e6))
    if received is not None:
        event.received_at.FromMicroseconds(int(received * 1e6))
    resolved = events_pb2.ResolvedEvent(event=event, person_id="p1")
    return events_pb2.ResolvedEventBatch(events=[resolved]).SerializeToString()


def read(data: bytes):
    [one] = decode(subjects.EVENTS_RESOLVED, "", data, RECEIVED + 1)
    return one.data


def test_a_time_from_the_future_is_read_as_the_arrival():
    resolved = read(message(timestamp=FUTURE))
    assert resolved.at == RECEIVED
    assert resolved.event().at == RECEIVED  # what goals, suppressions and triggers read


def test_past_times_are_kept_and_a_missing_one_is_the_arrival():
    assert read(message(timestamp=RECEIVED - 3600)).at == RECEIVED - 3600
    assert read(message(timestamp=RECEIVED - 3600)).event().at == RECEIVED - 3600
    assert read(message(timestamp=None)).at == RECEIVED
    assert read(message(timestamp=RECEIVED - 5, received=None)).at == RECEIVED - 5  # nothing to cap it at


async def test_a_future_dated_support_contact_does_not_suppress_for_ever():
    rules = Rules(suppressions=(Suppression("after-contact", after_event="Support Contacted", within=86400.0),))
    async with open_store("memory://") as store:
        journeys = Journeys(store)
        await journeys.load()
        logic = OrchestrationLogic(store, journeys, rules, partitions=1)
        effects = await logic.apply(0, [decode(subjects.EVENTS_RESOLVED, "", message(timestamp=FUTURE), RECEIVED)])
        await store.bulk_write(effects.writes)
        person = await store.get(PERSONS, "p1")
    assert person.doc["arbiter"]["last_seen"] == {"Support Contacted": RECEIVED}
