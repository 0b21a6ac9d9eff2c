"""The engine's write-behind against a real nats-server and the memory store: a write that loses a
version race to another replica fails its batch, and the retry applies on the store's state."""

from __future__ import annotations

import asyncio
import base64

import pytest
from google.protobuf import json_format
from opentelemetry import metrics, trace

from cdp.events.v1 import events_pb2
from cdp.identity.v1 import identity_pb2
from cdp_identity.domain.rules import MergeRules
from cdp_identity.engine import OUTBOX, PERSONS, IdentityEngine
from cdp_kit.bus import Bus, PubResult, events_resolved_stream, identity_stream
from cdp_kit.engine import outbox
from cdp_kit.errors import Unavailable
from cdp_kit.storage import VersionConflict, open_store
from cdp_kit.telemetry import Telemetry


@pytest.fixture
async def engine(nats_server):
    async with open_store("memory://") as store, Bus.connect(nats_server.url, name="engine-test") as bus:
        await bus.ensure_streams(identity_stream(), events_resolved_stream())
        engine = IdentityEngine(MergeRules.default(), store, bus.publisher, partitions=4, telemetry=bus.telemetry)
        await engine.start()
        yield engine


async def test_a_lost_write_race_fails_the_batch_and_the_retry_sees_the_other_write(engine):
    first, _ = await engine.resolve([("user_id", "u1"), ("email", "a@example.com")], request_id="r1", at=1_000)
    person = first.person
    # Another replica changes the same person behind this one's cache.
    record = await engine.store.get(PERSONS, person)
    changed = {**record.doc, "drops": [{"identifier": "x", "reason": "other-replica", "event_id": "e", "at": 1}]}
    await engine.store.put(PERSONS, person, changed, expected_version=record.version)

    with pytest.raises(VersionConflict):
        await engine.resolve([("user_id", "u1"), ("anonymous_id", "a1")], request_id="r2", at=2_000)
    retried, _ = await engine.resolve([("user_id", "u1"), ("anonymous_id", "a1")], request_id="r2", at=2_000)

    assert retried.person == person
    stored = (await engine.store.get(PERSONS, person)).doc
    assert {key for key, _at, _owner in stored["ids"]} == {"user_id:u1", "email:a@example.com", "anonymous_id:a1"}
    assert stored["drops"][0]["reason"] == "other-replica", "the other replica's write survives"


async def test_writes_queue_in_order_and_all_become_durable(engine):
    for i in range(50):
        await engine.resolve([("user_id", "u1"), ("anonymous_id", f"a{i}")], request_id=f"r{i}", at=1_000 + i)
    stored = (await engine.store.get(PERSONS, (await engine.canonical(engine.graph.person_of("user_id:u1"))))).doc
    assert len(stored["ids"]) == 51


class StreamDelivery:
    """A delivery as the consumer runner hands it over (data, id, subject, stream position), built
    directly so a test can choose the order in which partitions arrive."""

    def __init__(self, event: events_pb2.Event, subject: str, seq: int) -> None:
        self.data = event.SerializeToString()
        self.msg_id = f"test:{event.message_id}"
        self.headers = {"Nats-Msg-Id": self.msg_id}  # one event: not marked as several
        self.subject = subject
        self.stream_seq = seq

    def reject(self, reason: str, detail: str = "") -> None:
        raise AssertionError(f"rejected: {reason} {detail}")


def identify(message_id: str, user: str, anon: str) -> events_pb2.Event:
    return events_pb2.Event(message_id=message_id, type=events_pb2.EVENT_TYPE_IDENTIFY, user_id=user, anonymous_id=anon)


async def test_each_partition_keeps_its_own_checkpoint(engine):
    # events.raw.1 holds the stream's first sequences but is applied after events.raw.0 got far ahead:
    # its events are new, not replays, and must change the graph.
    later = [StreamDelivery(identify(f"p0-{i}", f"u{i}", f"a{i}"), "events.raw.0", 100 + i) for i in range(5)]
    earlier = [StreamDelivery(identify(f"p1-{i}", f"v{i}", f"b{i}"), "events.raw.1", 1 + i) for i in range(5)]
    await engine.handle(later)
    await engine.handle(earlier)
    for i in range(5):
        assert engine.graph.person_of(f"anonymous_id:b{i}") == engine.graph.person_of(f"user_id:v{i}") is not None
    assert engine.applied == {"events.raw.0": 104, "events.raw.1": 5}


