"""Publishing a version with migration, and archiving, read the journey's own instances only.

Both send a command to the engine of each running instance of the journey (migrate it by node id; end it
"archived"). They found those instances by scanning every instance of every journey, running or ended, and
publishing did it once per earlier version: at a customer's hundreds of journeys, millions of records per
publish. Counted here: the instance records the store hands the API (its `_find` and `_scan`, spied on),
over a memory store with the service's indexes; commands go to a bus that only records them.
"""

from __future__ import annotations

from typing import Any

import orjson

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_kit.storage import Put, open_store
from cdp_orchestration.api import OrchestrationApi
from cdp_orchestration.domain import lifecycle
from cdp_orchestration.domain.document import parse_journey
from cdp_orchestration.domain.instance import Instance, Status
from cdp_orchestration.domain.records import instance_record
from cdp_orchestration.journeys import Journeys
from cdp_orchestration.state import INSTANCES, prepare_store


def journey(journey_id: str, version: int, duration: str = "1d") -> dict[str, Any]:
    return {
        "id": journey_id,
        "version": version,
        "name": journey_id,
        "entry": {"event": f"{journey_id} started"},
        "reentry": "always",
        "nodes": [{"id": "wait", "type": "delay", "duration": duration}],
    }


class Published:
    """A bus whose publisher keeps the commands."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, dict]] = []
        self.publisher = self

    async def publish_batch(self, messages):
        for message in messages:
            self.commands.append((message.headers["Cdp-Command"], orjson.loads(message.payload)))
        return [type("Ok", (), {"ok": True})() for _ in messages]


def instance(journey_id: str, version: int, n: int, status: Status = Status.RUNNING) -> Instance:
    return Instance(f"i-{journey_id}-{n}", journey_id, version, f"p{n}", status=status, node="wait", entered_at=1.0)


async def test_publishing_and_archiving_read_only_the_journeys_own_instances():
    async with open_store("memory://") as store:
        await prepare_store(store)
        journeys = Journeys(store)
        bus = Published()
        api = OrchestrationApi(journeys=journeys, store=store, bus=bus, partitions=2)  # type: ignore[arg-type]
        for journey_id in ("other", "slow"):
            await journeys.save(lifecycle.publish(lifecycle.create(parse_journey(journey(journey_id, 1)))))
        record = journeys.get("slow")
        await journeys.save(lifecycle.publish(lifecycle.save_draft(record, parse_journey(journey("slow", 2)))))
        # Another journey's 300 instances; slow's: 3 on v1, 2 on v2, and 4 ended.
        mine = [instance("slow", 1, n) for n in range(3)] + [instance("slow", 2, n) for n in range(3, 5)]
        ended = [instance("slow", 1, n, Status.ENDED) for n in range(5, 9)]
        others = [instance("other", 1, n) for n in range(300)]
        await store.bulk_write([Put(INSTANCES, i.id, instance_record(i)) for i in [*others, *mine, *ended]])

        read: list[str] = []
        find, scan = store._find, store._scan

        async def counting_find(collection, *args):
            found = await find(collection, *args)
            read.extend(r.key for r in found if collection == INSTANCES)
            return found

        async def counting_scan(collection, *args):
            page = await scan(collection, *args)
            read.extend(r.key for r in page.records if collection == INSTANCES)
            return page

        store._find, store._scan = counting_find, counting_scan  # type: ignore[method-assign]

        # v3 keeps the node "wait": the running instances of v1 and v2 are moved, each once.
        await api.UpdateJourney(
            pb.UpdateJourneyRequest(
                journey_id="slow", definition=pb.JourneyDefinition(json=orjson.dumps(journey("slow", 3, "2d")).decode())
            ),
            None,
        )
        await api.PublishJourney(
            pb.PublishJourneyRequest(journey_id="slow", migration=pb.MIGRATION_MAP_BY_NODE_ID), None
        )
        assert sorted(read) == sorted(i.id for i in [*mine, *ended])  # was the 309 instances, once per version
        assert sorted((body["instance_id"], body["from_version"]) for _, body in bus.commands) == sorted(
            (i.id, i.version) for i in mine
        )

        read.clear()
        bus.commands.clear()
        await api.ArchiveJourney(pb.JourneyRef(journey_id="slow"), None)
        assert sorted(read) == sorted(i.id for i in [*mine, *ended])  # was the 309
        assert sorted((name, body["instance_id"]) for name, body in bus.commands) == sorted(
            ("exit", i.id) for i in mine
        )
