"""Which journeys an event or a segment change can enter: the live journeys indexed by their entry.

An event meets only the journeys whose entry names it, and publishing, pausing, resuming or archiving a
journey changes what the next event meets at once. In process, over a memory store: the engine's apply
stage as `OrchestrationLogic.apply` runs it, without the bus.
"""

from __future__ import annotations

import time
from typing import Any

from cdp.events.v1 import events_pb2
from cdp.segmentation.v1 import segmentation_pb2
from cdp_kit.bus import subjects
from cdp_kit.storage import open_store
from cdp_kit.timestamps import from_seconds
from cdp_orchestration.domain import lifecycle
from cdp_orchestration.domain.document import parse_journey
from cdp_orchestration.domain.rules import Rules
from cdp_orchestration.engine import OrchestrationLogic
from cdp_orchestration.inputs import decode
from cdp_orchestration.journeys import Journeys
from cdp_orchestration.state import INSTANCES


def journey(journey_id: str, entry: dict[str, Any], version: int = 1) -> dict[str, Any]:
    """Enters on `entry` and waits a day: an entry leaves a running instance to find."""
    return {
        "id": journey_id,
        "version": version,
        "name": journey_id,
        "entry": entry,
        "reentry": "always",
        "nodes": [{"id": "wait", "type": "delay", "duration": "1d"}],
    }


class Service:
    def __init__(self, store) -> None:
        self.store = store
        self.journeys = Journeys(store)
        self.logic = OrchestrationLogic(store, self.journeys, Rules(), partitions=1)
        self.sequence = 0

    async def publish(self, document: dict[str, Any]) -> None:
        record = self.journeys.records.get(document["id"])
        if record is None:
            record = lifecycle.create(parse_journey(document))
        else:
            record = lifecycle.save_draft(record, parse_journey(document))
        await self.journeys.save(lifecycle.publish(record))

    async def move(self, journey_id: str, to) -> None:
        await self.journeys.save(to(self.journeys.get(journey_id)))

    async def event(self, person: str, name: str, **properties: Any) -> None:
        self.sequence += 1
        message = events_pb2.Event(
            message_id=f"e-{self.sequence}",
            type=events_pb2.EVENT_TYPE_TRACK,
            event=name,
            timestamp=from_seconds(time.time()),
        )
        message.properties.update(properties)
        batch = events_pb2.ResolvedEventBatch(events=[events_pb2.ResolvedEvent(event=message, person_id=person)])
        await self.apply(subjects.EVENTS_RESOLVED, "", batch.SerializeToString())

    async def segment(self, person: str, segment: str, *, entered: bool) -> None:
        self.sequence += 1
        change = segmentation_pb2.SegmentEvent(
            id=f"seg-{self.sequence}", person_id=person, segment_id=segment, entered=entered, reason="event"
        )
        change.at.CopyFrom(from_seconds(time.time()))
        batch = segmentation_pb2.SegmentEventBatch(events=[change])
        await self.apply(subjects.SEGMENTS, "", batch.SerializeToString())

    async def apply(self, stream: str, what: str, data: bytes) -> None:
        effects = await self.logic.apply(0, [decode(stream, what, data, time.time())])
        await self.store.bulk_write(effects.writes)

    async def entered(self, person: str) -> list[str]:
        """The journeys the person has entered, in the order of entry."""
        found = [r.doc async for r in self.store.scan_all(INSTANCES) if r.doc["person_id"] == person]
        return [doc["journey_id"] for doc in sorted(found, key=lambda d: d["entered_at"])]


async def test_an_event_enters_only_the_journeys_whose_entry_names_it():
    async with open_store("memory://") as store:
        service = Service(store)
        await service.publish(journey("orders", {"event": "Order Completed"}))
        await service.publish(journey("checkout", {"event": ["Checkout Started", "Order Completed"]}))
        await service.publish(journey("viewed", {"event": "Product Viewed"}))
        await service.publish(journey("vip", {"segment": "vip"}))
        await service.journeys.load()

        assert [j.id for j in service.journeys.entering_on_event("Order Completed")] == ["orders", "checkout"]
        assert [j.id for j in service.journeys.entering_on_event("Checkout Started")] == ["checkout"]
        assert service.journeys.entering_on_event("Signed Up") == ()
        assert [j.id for j in service.journeys.entering_on_segment("vip")] == ["vip"]

        await service.event("ada", "Order Completed")
        assert sorted(await service.entered("ada")) == ["checkout", "orders"]
        await service.event("bob", "Checkout Started")
        await service.event("bob", "Signed Up")
        assert await service.entered("bob") == ["checkout"]
        await service.segment("cy", "vip", entered=True)
        await service.event("cy", "Product Viewed")
        assert sorted(await service.entered("cy")) == ["viewed", "vip"]