async def test_a_redelivered_batch_is_resolved_again_without_changing_the_graph(engine):
    batch = [StreamDelivery(identify(f"e{i}", f"u{i}", f"a{i}"), "events.raw.2", 10 + i) for i in range(3)]
    await engine.handle(batch)
    before = engine.graph.partition()
    stored = await engine.store.get(PERSONS, engine.graph.person_of("user_id:u0"))
    await engine.handle(batch)  # the ack was lost: JetStream delivers the same messages again
    assert engine.graph.partition() == before
    assert (await engine.store.get(PERSONS, engine.graph.person_of("user_id:u0"))).version == stored.version


class GatedStore:
    """The memory store with its next `holds` bulk writes held until the test lets each through."""

    def __init__(self, store, holds: int) -> None:
        self._store = store
        self.holds = holds
        self.held: list[asyncio.Event] = []
        self.arrived = asyncio.Event()

    def __getattr__(self, name):
        return getattr(self._store, name)

    async def bulk_write(self, ops):
        if len(self.held) >= self.holds:
            return await self._store.bulk_write(ops)
        gate = asyncio.Event()
        self.held.append(gate)
        self.arrived.set()
        await gate.wait()
        return await self._store.bulk_write(ops)

    async def wait_for_writes(self, n: int) -> None:
        while len(self.held) < n:
            self.arrived.clear()
            await self.arrived.wait()


class RecordingPublisher:
    def __init__(self) -> None:
        self.subjects: list[str] = []
        self.messages: list = []

    async def publish_batch(self, messages):
        self.subjects.extend(m.subject for m in messages)
        self.messages.extend(messages)
        return [PubResult(seq=n) for n, _ in enumerate(messages, 1)]


async def test_a_merge_written_while_another_write_publishes_the_outbox_is_not_stranded():
    async with open_store("memory://") as memory:
        publisher = RecordingPublisher()
        engine = IdentityEngine(
            MergeRules.default(),
            memory,
            publisher,
            partitions=1,
            telemetry=Telemetry("identity-test", trace.get_tracer("identity-test"), metrics.get_meter("identity-test")),
        )
        await engine.start()
        await engine.resolve([("user_id", "u1")], request_id="r0", at=1_000)
        await engine.resolve([("anonymous_id", "a1")], request_id="r1", at=1_000)
        gated = engine.store = GatedStore(memory, holds=2)

        # A write with no notification is queued and held; behind it, the write of a merge.
        plain = asyncio.create_task(engine.resolve([("user_id", "u2")], request_id="r2", at=2_000))
        await gated.wait_for_writes(1)
        merging = asyncio.create_task(
            engine.resolve([("user_id", "u1"), ("anonymous_id", "a1")], request_id="r3", at=3_000)
        )
        await asyncio.sleep(0)  # the merge takes the engine lock first ...
        async with engine.lock:  # ... and has applied the merge in memory and queued its write once it is free
            assert any(person.lineage for person in engine.graph.persons.values())
        # The first write lands and its caller publishes the outbox before the merge's write has landed.
        gated.held[0].set()
        await plain
        await gated.wait_for_writes(2)
        gated.held[1].set()
        await merging

        assert publisher.subjects == ["identity.merged.0"]
        assert [r async for r in memory.scan_all(OUTBOX)] == []


class UnreachablePublisher:
    async def publish_batch(self, messages):
        return [PubResult(error="no responders") for _ in messages]


def quiet_telemetry() -> Telemetry:
    return Telemetry("identity-test", trace.get_tracer("identity-test"), metrics.get_meter("identity-test"))


async def test_an_api_notification_a_crash_left_unpublished_is_published_by_the_next_start():
    async with open_store("memory://") as store:
        before = IdentityEngine(
            MergeRules.default(), store, UnreachablePublisher(), partitions=1, telemetry=quiet_telemetry()
        )
        await before.start()
        await before.resolve([("user_id", "u1")], request_id="r0", at=1_000)
        await before.resolve([("anonymous_id", "a1")], request_id="r1", at=1_000)
        with pytest.raises(Unavailable):  # the merge is durable, its notification not yet on the bus
            await before.resolve([("user_id", "u1"), ("anonymous_id", "a1")], request_id="r2", at=2_000)
        (waiting,) = [r async for r in store.scan_all(OUTBOX)]
        # One outbox format: the kit's engine reads the API's record as it reads a batch's.
        assert [m.subject for m in outbox.messages_of(waiting)] == ["identity.merged.0"]

        publisher = RecordingPublisher()
        after = IdentityEngine(MergeRules.default(), store, publisher, partitions=1, telemetry=quiet_telemetry())
        await after.start()
        assert publisher.subjects == ["identity.merged.0"]
        assert [r async for r in store.scan_all(OUTBOX)] == []


