"""Identity on several replicas (writer.py): one writer at a time, the others standbys.

Two identity services share a real nats-server and a SQLite store and take identity's writer lease
through NATS KV (`CDP_OWNERSHIP=nats`). Events flow while the writer lease moves - once when the second
replica joins (the assignment may give it the lease), once when the writer stops - and every event
must come out on `events.resolved` exactly once, each user's events on one person, with never two
replicas working on partitions at once. A standby's API answers UNAVAILABLE; static ownership with
more than one replica does not start; a writer whose release is cut short (its lease lost) stops
every partition.

The writer may fence itself meanwhile, as the ownership protocol allows (`cdp_kit.ownership.leased`): a
round that renews TTL/2 (0.75 s) or more after the last one began - rounds come TTL/3 apart, so a stall
of the process of 0.25 s less the rounds' own time does it, and a loaded machine gives that - lets go
of the lease and takes it back a round later, a standby in between. So the test asks the writer's API
only once it works on every partition, and asks again only when a fence of that replica since it took
the lease explains a refusal. Each assertion's message says where things stood: the replicas'
partitions as they changed, fences, failed rounds and cut releases."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import grpc
import pytest

from cdp.events.v1 import events_pb2
from cdp.identity.v1 import identity_pb2, identity_pb2_grpc
from cdp_identity.__main__ import setup
from cdp_identity.settings import IdentitySettings
from cdp_identity.writer import WRITER_LEASE, OneWriter
from cdp_kit.bus import Bus, OutMessage, events_raw_stream, partition_for, subjects
from cdp_kit.ownership import Ownership, owned_by
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


class Story(logging.Handler):
    """Where things stood: each replica's partitions as they changed, and the ownership warnings and errors
    of both (fences, failed rounds, cut releases), in seconds since the test began. Pod names only."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.began = time.monotonic()
        self.lines: list[str] = []
        self.fences: dict[str, int] = {}

    def now(self) -> float:
        return round(time.monotonic() - self.began, 3)

    def emit(self, record: logging.LogRecord) -> None:
        member = getattr(record, "member", "")
        if "not renewed in time" in record.msg:
            self.fences[member] = self.fences.get(member, 0) + 1
        partition = getattr(record, "partition", None)
        where = f" p{partition}" if partition is not None else ""
        error = getattr(record, "error", None)
        why = f" ({error})" if error else ""
        self.lines.append(f"{self.now()} {member}{where} {record.levelname}: {record.msg}{why}")

    def __str__(self) -> str:
        return "\n".join(["where things stood (s since start):", *self.lines])


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


async def ask_writer(replica: Replica, request: identity_pb2.LookupRequest, story: Story, name: str, fences: int):
    """`replica`'s answer once it works on every partition. It was a standby when it had fenced `fences`
    times, and a standby holds no lease to fence: a refusal as standby is asked again only when the replica
    fenced itself since (it takes the lease back a round later), once per fence."""
    for _ in range(10):
        for _ in range(200):
            if replica.working_on() == frozenset(range(PARTITIONS)):
                break
            await asyncio.sleep(0.05)
        assert replica.working_on() == frozenset(range(PARTITIONS)), f"{name} is not the writer\n{story}"
        try:
            return await replica.stub.Lookup(request)
        except grpc.aio.AioRpcError as refused:
            story.lines.append(f"{story.now()} {name} Lookup refused: {refused.code().name}")
            if refused.code() != grpc.StatusCode.UNAVAILABLE or story.fences.get(name, 0) <= fences:
                raise AssertionError(f"the writer {name} refused a Lookup it did not fence for\n{story}") from refused
            fences = story.fences.get(name, 0)
    raise AssertionError(f"the writer {name} fenced itself on every Lookup\n{story}")


