"""Publishing a scheduled journey arms its segment's members, read from the members' index, and a publish that
stops half way is armed again at the next start.

Publishing a journey whose entry is a schedule over a segment sends an `arm` command to each member's
engine. It found them by reading every person record and looking at its segments: at a customer's millions
of persons, millions of reads for a segment of thousands, all at once in the API call. Now the engine keeps
the segments' members (`state.MEMBERS`, written with the person record) and the publish reads the segment's
rows, a page at a time; a crash between the journey being saved and the last member armed left the rest
never armed (until they joined the segment again), and is now resumed at start (`resume_arming`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp.segmentation.v1 import segmentation_pb2
from cdp_kit.bus import subjects
from cdp_kit.storage import Delete, Put, open_store
from cdp_kit.timestamps import from_seconds
from cdp_orchestration import api_journeys
from cdp_orchestration.api import OrchestrationApi
from cdp_orchestration.domain.rules import Rules
from cdp_orchestration.engine import OrchestrationLogic
from cdp_orchestration.inputs import decode
from cdp_orchestration.journeys import Journeys
from cdp_orchestration.state import ARMING, INSTANCES, MEMBERS, MEMBERS_BUILT, PERSONS, prepare_store

DIGEST = {
    "id": "digest",
    "version": 1,
    "name": "Digest",
    "priority": 5,
    "category": "newsletter",
    "timezone": "UTC",
    "entry": {"schedule": {"cron": "* * * * *", "segment": "vip"}},
    "nodes": [{"id": "later", "type": "delay", "duration": "30d"}],
}


def _definition(document: dict[str, Any]) -> pb.JourneyDefinition:
    return pb.JourneyDefinition(json=orjson.dumps(document).decode())


class Recorded:
    """A bus whose publisher keeps the commands."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, dict]] = []
        self.publisher = self

    async def publish_batch(self, messages):
        for message in messages:
            self.commands.append((message.headers["Cdp-Command"], orjson.loads(message.payload)))
        return [type("Ok", (), {"ok": True})() for _ in messages]


async def test_publishing_a_scheduled_journey_reads_its_segments_members_only():
    async with open_store("memory://") as store:
        # 1,000 persons as an earlier build wrote them (no members' rows), 10 of them in vip: the start's
        # `prepare_store` indexes them once.
        ops = [
            Put(PERSONS, f"p{n:04}", {"fields": {}, "segments": ["vip", "all"] if n % 100 == 0 else ["all"]})
            for n in range(1000)
        ]
        await store.bulk_write(ops)
        await prepare_store(store)
        bus = Recorded()
        api = OrchestrationApi(journeys=Journeys(store), store=store, bus=bus, partitions=2)  # type: ignore[arg-type]

        read: list[tuple[str, str]] = []
        find, scan, get_many = store._find, store._scan, store._get_many

        async def counting_find(collection, *args):
            found = await find(collection, *args)
            read.extend((collection, r.key) for r in found if collection in (PERSONS, MEMBERS))
            return found

        async def counting_scan(collection, *args):
            page = await scan(collection, *args)
            read.extend((collection, r.key) for r in page.records if collection in (PERSONS, MEMBERS))
            return page

        async def counting_get_many(collection, keys):
            found = await get_many(collection, keys)
            read.extend((collection, key) for key in found if collection in (PERSONS, MEMBERS))
            return found

        store._find, store._scan, store._get_many = counting_find, counting_scan, counting_get_many  # type: ignore[method-assign]

        await api.CreateJourney(pb.CreateJourneyRequest(definition=_definition(DIGEST)), None)
        await api.PublishJourney(pb.PublishJourneyRequest(journey_id="digest"), None)
        members = [f"p{n:04}" for n in range(0, 1000, 100)]
        assert sorted(body["person_id"] for name, body in bus.commands if name == "arm") == members
        assert len(read) == 10, read[:5]  # was the 1,000 person records
        assert {collection for collection, _ in read} == {MEMBERS}
        assert (await store.scan(ARMING)).records == []  # done: nothing to arm again at the next start