async def test_notifications_an_older_version_left_in_the_outbox_are_published_at_start():
    """Before one outbox format, each notification was its own record (`subject`, `payload`)."""
    merged = identity_pb2.IdentityMerged(merge_id="m1", winner="p_1", loser="p_2").SerializeToString()
    async with open_store("memory://") as store:
        await store.put(
            OUTBOX,
            "merge:m1",
            {"subject": "identity.merged", "payload": base64.b64encode(merged).decode(), "at": 1.0, "n": 0},
        )
        publisher = RecordingPublisher()
        engine = IdentityEngine(MergeRules.default(), store, publisher, partitions=1, telemetry=quiet_telemetry())
        await engine.start()
        assert publisher.subjects == ["identity.merged"]
        assert [r async for r in store.scan_all(OUTBOX)] == []


class HeldRead:
    """The memory store, with the first read of persons answered from the store as it was, but handed
    over only when the test says so (a batch's reads overtaken by a privacy purge)."""

    def __init__(self, store) -> None:
        self._store = store
        self.read = asyncio.Event()
        self.release = asyncio.Event()
        self.holding = True

    def __getattr__(self, name):
        return getattr(self._store, name)

    async def get_many(self, collection, keys):
        records = await self._store.get_many(collection, keys)
        if self.holding and collection == PERSONS:
            self.holding = False
            self.read.set()
            await self.release.wait()
        return records


async def test_a_batch_read_before_a_purge_landed_does_not_bring_the_purged_person_back():
    async with open_store("memory://") as memory:
        first = IdentityEngine(
            MergeRules.default(), memory, RecordingPublisher(), partitions=1, telemetry=quiet_telemetry()
        )
        await first.start()
        ada, _ = await first.resolve([("user_id", "ada"), ("email", "ada@example.com")], request_id="r0", at=1_000)

        held = HeldRead(memory)
        engine = IdentityEngine(
            MergeRules.default(), held, RecordingPublisher(), partitions=1, telemetry=quiet_telemetry()
        )
        await engine.start()
        event = identify("later", "ada", "")
        batch = asyncio.create_task(engine.apply(0, [engine.decode(StreamDelivery(event, "events.raw.0", 1))]))
        await held.read.wait()  # the batch has read ada's identifier and person, outside the lock
        await engine.purge([ada.person])
        held.release.set()
        effects = await batch

        (resolved,) = [m for m in effects.messages if m.subject.startswith("events.resolved.")]
        (item,) = events_pb2.ResolvedEventBatch.FromString(resolved.payload).events
        assert item.person_id != ada.person, "the purged person came back from a read older than the purge"
        assert ada.person not in engine.graph.persons


async def test_a_standby_that_becomes_the_writer_publishes_what_the_crashed_writer_left():
    async with open_store("memory://") as store:
        publisher = RecordingPublisher()
        standby = IdentityEngine(MergeRules.default(), store, publisher, partitions=1, telemetry=quiet_telemetry())
        await standby.start()
        standby.writer = False

        crashed = IdentityEngine(
            MergeRules.default(), store, UnreachablePublisher(), partitions=1, telemetry=quiet_telemetry()
        )
        await crashed.start()
        await crashed.resolve([("user_id", "u1")], request_id="r0", at=1_000)
        await crashed.resolve([("anonymous_id", "a1")], request_id="r1", at=1_000)
        with pytest.raises(Unavailable):  # the merge is durable; the writer dies before publishing it
            await crashed.resolve([("user_id", "u1"), ("anonymous_id", "a1")], request_id="r2", at=2_000)

        await standby.become_writer()
        assert [subject.split(".")[:2] for subject in publisher.subjects] == [["identity", "merged"]]
        assert [r async for r in store.scan_all(OUTBOX)] == []


