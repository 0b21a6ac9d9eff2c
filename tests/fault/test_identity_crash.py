"""Kill the identity service mid-stream (mid-merge, mid-write), restart it, and compare the graph with a
reference built by applying the same events in order to the domain model in memory.

One partition keeps one global order, so the reference is exact: whatever the crash interrupted, the
restarted service must end with the same partition of identifiers, no identifier on two persons, a
resolved event for every raw event, and as many of identity's own "Identifier Shared" events (persons told
that a device they used now has a new person on it) as the reference tells: none lost, none told twice.
"""

from __future__ import annotations

import asyncio
import random

import nats
import pytest
from nats.js.errors import NotFoundError

from cdp.events.v1 import events_pb2
from cdp_identity.domain.graph import IdentityGraph
from cdp_identity.domain.normalize import Normalizer
from cdp_identity.domain.rules import MergeRules
from cdp_identity.extract import Extractor
from cdp_kit.bus import events_raw_stream
from cdp_kit.bus.streams import ensure_stream
from cdp_kit.storage import open_store
from cdp_testing.processes import IdentityProcess

EVENTS = 6_000


def random_events(seed: int) -> list[events_pb2.Event]:
    rng = random.Random(seed)
    users = [f"u-{i}" for i in range(300)]
    anons = [f"a-{i}" for i in range(900)]
    devices = [f"d-{i}" for i in range(60)]
    out = []
    for i in range(EVENTS):
        ev = events_pb2.Event(message_id=f"e{i}", source_id="crash")
        ev.timestamp.FromMilliseconds(1_700_000_000_000 + i * 1000)
        roll = rng.random()
        if roll < 0.35:
            ev.type = events_pb2.EVENT_TYPE_IDENTIFY
            ev.user_id, ev.anonymous_id = rng.choice(users), rng.choice(anons)
            if rng.random() < 0.5:
                ev.traits.update({"email": f"{rng.choice(users)}@example.com"})
        elif roll < 0.45:
            ev.type = events_pb2.EVENT_TYPE_ALIAS
            ev.user_id, ev.previous_id = rng.choice(users), rng.choice(anons)
        else:
            ev.type = events_pb2.EVENT_TYPE_TRACK
            ev.event = "Viewed"
            ev.anonymous_id = rng.choice(anons)
            if rng.random() < 0.3:
                ev.user_id = rng.choice(users)
            if rng.random() < 0.4:
                ev.context.device.id = rng.choice(devices)
        out.append(ev)
    return out


def reference(events: list[events_pb2.Event]) -> tuple[set[frozenset[str]], int]:
    """The partition of identifiers after every event, and how many persons identity tells on the way."""
    rules = MergeRules.default()
    graph, normalizer, extractor = IdentityGraph(rules), Normalizer(rules), Extractor(rules)
    told = 0
    for ev in events:
        # Alias previous ids here are always anonymous ids (no user id looks like "a-…").
        pairs = [("anonymous_id", v) if k == "previous" else (k, v) for k, v in extractor.extract(ev)]
        identifiers, _ = normalizer.normalize(pairs)
        resolution = graph.resolve(identifiers, event_id=f"crash:{ev.message_id}", at=ev.timestamp.ToMilliseconds())
        told += len(resolution.told) if resolution is not None else 0
    return set(graph.partition().values()), told


async def stored_partition(store_url: str) -> set[frozenset[str]]:
    graph = IdentityGraph(MergeRules.default())
    async with open_store(store_url) as store:
        for collection, load in (
            ("identity_identifiers", graph.load_identifier),
            ("identity_persons", graph.load_person),
        ):
            async for record in store.scan_all(collection, page_size=5000):
                load(record.key, record.doc)
    owners: dict[str, str] = {}
    for root, person in graph.persons.items():
        if person.merged_into is None:
            for key in person.ids:
                assert key not in owners, f"{key} is on two persons: {owners[key]} and {root}"
                owners[key] = root
    partition = graph.partition()
    for root, keys in partition.items():
        assert set(graph.persons[root].ids) == set(keys), f"{root}'s identifier list disagrees with the graph"
    return set(partition.values())


async def resolved_ids(js) -> list[str]:
    """The message ids of every resolved event published (with repeats, if any)."""
    info = await js.stream_info("EVENTS_RESOLVED")
    ids = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg("EVENTS_RESOLVED", seq)
        batch = events_pb2.ResolvedEventBatch.FromString(msg.data)
        ids.extend(f"{r.event.source_id}:{r.event.message_id}" for r in batch.events)
    return ids


async def processed(js) -> int:
    """Raw events the service has applied and acknowledged."""
    try:
        return (await js.consumer_info("EVENTS_RAW", "identity-p0")).ack_floor.stream_seq
    except NotFoundError:
        return 0


@pytest.mark.timeout(240)
async def test_killed_mid_stream_restarts_to_the_reference_graph(nats_server, tmp_path):
    events = random_events(seed=5)
    store_url = f"sqlite:///{tmp_path / 'identity.db'}"
    service = IdentityProcess(
        nats_server.url,
        tmp_path,
        store_url=store_url,
        partitions=1,
        CDP_IDENTITY_BATCH_SIZE="200",
        CDP_IDENTITY_ACK_WAIT="1",
    )
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    try:
        await ensure_stream(js, events_raw_stream())
        for ev in events:
            await js.publish("events.raw.0", ev.SerializeToString(), headers={"Nats-Msg-Id": f"crash:{ev.message_id}"})
        service.start()

        async def progress() -> int:
            return await processed(js)

        kills = 0
        for _ in range(5):  # kill whenever it has made some progress, five times
            target = min(await progress() + 400, EVENTS)
            for _ in range(20_000):
                if await progress() >= target:
                    break
                await asyncio.sleep(0.01)
            if await progress() >= EVENTS:
                break
            service.kill()
            kills += 1
            service.start()
        for _ in range(600):
            if await progress() >= EVENTS:
                break
            await asyncio.sleep(0.1)
        service.stop()
        assert kills >= 3, "the service finished before it could be killed; make the stream longer"
        published = set(await resolved_ids(js))
        partition, told = reference(events)
        assert {i for i in published if i.startswith("crash:")} == {f"crash:{ev.message_id}" for ev in events}, (
            "an event was lost"
        )
        own = {i for i in published if not i.startswith("crash:")}
        assert all(i.startswith("identity:") for i in own)
        assert told > 0  # the stream shares devices between persons: the count below is not vacuous
        assert len(own) == told, "an Identifier Shared event was lost or told twice under another id"
        assert await stored_partition(store_url) == partition
    finally:
        service.stop()
        await nc.close()
