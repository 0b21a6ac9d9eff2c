"""A world for the connector's service tests: a real nats-server with the upstream streams, the connector's
engine over a store, the local HubSpot, and helpers publishing what profile, segmentation and
orchestration would publish."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from cdp.orchestration.v1 import orchestration_pb2
from cdp.profile.v1 import profile_pb2
from cdp.segmentation.v1 import segmentation_pb2
from cdp_crm import streams
from cdp_crm.__main__ import HOLD_PAST_TIMEOUT
from cdp_crm.budgets import SharedBudget
from cdp_crm.connectors import open_adapters
from cdp_crm.delivery import HOLD_BACKOFF, Deliverer
from cdp_crm.domain.mapping import parse_connections
from cdp_crm.engine import SERVICE, CrmLogic
from cdp_crm.inbound import Collector, HubSpotPoller
from cdp_crm.state import prepare_store
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_kit.bus import Bus, OutMessage, dead_letter_stream, partition_for, profiles_stream, segments_stream, subjects
from cdp_kit.engine import EngineSpec, PartitionedEngine
from cdp_kit.storage import open_store
from cdp_kit.timestamps import from_seconds
from cdp_testing import waiting
from cdp_testing.crm import hubspot_document

PARTITIONS = 2
TOKEN = "pat-local-hubspot"


eventually = functools.partial(waiting.eventually, timeout=15.0)  # these tests wait up to 15 s unless they say


def salesforce_contacts(emulator, fields: dict[str, Any], **mapping: Any) -> dict[str, Any]:
    """A Salesforce connection (credentials from SF_ID / SF_SECRET) with one Contact mapping matched on
    CDP_Id__c: `fields`, and `mapping` added to it."""
    contacts = {"id": "contacts", "object": "Contact", "match": {"CDP_Id__c": "person.id"}, **mapping, "fields": fields}
    credentials = {"client_id": "SF_ID", "client_secret": "SF_SECRET"}
    return {
        "connections": [
            {
                "id": "sf",
                "kind": "salesforce",
                "url": emulator.base_url,
                "credentials": credentials,
                "mappings": [contacts],
            }
        ]
    }


class World:
    def __init__(self, bus: Bus, store, emulator: HubSpotEmulator, session: aiohttp.ClientSession) -> None:
        self.bus = bus
        self.store = store
        self.emulator = emulator
        self.session = session
        self.engine: PartitionedEngine | None = None
        self.logic: CrmLogic | None = None
        self.retrier: asyncio.Task | None = None
        self.sequence = 0

    eventually = staticmethod(eventually)
    partitions = PARTITIONS

    def document(self, **limits: Any) -> dict[str, Any]:
        return hubspot_document(self.emulator.base_url, **limits)

    async def start(
        self,
        document: dict[str, Any] | None = None,
        *,
        retry_for: float = 5.0,
        env: dict[str, str] | None = None,
        describe: bool = False,
        refresh: Any = None,
        identifiers: Any = None,
        ack_wait: float = 30.0,
        request_timeout: float = 2.0,
        partitions: int = PARTITIONS,
        hold_backoff: tuple[float, ...] = HOLD_BACKOFF,
        **limits: Any,
    ) -> PartitionedEngine:
        """`describe`: read the connections with each CRM's described schema, as the service does at start.
        `refresh`: the profile service's BatchGetProfiles as the connector reads it (people.Fetch);
        `identifiers`: the persons' identifiers it answers (people.Identifiers); `hold_backoff`: the steps
        between tries of a held connection (the process' by default)."""
        self.partitions = partitions
        document = document or hubspot_document(self.emulator.base_url, **limits)
        connections = parse_connections(document)
        adapters = open_adapters(
            connections, self.session, {"HUBSPOT_TOKEN": TOKEN, **(env or {})}, timeout=request_timeout
        )
        if describe:
            schemas = {c.id: await adapters[c.id].describe(sorted({m.object for m in c.mappings})) for c in connections}
            connections = parse_connections(document, {cid: schema for cid, schema in schemas.items() if schema})
        self.connections = connections
        # The CRM counts a request when it arrives: the margin covers a loaded test machine's delays. A grant
        # whose sender died (`abort`) is held as the process holds it: the request timeout and
        # HOLD_PAST_TIMEOUT (the budget's own default, 120 s, stranded the whole of a small burst for
        # longer than a test waits).
        hold = request_timeout + HOLD_PAST_TIMEOUT
        budgets = {c.id: SharedBudget(self.store, c, margin=0.2, hold=hold) for c in connections}
        deliverer = Deliverer(adapters, budgets, retry_for=retry_for, bulk_poll_seconds=0.02, hold_backoff=hold_backoff)
        self.logic = CrmLogic(self.store, connections, deliverer, refresh=refresh, identifiers=identifiers)
        spec = EngineSpec(
            service=SERVICE,
            stream=subjects.CRM,
            subject_prefix=subjects.CRM_IN_PREFIX,
            partitions=partitions,
            in_flight=1,
            fetch_timeout=0.2,
            ack_wait=ack_wait,
        )
        self.engine = PartitionedEngine(self.logic, spec, bus=self.bus, store=self.store)
        self.logic.engine = self.engine
        await self.engine.start()
        await self.engine.wait_ready()
        self.retrier = asyncio.create_task(self.logic.retry_forever(self.engine, 0.2))
        return self.engine

    async def start_with_list(self, **mapping: Any) -> str:
        """Start with the contacts mapping and a segment mirrored as a static HubSpot list ("high_value" ->
        a list made over HubSpot's own API, mapping `high-value`; `mapping` adds to or changes it). The list id."""
        headers = {"Authorization": f"Bearer {TOKEN}"}
        body = {"name": "CDP high value", "objectTypeId": "0-1", "processingType": "MANUAL"}
        async with self.session.post(f"{self.emulator.base_url}/crm/v3/lists", json=body, headers=headers) as answer:
            list_id = (await answer.json())["list"]["listId"]
        document = self.document()
        document["connections"][0]["mappings"].append(
            {"id": "high-value", "object": "contacts", "match": {"cdp_id": "person.id"}, "segment": "high_value",
             "list": list_id, "mode": "mirror", **mapping}
        )  # fmt: skip
        await self.start(document)
        return list_id

    async def stop(self) -> None:
        self._stop_retrier()
        if self.engine is not None:
            await self.engine.close()
            self.engine = None

    def _stop_retrier(self) -> None:
        if self.retrier is not None:
            self.retrier.cancel()
            self.retrier = None

    def abort(self) -> None:
        self._stop_retrier()
        assert self.engine is not None
        self.engine.abort()
        self.engine = None

    def hubspot_poller(self, collector) -> HubSpotPoller:
        """The inbound reader of the started HubSpot connection's contacts, posting to `collector`, on a budget
        of its own (the account's document in the store, shared with the engine's as in the process)."""
        (connection,) = self.connections
        return HubSpotPoller(
            self.store, connection, self.session, TOKEN, SharedBudget(self.store, connection),
            collector.client(self.session), objects=("contacts",),
        )  # fmt: skip

    def partition(self, person: str) -> int:
        return partition_for(person, self.partitions)

    async def _publish(self, subject: str, payload: bytes, msg_id: str | None = None) -> None:
        self.sequence += 1
        [result] = await self.bus.publisher.publish_batch(
            [OutMessage(subject, payload, msg_id or f"test-{self.sequence}-{time.time()}")]
        )
        assert result.ok, result.error

    async def profiles(self, changes: dict[str, dict[str, Any]]) -> None:
        """One ProfileChangedBatch per partition: person -> flat field updates (traits.x, scores.y; None: a
        trait removed)."""
        by_partition: dict[int, profile_pb2.ProfileChangedBatch] = {}
        for person, fields in changes.items():
            change = profile_pb2.ProfileChanged(person_id=person, cause="event", at=from_seconds(time.time()))
            for key, value in fields.items():
                root, _, name = key.partition(".")
                if root == "scores":
                    change.scores[name] = value
                elif value is None:  # the trait was removed
                    change.traits[name].null_value = 0
                else:
                    change.traits[name].string_value = str(value)
            by_partition.setdefault(self.partition(person), profile_pb2.ProfileChangedBatch()).changes.append(change)
        for partition, batch in by_partition.items():
            await self._publish(subjects.profiles_changed(partition), batch.SerializeToString())

    async def segment(self, person: str, segment: str, *, entered: bool = True) -> None:
        self.sequence += 1
        event = segmentation_pb2.SegmentEvent(
            id=f"seg-{self.sequence}", person_id=person, segment_id=segment, entered=entered, reason="event"
        )
        batch = segmentation_pb2.SegmentEventBatch(events=[event])
        p = self.partition(person)
        subject = subjects.segments_entered(p) if entered else subjects.segments_exited(p)
        await self._publish(subject, batch.SerializeToString())

    async def publish_action_again(self, person: str, action_id: str, subject: str) -> None:
        await self.action(person, action_id, subject, msg_id=f"{action_id}-again")

    async def action(
        self, person: str, action_id: str, subject: str, msg_id: str = "", from_profile: bool = False, **signals: str
    ) -> None:
        action = orchestration_pb2.ActionMessage(
            action_id=action_id,
            person_id=person,
            channel="crm",
            crm_kind="task",
            category="success",
            signals_from_profile=from_profile,
        )
        action.content["subject"] = subject
        for name, value in signals.items():
            action.signals.add(name=name, value=value)
        await self._publish(
            subjects.actions(subjects.CRM_CHANNEL, self.partition(person)),
            action.SerializeToString(),
            msg_id or action_id,
        )


@pytest.fixture
async def world_factory(nats_server, tmp_path):
    opened: list[Any] = []

    async def make(emulator: HubSpotEmulator) -> World:
        bus_cm = Bus.connect(nats_server.url, name="crm-test")
        bus = await bus_cm.__aenter__()
        await bus.ensure_streams(profiles_stream(), segments_stream(), dead_letter_stream())
        await streams.ensure_streams(bus.js)
        store = open_store(f"sqlite:///{tmp_path}/crm-{len(opened)}.db")
        await prepare_store(store)
        session = aiohttp.ClientSession()
        world = World(bus, store, emulator, session)
        opened.append((world, bus_cm))
        return world

    yield make
    for world, bus_cm in opened:
        await world.stop()
        await world.session.close()
        await world.store.close()
        await bus_cm.__aexit__(None, None, None)


WRITE_KEY = "crm-key"
# The collector's (and Segment's) limits: an event of more than 32 KB is refused, a request of more than 500 KB.
MAX_EVENT_BYTES = 32 * 1024
MAX_BATCH_BYTES = 500 * 1024


class CollectorStandIn:
    """The collector's /v1/batch as far as the connector relies on it: a write key, each messageId stored
    once (a repeat is answered as a duplicate), refusals and a 'kill' point on demand."""

    def __init__(self) -> None:
        self.stored: dict[str, dict] = {}
        self.posts = 0
        self.duplicates = 0
        self.refuse_next = 0
        self.hold_after: int | None = None  # posts answered before the next one hangs (the poller is killed there)
        self.held = asyncio.Event()
        self.released = asyncio.Event()
        self.url = ""
        self.delay = 0.0  # seconds each post takes (a collector under load)
        self.invalid: Callable[[dict], tuple[str, str] | None] | None = None  # event -> (code, field) refused
        app = web.Application(client_max_size=4 * MAX_BATCH_BYTES)  # over the limit: its own 413, as the collector's
        app.router.add_post("/v1/batch", self.batch)
        self.runner = web.AppRunner(app)

    async def batch(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Basic Y3JtLWtleTo=":  # "crm-key:"
            return web.json_response({"success": False, "code": "unauthorized"}, status=401)
        if self.refuse_next:
            self.refuse_next -= 1
            return web.json_response({"success": False, "code": "unavailable"}, status=503)
        if self.hold_after is not None and self.posts >= self.hold_after:
            self.held.set()
            await self.released.wait()  # the poller is killed while waiting; nothing of this post is stored
            return web.json_response({"success": False, "code": "unavailable"}, status=503)
        body = await request.read()
        if self.delay:
            await asyncio.sleep(self.delay)
        if len(body) > MAX_BATCH_BYTES:
            return web.json_response({"success": False, "code": "request_too_large"}, status=413)
        self.posts += 1
        batch, rejected = orjson.loads(body)["batch"], []
        for event in batch:
            if len(orjson.dumps(event)) > MAX_EVENT_BYTES:
                rejected.append({"messageId": event["messageId"], "code": "event_too_large"})
                continue
            refusal = self.invalid(event) if self.invalid is not None else None
            if refusal is not None:
                code, field = refusal
                rejected.append({"messageId": event["messageId"], "code": code, "field": field, "message": "invalid"})
                continue
            if event["messageId"] in self.stored:
                self.duplicates += 1
            else:
                self.stored[event["messageId"]] = event
        if rejected:  # the others are stored, as the collector does
            return web.json_response({"success": False, "code": "invalid_events", "rejected": rejected}, status=400)
        return web.json_response({"success": True})

    def events(self, name: str | None = None, kind: str = "track") -> list[dict]:
        return [e for e in self.stored.values() if e["type"] == kind and (name is None or e.get("event") == name)]

    def names(self) -> list[str]:
        return [e["event"] for e in self.stored.values() if e["type"] == "track"]

    def client(self, session: aiohttp.ClientSession) -> Collector:
        return Collector(session, self.url, WRITE_KEY)

    async def kill_mid_page(self, poll: Callable, after_posts: int) -> None:
        """Run a poll until this collector has taken `after_posts` posts and the next is in flight, then
        kill it (cancel: nothing after that point runs, as with SIGKILL)."""
        self.hold_after = after_posts
        self.held.clear()
        self.released.clear()
        task = asyncio.ensure_future(poll())
        await asyncio.wait_for(self.held.wait(), 20)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self.hold_after = None
        self.released.set()


@pytest.fixture
async def collector():
    stand_in = CollectorStandIn()
    await stand_in.runner.setup()
    site = web.TCPSite(stand_in.runner, "127.0.0.1", 0)
    await site.start()
    stand_in.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    yield stand_in
    await stand_in.runner.cleanup()