async def test_accounts_on_one_phone_stay_apart_and_their_resolved_events_count_the_others(caplog):
    """Default rules: four accounts on one phone are four persons, and each resolved event says how many
    OTHER persons used the phone in the last day - a count, never who or which phone, in the event or
    in any log line."""
    caplog.set_level("DEBUG")
    async with open_store("memory://") as memory:
        engine = IdentityEngine(
            MergeRules.default(), memory, RecordingPublisher(), partitions=1, telemetry=quiet_telemetry()
        )
        await engine.start()
        deliveries = []
        for k in range(4):
            event = identify(f"ring-{k}", f"ring-user-{k}", "")
            event.context.device.id = "ring-phone-77"
            event.timestamp.FromMilliseconds(1_700_000_000_000 + k * 60_000)
            deliveries.append(StreamDelivery(event, "events.raw.0", k + 1))
        effects = await engine.apply(0, [engine.decode(d) for d in deliveries])

        resolved = [
            item
            for m in effects.messages
            if m.subject.startswith("events.resolved.")
            for item in events_pb2.ResolvedEventBatch.FromString(m.payload).events
            if item.event.source_id != "identity"  # the accounts' own events, not identity's (next test)
        ]
        assert [item.event.message_id for item in resolved] == [f"ring-{k}" for k in range(4)]
        assert len({item.person_id for item in resolved}) == 4
        assert [dict(item.shared_with) for item in resolved] == [
            {},
            {"device_id": 1},
            {"device_id": 2},
            {"device_id": 3},
        ]
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "ring-phone-77" not in logged and "ring-user-" not in logged


def ring_deliveries(accounts: int = 4) -> list[StreamDelivery]:
    deliveries = []
    for k in range(accounts):
        event = identify(f"ring-{k}", f"ring-user-{k}", "")
        event.context.device.id = "ring-phone-77"
        event.timestamp.FromMilliseconds(1_700_000_000_000 + k * 60_000)
        event.received_at.FromMilliseconds(1_700_000_000_500 + k * 60_000)
        deliveries.append(StreamDelivery(event, "events.raw.0", k + 1))
    return deliveries


async def test_the_accounts_already_on_a_phone_get_an_identifier_shared_event_each_time_another_joins(caplog):
    """The phone's first account ordered before anyone else used the phone; identity publishes on its
    behalf an "Identifier Shared" event when each later account appears (counts only), so its profile
    learns what the later accounts' own events say. Every earlier account is told once per account that
    joins, with a message id that is the same when the batch is resolved again."""
    caplog.set_level("DEBUG")

    async def shared_events() -> tuple[list, list[str], list]:
        async with open_store("memory://") as memory:
            engine = IdentityEngine(
                MergeRules.default(), memory, RecordingPublisher(), partitions=4, telemetry=quiet_telemetry()
            )
            await engine.start()
            effects = await engine.apply(0, [engine.decode(d) for d in ring_deliveries()])
            own, told, msg_ids = [], [], []
            for m in effects.messages:
                if not m.subject.startswith("events.resolved."):
                    continue
                for item in events_pb2.ResolvedEventBatch.FromString(m.payload).events:
                    assert m.subject == f"events.resolved.{engine._partition_of(item.person_id)}"
                    if item.event.source_id == "identity":
                        told.append(item)
                        msg_ids.append(m.msg_id)
                    else:
                        own.append(item)
            return own, msg_ids, told

    own, msg_ids, told = await shared_events()
    account = {item.event.user_id: item.person_id for item in own}
    first, second, third, fourth = (account[f"ring-user-{k}"] for k in range(4))
    assert fourth not in {item.person_id for item in told}, "the last account to join is told of nobody"
    got = sorted((item.person_id, item.event.timestamp.ToMilliseconds(), dict(item.shared_with)) for item in told)
    t = 1_700_000_000_000
    assert got == sorted(
        [
            (first, t + 60_000, {"device_id": 1}),
            (first, t + 120_000, {"device_id": 2}),
            (second, t + 120_000, {"device_id": 2}),
            (first, t + 180_000, {"device_id": 3}),
            (second, t + 180_000, {"device_id": 3}),
            (third, t + 180_000, {"device_id": 3}),
        ]
    ), "every account before the one that joined, once per account that joins; the joining one never"
    for item in told:
        event = item.event
        assert (event.type, event.event) == (events_pb2.EVENT_TYPE_TRACK, "Identifier Shared")
        assert json_format.MessageToDict(event.properties) == {
            "identifier_types": ["device_id"],
            "persons": item.shared_with["device_id"],
        }
        assert event.message_id and event.received_at.ToMilliseconds() == event.timestamp.ToMilliseconds() + 500
        # Nobody's identifiers: no user or anonymous id, no context, no identifier keys.
        assert (event.user_id, event.anonymous_id, event.HasField("context"), list(item.identifiers)) == (
            "",
            "",
            False,
            [],
        )
    assert len(set(msg_ids)) == len(msg_ids) == 6
    # Resolved again from the same state (a redelivery after a failed write): the same messages.
    _own, again, told_again = await shared_events()
    assert again == msg_ids and [t.SerializeToString() for t in told_again] == [t.SerializeToString() for t in told]
    logged = "\n".join(record.getMessage() + str(record.__dict__) for record in caplog.records)
    assert "ring-phone-77" not in logged and "ring-user-" not in logged


