"""Identity on several replicas (writer.py): one writer at a time, the others standbys.

Two identity services share a real nats-server and a SQLite store and take identity's writer lease
through NATS KV (`CDP_OWNERSHIP=nats`). Events flow while the writer lease moves - once when the second
replica joins (the assignment may give it the lease), once when the writer stops - and every event
must come out on `events.resolved` exactly once, each user's events on one person, with never two
replicas working on partitions at once. A standby's API answers UNAVAILABLE; static ownership with
more than one replica does not start."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest

from cdp.events.v1 import events_pb2
from cdp.identity.v1 import identity_pb2, identity_pb2_grpc
from cdp_identity.__main__ import setup
from cdp_identity.settings import IdentitySettings
from cdp_kit.bus import Bus, OutMessage, events_raw_stream, partition_for, subjects
from cdp_kit.ownership import owned_by
from cdp_kit.service import serving
from cdp_kit.settings import SettingsError, load_settings

PARTITIONS = 4
USERS = 40
ROUNDS = 6  # events per user: identify, then page views by the anonymous id


def settings(nats_url: str, store_url: str, ordinal: int) -> IdentitySettings:
    return IdentitySettings(
        nats_url=nats_url,
        grpc_host="127.0.0.1",
        grpc_port=0,
        auth_mode="none",
        store_url=store_url,
        partitions=PARTITIONS,
        batch_size=20,
        ownership="nats",
        ownership_ttl=1.5,
        pod_name=f"identity-{ordinal}",
        pod_ordinal=ordinal,
        replicas=2,
        log_level="WARNING",
        shutdown_grace=1.0,
    )


class Replica:
    def __init__(self, settings: IdentitySettings) -> None:
        self._serving = serving(settings, setup)
        self.running = False

    async def start(self) -> Replica:
        self.runtime = await self._serving.__aenter__()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.runtime.grpc.port}")
        self.stub = identity_pb2_grpc.IdentityServiceStub(self.channel)
        self.running = True
        return self

    async def stop(self) -> None:
        if self.running:
            self.running = False
            await self.channel.close()
            await self._serving.__aexit__(None, None, None)

    def working_on(self) -> frozenset[int]:
        return frozenset(self.runtime.parts["partitioned"].pipelines) if self.running else frozenset()


def event(user: int, round_: int) -> events_pb2.Event:
    if round_ == 0:
        return events_pb2.Event(
            message_id=f"u{user}-r0",
            type=events_pb2.EVENT_TYPE_IDENTIFY,
            user_id=f"user-{user}",
            anonymous_id=f"a{user}",
        )
    return events_pb2.Event(message_id=f"u{user}-r{round_}", type=events_pb2.EVENT_TYPE_PAGE, anonymous_id=f"a{user}")


async def publish(bus: Bus, events: list[events_pb2.Event]) -> None:
    results = await bus.publisher.publish_batch(
        [
            OutMessage(
                subject=subjects.events_raw(partition_for(e.user_id or e.anonymous_id, PARTITIONS)),
                payload=e.SerializeToString(),
                msg_id=e.message_id,
            )
            for e in events
        ]
    )
    assert all(r.ok for r in results)


async def resolved(js) -> list[tuple[str, str]]:
    """(event message id, person id) of every event stored on events.resolved, duplicates included."""
    info = await js.stream_info(subjects.EVENTS_RESOLVED)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        if info.state.messages == 0:
            break
        msg = await js.get_msg(subjects.EVENTS_RESOLVED, seq)
        for item in events_pb2.ResolvedEventBatch.FromString(msg.data).events:
            out.append((item.event.message_id, item.person_id))
    return out


async def test_one_writer_at_a_time_and_every_event_resolved_once_while_the_lease_moves(nats_server, tmp_path):
    store_url = f"sqlite:///{tmp_path / 'identity.db'}"
    events = [event(u, r) for r in range(ROUNDS) for u in range(USERS)]
    first = await Replica(settings(nats_server.url, store_url, 0)).start()
    second = Replica(settings(nats_server.url, store_url, 1))
    replicas = [first, second]
    overlaps: list[tuple[frozenset[int], frozenset[int]]] = []

    async def watch() -> None:
        while True:
            working = [r.working_on() for r in replicas]
            if all(working):
                overlaps.append((working[0], working[1]))
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        async with Bus.connect(nats_server.url, name="test-publisher") as bus:
            await bus.ensure_streams(events_raw_stream())
            third = len(events) // 3
            await publish(bus, events[:third])
            await second.start()  # joins under traffic: the lease may move to it
            await publish(bus, events[third : 2 * third])
            # The lease goes where the assignment over both members puts it: wait for that replica to
            # work on every partition (after the handover, if it moved), then stop it under traffic.
            writer = first if owned_by(1, {"identity-0", "identity-1"}, "identity-0") else second
            standby = second if writer is first else first
            for _ in range(200):
                if writer.working_on() == frozenset(range(PARTITIONS)):
                    break
                await asyncio.sleep(0.05)
            assert writer.working_on() == frozenset(range(PARTITIONS)), "no replica became the writer"
            assert standby.working_on() == frozenset()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await standby.stub.Lookup(
                    identity_pb2.LookupRequest(identifier=identity_pb2.Identifier(type="user_id", value="user-1"))
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "standby" in refused.value.details()

            await publish(bus, events[2 * third :])
            await writer.stop()

            js = bus.js
            for _ in range(400):
                out = await resolved(js)
                if len(out) >= len(events):
                    break
                await asyncio.sleep(0.05)
            # A writer that stops drains what it fetched and frees the lease; the standby takes it at
            # its next round (the events may all be resolved by then).
            for _ in range(100):
                if standby.working_on() == frozenset(range(PARTITIONS)):
                    break
                await asyncio.sleep(0.05)
            assert standby.working_on() == frozenset(range(PARTITIONS)), "the standby took over"
            await asyncio.sleep(0.3)  # anything resolved twice would arrive now
            out = await resolved(js)
            lookup = await standby.stub.Lookup(
                identity_pb2.LookupRequest(identifier=identity_pb2.Identifier(type="anonymous_id", value="a7"))
            )
    finally:
        watcher.cancel()
        for replica in replicas:
            await replica.stop()

    assert overlaps == [], "two replicas worked on partitions at once"
    ids = [message_id for message_id, _ in out]
    assert sorted(ids) == sorted(e.message_id for e in events), "every event resolved exactly once"
    person_of = dict(out)
    for u in range(USERS):
        persons = {person_of[f"u{u}-r{r}"] for r in range(ROUNDS)}
        assert len(persons) == 1, f"user {u}'s events resolved to {len(persons)} persons"
    assert lookup.person_id == person_of["u7-r0"]


def test_static_ownership_refuses_more_than_one_replica():
    environ = {"CDP_NATS_URL": "nats://localhost:4222", "CDP_AUTH_MODE": "none", "CDP_REPLICAS": "2"}
    with pytest.raises(SettingsError) as refused:
        load_settings(IdentitySettings, environ)
    assert "CDP_REPLICAS=2 is invalid for identity" in str(refused.value)
    assert "CDP_OWNERSHIP=nats or kubernetes" in str(refused.value)
    leased = load_settings(IdentitySettings, {**environ, "CDP_OWNERSHIP": "nats"})
    assert leased.replicas == 2


async def health_of(replica: Replica, service: str) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    reply = await health_pb2_grpc.HealthStub(replica.channel).Check(health_pb2.HealthCheckRequest(service=service))
    return reply.status


async def test_readiness_follows_the_writer_lease_and_a_stopping_writer_hands_over_at_once(nats_server, tmp_path):
    # Kubernetes routes to ready pods: a standby's IdentityService is NOT_SERVING (its API refuses)
    # while its process stays SERVING for liveness. A writer stopped by SIGTERM frees the lease on its
    # way out, so the standby takes over at once - not after the TTL (30 s here).
    from grpc_health.v1 import health_pb2

    serving_, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    api = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name
    store_url = f"sqlite:///{tmp_path / 'identity.db'}"
    first = await Replica(dataclasses.replace(settings(nats_server.url, store_url, 0), ownership_ttl=30.0)).start()
    second = await Replica(dataclasses.replace(settings(nats_server.url, store_url, 1), ownership_ttl=30.0)).start()
    try:
        for _ in range(200):
            working = [r.working_on() for r in (first, second)]
            if frozenset(range(PARTITIONS)) in working and frozenset() in working:
                break
            await asyncio.sleep(0.05)
        writer, standby = (first, second) if first.working_on() else (second, first)
        assert writer.working_on() == frozenset(range(PARTITIONS))
        assert await health_of(writer, api) == serving_
        assert await health_of(standby, api) == not_serving
        assert await health_of(standby, "") == serving_

        await writer.stop()
        for _ in range(100):  # 10 s, a third of the TTL
            if standby.working_on() == frozenset(range(PARTITIONS)):
                break
            await asyncio.sleep(0.1)
        assert standby.working_on() == frozenset(range(PARTITIONS)), "the lease waited for its TTL"
        assert await health_of(standby, api) == serving_
    finally:
        await first.stop()
        await second.stop()