async def test_one_writer_at_a_time_and_every_event_resolved_once_while_the_lease_moves(nats_server, tmp_path):
    store_url = f"sqlite:///{tmp_path / 'identity.db'}"
    events = [event(u, r) for r in range(ROUNDS) for u in range(USERS)]
    story = Story()
    ownership_log = logging.getLogger("cdp.ownership")
    ownership_log.addHandler(story)
    first = await Replica(settings(nats_server.url, store_url, 0)).start()
    second = Replica(settings(nats_server.url, store_url, 1))
    replicas = [first, second]
    overlaps: list[tuple[frozenset[int], frozenset[int]]] = []

    async def watch() -> None:
        was = [frozenset(), frozenset()]
        while True:
            working = [r.working_on() for r in replicas]
            for ordinal, (before, now) in enumerate(zip(was, working, strict=True)):
                if now != before:
                    story.lines.append(f"{story.now()} identity-{ordinal} works on {sorted(now)}")
            was = working
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
            standby_name = "identity-1" if writer is first else "identity-0"
            for _ in range(200):
                if writer.working_on() == frozenset(range(PARTITIONS)):
                    break
                await asyncio.sleep(0.05)
            assert writer.working_on() == frozenset(range(PARTITIONS)), f"no replica became the writer\n{story}"
            assert standby.working_on() == frozenset(), f"the standby works\n{story}"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await standby.stub.Lookup(
                    identity_pb2.LookupRequest(identifier=identity_pb2.Identifier(type="user_id", value="user-1"))
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "standby" in refused.value.details()

            await publish(bus, events[2 * third :])
            standby_fences = story.fences.get(standby_name, 0)
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
            assert standby.working_on() == frozenset(range(PARTITIONS)), f"the standby did not take over\n{story}"
            await asyncio.sleep(0.3)  # anything resolved twice would arrive now
            out = await resolved(js)
            lookup = await ask_writer(
                standby,
                identity_pb2.LookupRequest(identifier=identity_pb2.Identifier(type="anonymous_id", value="a7")),
                story,
                standby_name,
                standby_fences,
            )
    finally:
        watcher.cancel()
        for replica in replicas:
            await replica.stop()
        ownership_log.removeHandler(story)

    assert overlaps == [], f"two replicas worked on partitions at once: {overlaps[:3]}\n{story}"
    ids = [message_id for message_id, _ in out]
    expected = sorted(e.message_id for e in events)
    twice = sorted({i for i in ids if ids.count(i) > 1})
    missing = sorted(set(expected) - set(ids))
    assert sorted(ids) == expected, (
        f"every event resolved exactly once: {len(ids)} resolved of {len(expected)}, twice {twice[:10]}, "
        f"missing {missing[:10]}\n{story}"
    )
    person_of = dict(out)
    for u in range(USERS):
        persons = {person_of[f"u{u}-r{r}"] for r in range(ROUNDS)}
        assert len(persons) == 1, f"user {u}'s events resolved to {len(persons)} persons\n{story}"
    assert lookup.person_id == person_of["u7-r0"], f"the writer's Lookup answered another person\n{story}"


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


class DrivenLease(Ownership):
    """The writer lease's ownership, its callbacks driven by the test as a lease store's rounds would."""

    async def start(self, on_acquire, on_release) -> None:
        self.on_acquire, self.on_release = on_acquire, on_release

    async def stop(self) -> None:
        pass

    def owned(self) -> frozenset[int]:
        return frozenset()

    async def changes(self):
        yield frozenset()


@pytest.mark.parametrize("cut_while", ["stop_writing", "draining"])
async def test_a_writer_release_cut_short_stops_every_partition(cut_while):
    # The ownership cuts a release whose lease was lost (cancels on_release: `cdp_kit.ownership.leased`),
    # and the replica must then stop working on every partition at once. Cut while the queued writes
    # landed (stop_writing), the partitions' releases never began: every pipeline worked on without the
    # lease, on after the standby took it once the TTL passed - two writers (seen looping the test above
    # under injected event-loop stalls: "the standby works" while the fenced writer's four pipelines ran).
    working: set[int] = set()
    aborted: set[int] = set()
    landing, draining = asyncio.Event(), asyncio.Event()

    async def start_partition(p: int) -> None:
        working.add(p)

    def stop_partition(p: int):
        working.discard(p)  # as the engine's: the partition stops fetching when its release is called

        async def drain() -> None:
            try:
                draining.set()
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                aborted.add(p)  # as the engine's: aborted as a crash would abort it
                raise

        return drain()

    async def stop_writing() -> None:
        landing.set()
        if cut_while == "stop_writing":
            await asyncio.Event().wait()

    lease = DrivenLease()

    async def become_writer() -> None:
        pass

    writer = OneWriter(lease, partitions=PARTITIONS, become_writer=become_writer, stop_writing=stop_writing)
    await writer.start(start_partition, stop_partition)
    await lease.on_acquire(WRITER_LEASE)
    assert working == set(range(PARTITIONS))

    release = asyncio.create_task(lease.on_release(WRITER_LEASE))
    await (landing if cut_while == "stop_writing" else draining).wait()
    release.cancel()  # the cut
    with pytest.raises(asyncio.CancelledError):
        await release
    assert working == set(), "a partition worked on after its release was cut"
    assert aborted == set(range(PARTITIONS)), "every partition's release was cut, none drained on"
    assert writer.owned() == frozenset()