async def test_a_publish_stopped_half_way_arms_every_member_once_at_the_next_start(world_factory, monkeypatch):
    # Pages of 50: the publish stops (the process killed) after its first page of arm commands is stored.
    monkeypatch.setattr(api_journeys, "ARM_PAGE", 50)
    persons = [f"m{n:03}" for n in range(200)]
    world = await world_factory()
    await world.start()
    for person in persons:
        await world.segment(person, "vip", wait=False)  # the engine writes their rows of the index

    async def indexed() -> bool:
        return len((await world.store.scan(MEMBERS, prefix="vip:", limit=1000)).records) == len(persons)

    await world.eventually(indexed, timeout=30)
    await world.stop()

    class Killed:
        """The bus of a process killed while it publishes its second page of commands."""

        def __init__(self) -> None:
            self.publisher = self
            self.pages = 0
            self.second = asyncio.Event()

        async def publish_batch(self, messages):
            self.pages += 1
            if self.pages == 1:
                return await world.bus.publisher.publish_batch(messages)
            self.second.set()
            await asyncio.Event().wait()  # never answered: the process dies here

    killed = Killed()
    api = OrchestrationApi(journeys=world.journeys, store=world.store, bus=killed, partitions=2)  # type: ignore[arg-type]
    await api.CreateJourney(pb.CreateJourneyRequest(definition=_definition(DIGEST)), None)
    publishing = asyncio.create_task(api.PublishJourney(pb.PublishJourneyRequest(journey_id="digest"), None))
    await asyncio.wait_for(killed.second.wait(), timeout=20)
    publishing.cancel()
    await asyncio.gather(publishing, return_exceptions=True)
    assert world.journeys.get("digest").live is not None  # published, 50 of 200 armed
    assert len((await world.store.scan(ARMING)).records) == 1

    # The next start (a new process: its own API over the same store and bus) arms them all.
    restarted = OrchestrationApi(journeys=Journeys(world.store), store=world.store, bus=world.bus, partitions=2)
    await restarted.journeys.load()
    assert await restarted.resume_arming() == 1
    assert (await world.store.scan(ARMING)).records == []
    assert await restarted.resume_arming() == 0

    # The engine applies the commands (the first page's twice: the same messages, deduplicated) with its clock
    # two seconds before a whole minute, the slot: each member enters once.
    inputs = len(await world.inputs())
    last = await world.stored(inputs)
    slot = ((last + world.clock_offset) // 60 + 2) * 60
    world.clock_offset = slot - 2 - last
    await world.start()

    async def entered() -> dict[str, int] | None:
        counts: dict[str, int] = {}
        async for record in world.store.scan_all(INSTANCES):
            counts[record.doc["person_id"]] = counts.get(record.doc["person_id"], 0) + 1
        return counts if len(counts) == len(persons) else None

    await world.eventually(entered, timeout=40)
    await world.eventually(world.settled)
    for person in persons:
        [instance] = await world.store.find(INSTANCES, "person_id", person)  # entered once
        assert instance.doc["entered_at"] >= slot  # at the slot


class Engine:
    """Orchestration's logic on one partition of a memory store, its writes applied as the pipeline commits
    them."""

    def __init__(self, store) -> None:
        self.store = store
        self.logic = OrchestrationLogic(store, Journeys(store), Rules(), partitions=1)
        self.at = 1_800_000_000.0

    async def apply(self, stream: str, data: bytes, what: str = "") -> None:
        self.at += 1
        effects = await self.logic.apply(0, [decode(stream, what, data, self.at)])
        await self.store.bulk_write(effects.writes)

    async def segment(self, person: str, segment_id: str, entered: bool) -> None:
        one = segmentation_pb2.SegmentEvent(
            id=f"c{self.at}", person_id=person, segment_id=segment_id, entered=entered, reason="time"
        )
        one.at.CopyFrom(from_seconds(self.at))
        await self.apply(subjects.SEGMENTS, segmentation_pb2.SegmentEventBatch(events=[one]).SerializeToString())

    async def forget(self, person: str) -> None:
        await self.apply("command", orjson.dumps({"person_id": person, "request_id": "r1"}), "forget")

    async def rows(self) -> list[str]:
        return [r.key for r in (await self.store.scan(MEMBERS, limit=100)).records if r.key != MEMBERS_BUILT]


async def test_the_engine_keeps_a_persons_rows_with_their_segments_and_a_deletion_drops_them():
    async with open_store("memory://") as store:
        await prepare_store(store)
        engine = Engine(store)
        await engine.segment("ann", "vip", True)
        await engine.segment("ann", "churn", True)
        await engine.segment("bob", "vip", True)
        assert await engine.rows() == ["churn:ann", "vip:ann", "vip:bob"]
        await engine.segment("ann", "vip", False)
        assert await engine.rows() == ["churn:ann", "vip:bob"]
        engine.logic.hot.clear()  # read back from the store: the rows follow the record as read
        await engine.segment("ann", "vip", True)
        await engine.segment("ann", "churn", False)
        assert await engine.rows() == ["vip:ann", "vip:bob"]
        await engine.forget("ann")
        assert await engine.rows() == ["vip:bob"]


async def test_a_record_an_earlier_build_wrote_after_the_index_was_built_gets_its_rows_at_the_persons_next_input():
    """A rolling upgrade: the index was built by a replica of this build while one of the earlier build still
    ran and wrote cy's record (in vip, no row). This build's engine writes her vip row at her next input, not
    only once she joins vip again."""
    async with open_store("memory://") as store:
        await prepare_store(store)
        await store.put(PERSONS, "cy", {"fields": {}, "segments": ["vip"]})
        engine = Engine(store)
        await engine.segment("cy", "churn", True)
        assert await engine.rows() == ["churn:cy", "vip:cy"]
        assert (await store.get(PERSONS, "cy")).doc["indexed"] == 1
        engine.logic.hot.clear()  # read back, marked: her rows as the record holds them
        await engine.segment("cy", "vip", False)
        assert await engine.rows() == ["churn:cy"]


async def test_a_person_forgotten_while_the_index_is_built_keeps_no_row():
    """Another replica's engine forgets ann between the index build reading her record and writing her rows:
    the build reads its page's persons again after the write and deletes the rows of those gone."""
    async with open_store("memory://") as store:
        await store.bulk_write([Put(PERSONS, p, {"fields": {}, "segments": ["vip"]}) for p in ("ann", "bob")])
        bulk_write = store.bulk_write

        async def forgotten_first(ops):
            if any(getattr(op, "collection", None) == MEMBERS for op in ops) and await store.get(PERSONS, "ann"):
                await bulk_write([Delete(PERSONS, "ann")])  # the other replica's forget, committed here
            return await bulk_write(ops)

        store.bulk_write = forgotten_first  # type: ignore[method-assign]
        await prepare_store(store)
        store.bulk_write = bulk_write  # type: ignore[method-assign]
        assert await Engine(store).rows() == ["vip:bob"]


async def test_a_forget_drops_the_rows_of_the_records_segments_though_its_read_of_the_rows_missed_them():
    """A forget that read the person's rows before the index build wrote them (a record of the earlier build,
    so the engine holds no rows for it either) still deletes them: by key, one per segment the record held."""
    async with open_store("memory://") as store:
        await prepare_store(store)
        await store.put(PERSONS, "ann", {"fields": {}, "segments": ["vip"]})
        engine = Engine(store)
        find = store.find

        async def rows_not_yet_written(collection, field, value, **kwargs):
            if collection == MEMBERS:
                found = await find(collection, field, value, **kwargs)
                await store.put(MEMBERS, "vip:ann", {"person_id": "ann"})  # the build's write, just after
                return found
            return await find(collection, field, value, **kwargs)

        store.find = rows_not_yet_written  # type: ignore[method-assign]
        await engine.forget("ann")
        assert await engine.rows() == []