async def test_identifier_shared_events_ride_the_outbox_with_the_graph_change():
    """Through `handle` (the write, then the publish): the events for earlier persons are written with the
    graph change, so a crash before publishing loses none - a redelivery resolves read-only and would
    not find them again."""
    async with open_store("memory://") as memory:
        crashed = IdentityEngine(
            MergeRules.default(), memory, UnreachablePublisher(), partitions=1, telemetry=quiet_telemetry()
        )
        await crashed.start()
        with pytest.raises(Unavailable):
            await crashed.handle(ring_deliveries(2))

        publisher = RecordingPublisher()
        restarted = IdentityEngine(MergeRules.default(), memory, publisher, partitions=1, telemetry=quiet_telemetry())
        await restarted.start()  # publishes what the crashed one left in the outbox
        told = [
            item
            for message in publisher.messages
            if message.subject.startswith("events.resolved.")
            for item in events_pb2.ResolvedEventBatch.FromString(message.payload).events
            if item.event.event == "Identifier Shared"
        ]
        assert [dict(item.shared_with) for item in told] == [{"device_id": 1}]


async def test_an_event_dated_in_the_future_is_placed_at_its_arrival(engine):
    # Stored before the collector capped the event time (a replay, a backfill): identity's lineage - when
    # a person was created, when an identifier joined it - must not lie in the year 9999. Past times stay.
    received_ms = 1_795_000_000_000
    future = identify("late", "u-future", "a-future")
    future.timestamp.FromMilliseconds(253_402_300_799_000)  # 9999-12-31
    future.received_at.FromMilliseconds(received_ms)
    past = identify("early", "u-past", "a-past")
    past.timestamp.FromMilliseconds(received_ms - 86_400_000)
    past.received_at.FromMilliseconds(received_ms)
    await engine.handle([StreamDelivery(future, "events.raw.3", 1), StreamDelivery(past, "events.raw.3", 2)])

    future_person = engine.graph.persons[engine.graph.person_of("user_id:u-future")]
    assert future_person.created_at == received_ms
    assert engine.graph.identifiers["anonymous_id:a-future"].first_seen == received_ms
    past_person = engine.graph.persons[engine.graph.person_of("user_id:u-past")]
    assert past_person.created_at == received_ms - 86_400_000


async def test_a_writer_stopping_while_an_operation_holds_the_lock_refuses_at_once_even_if_the_stop_is_cut():
    """The lease is going (`stop_writing`) while an API operation holds the lock: operations asked from then
    on are refused as a standby's, and if the stop is cut while it waits for the lock (the lease lost before
    the release ended: it is cancelled), the replica still refuses - it never answers as the writer without
    the lease. Before: the flag was cleared only once the lock was taken, so a cut left it the writer."""
    async with open_store("memory://") as store:
        engine = IdentityEngine(
            MergeRules.default(), store, RecordingPublisher(), partitions=1, telemetry=quiet_telemetry()
        )
        await engine.start()
        assert engine.writer
        async with engine.lock:  # an operation under way
            stopping = asyncio.create_task(engine.stop_writing())
            await asyncio.sleep(0.01)  # the stop waits for the lock
            assert not stopping.done()
            stopping.cancel()  # the cut
            with pytest.raises(asyncio.CancelledError):
                await stopping
        with pytest.raises(Unavailable, match="standby"):
            await engine.resolve([("user_id", "u9")], request_id="r9", at=1_000)