async def test_publishing_pausing_and_archiving_a_journey_changes_what_the_next_event_enters():
    async with open_store("memory://") as store:
        service = Service(store)
        await service.publish(journey("orders", {"event": "Order Completed"}))
        await service.publish(journey("vip", {"segment": "vip"}))

        await service.move("orders", lifecycle.pause)
        await service.move("vip", lifecycle.pause)
        assert service.journeys.entering_on_event("Order Completed") == ()
        await service.event("ada", "Order Completed")
        await service.segment("ada", "vip", entered=True)
        assert await service.entered("ada") == []

        await service.move("orders", lifecycle.resume)
        await service.event("ada", "Order Completed")
        assert await service.entered("ada") == ["orders"]

        # A new version entering on another event: the old name no longer reaches it, the new one does.
        await service.publish(journey("orders", {"event": "Checkout Started"}, version=2))
        await service.event("bob", "Order Completed")
        assert await service.entered("bob") == []
        await service.event("bob", "Checkout Started")
        assert await service.entered("bob") == ["orders"]

        # Published later, entered on the next event; archived, no longer.
        await service.publish(journey("late", {"event": "Order Completed"}))
        await service.event("cy", "Order Completed")
        assert await service.entered("cy") == ["late"]
        await service.move("late", lifecycle.archive)
        await service.event("dee", "Order Completed")
        assert await service.entered("dee") == []

        # Another replica's change reaches this one by `reload`: the index follows it too.
        other = Journeys(store)
        await other.load()
        await other.save(lifecycle.pause(other.get("orders")))
        assert [j.id for j in service.journeys.entering_on_event("Checkout Started")] == ["orders"]
        await service.journeys.reload("orders")
        assert service.journeys.entering_on_event("Checkout Started") == ()


async def test_an_event_meets_only_the_journeys_whose_filter_can_hold_for_its_property_values():
    """A filter requiring `properties.<key> = "<text>"` is looked up by the event's value of that key, so an
    event is tested against the journeys it can enter rather than every one entering on its name."""
    viewed = "Product Viewed"
    async with open_store("memory://") as store:
        service = Service(store)
        await service.publish(journey("shoes", {"event": viewed, "where": 'properties.category = "shoes"'}))
        await service.publish(
            journey("big-hats", {"event": viewed, "where": 'properties.price > 100 and properties.category = "hats"'})
        )
        await service.publish(journey("any", {"event": viewed}))
        await service.publish(journey("not-shoes", {"event": viewed, "where": 'properties.category != "shoes"'}))
        await service.publish(journey("five", {"event": viewed, "where": "properties.size = 5"}))
        await service.journeys.load()

        def meets(**properties: Any) -> list[str]:
            return [j.id for j in service.journeys.entering_on_event(viewed, properties)]

        # In live() order, the keyed ones among the rest.
        assert meets(category="shoes") == ["shoes", "any", "not-shoes", "five"]
        assert meets(category="hats", price=150) == ["big-hats", "any", "not-shoes", "five"]
        assert meets(category=5) == meets() == ["any", "not-shoes", "five"]
        # What each event enters is what every filter says.
        await service.event("ada", viewed, category="shoes", size=5)
        assert sorted(await service.entered("ada")) == ["any", "five", "shoes"]
        await service.event("bob", viewed, category="hats", price=150)
        assert sorted(await service.entered("bob")) == ["any", "big-hats", "not-shoes"]
        await service.event("cy", viewed, category="hats", price=50)
        assert sorted(await service.entered("cy")) == ["any", "not-shoes"]
        await service.event("dee", viewed)
        assert await service.entered("dee") == ["any"]


async def test_a_filter_with_arithmetic_on_the_events_fields_is_indexed_and_entered():
    """`properties.total = properties.subtotal + properties.shipping` is no required text: the journey meets
    every event of its name, and enters where the arithmetic holds."""
    name = "Order Completed"
    async with open_store("memory://") as store:
        service = Service(store)
        await service.publish(
            journey("sums", {"event": name, "where": "properties.total = properties.subtotal + properties.shipping"})
        )
        await service.publish(
            journey(
                "eur-sums",
                {"event": name, "where": 'properties.total * 1 = properties.subtotal and properties.currency = "EUR"'},
            )
        )
        await service.journeys.load()
        assert [j.id for j in service.journeys.entering_on_event(name, {"currency": "EUR"})] == ["sums", "eur-sums"]
        assert [j.id for j in service.journeys.entering_on_event(name, {})] == ["sums"]
        await service.event("ada", name, total=12, subtotal=10, shipping=2, currency="EUR")
        assert await service.entered("ada") == ["sums"]
        await service.event("bob", name, total=12, subtotal=12, shipping=2, currency="EUR")
        assert await service.entered("bob") == ["eur-sums"]
