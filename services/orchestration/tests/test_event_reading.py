"""An event's properties and context are read only where something may read them (`inputs.ResolvedInput`):
for a person with an instance, when a journey enters on its name, or when the arbiter watches it. In
process, over a memory store: the engine's apply stage as `OrchestrationLogic.apply` runs it, without the
bus (as `test_entry_index`)."""

from __future__ import annotations

import time
from typing import Any

from cdp.events.v1 import events_pb2
from cdp_kit.bus import subjects
from cdp_kit.storage import open_store
from cdp_orchestration import inputs
from cdp_orchestration.domain import lifecycle
from cdp_orchestration.domain.document import parse_journey
from cdp_orchestration.domain.rules import Rules, Suppression
from cdp_orchestration.engine import OrchestrationLogic
from cdp_orchestration.inputs import decode
from cdp_orchestration.journeys import Journeys
from cdp_orchestration.state import INSTANCES, PERSONS


def journey(journey_id: str, entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": journey_id,
        "version": 1,
        "name": journey_id,
        "entry": entry,
        "reentry": "always",
        "nodes": [{"id": "wait", "type": "delay", "duration": "1d"}],
    }


def batch(person: str, name: str, *, user_id: str = "", **properties: Any) -> bytes:
    message = events_pb2.Event(
        message_id=f"{person}-{name}-{len(properties)}", type=events_pb2.EVENT_TYPE_TRACK, event=name, user_id=user_id
    )
    message.timestamp.FromSeconds(1_764_900_000)
    message.properties.update(properties)
    resolved = events_pb2.ResolvedEvent(event=message, person_id=person)
    return events_pb2.ResolvedEventBatch(events=[resolved]).SerializeToString()


class Service:
    def __init__(self, store, rules: Rules | None = None) -> None:
        self.store = store
        self.journeys = Journeys(store)
        self.logic = OrchestrationLogic(store, self.journeys, rules or Rules(), partitions=1)

    async def publish(self, document: dict[str, Any]) -> None:
        await self.journeys.save(lifecycle.publish(lifecycle.create(parse_journey(document))))

    async def apply(self, *decoded: list[inputs.Input]) -> None:
        await self.store.bulk_write((await self.logic.apply(0, list(decoded))).writes)

    async def event(self, person: str, name: str, **kwargs: Any) -> None:
        await self.apply(decode(subjects.EVENTS_RESOLVED, "", batch(person, name, **kwargs), time.time()))

    async def entered(self, person: str) -> list[str]:
        return sorted(
            [r.doc["journey_id"] async for r in self.store.scan_all(INSTANCES) if r.doc["person_id"] == person]
        )


def counting(monkeypatch) -> list[str]:
    read: list[str] = []
    real = inputs.struct_dict
    monkeypatch.setattr(inputs, "struct_dict", lambda struct: read.append("properties") or real(struct))
    return read


async def test_an_event_is_read_whole_only_for_a_person_with_an_instance_or_a_journey_entering_on_it(monkeypatch):
    read = counting(monkeypatch)
    async with open_store("memory://") as store:
        service = Service(store)
        await service.publish(journey("big", {"event": "Order Completed", "where": "properties.total > 10"}))
        await service.journeys.load()

        await service.event("ada", "Signed Up", user_id="u-ada", plan="pro")
        assert read == []  # nothing of ada's waits, no journey enters on it
        # What such an event still gives: the identifiers outcome events go back in under.
        assert (await store.get(PERSONS, "ada")).doc["ids"] == {"user_id": "u-ada"}

        await service.event("ada", "Order Completed", total=20.0)
        assert await service.entered("ada") == ["big"]
        assert read == ["properties"]
        read.clear()
        # Ada's instance waits now: her next event is read, whatever its name.
        await service.event("ada", "Signed Up", plan="team")
        assert read == ["properties"]


async def test_a_journey_published_after_an_event_was_decoded_still_reads_its_properties():
    async with open_store("memory://") as store:
        service = Service(store)
        await service.journeys.load()
        decoded = decode(subjects.EVENTS_RESOLVED, "", batch("bob", "Checkout Started", total=20.0), time.time())
        await service.publish(journey("checkout", {"event": "Checkout Started", "where": "properties.total > 10"}))
        await service.apply(decoded)
        assert await service.entered("bob") == ["checkout"]


async def test_an_event_the_arbiter_watches_is_read_for_everyone(monkeypatch):
    read = counting(monkeypatch)
    rules = Rules(suppressions=(Suppression("after-order", after_event="Order Completed", within=86400.0),))
    async with open_store("memory://") as store:
        service = Service(store, rules)
        await service.journeys.load()
        await service.event("cy", "Order Completed", total=5.0)
        assert read == ["properties"]
        assert (await store.get(PERSONS, "cy")) is not None
