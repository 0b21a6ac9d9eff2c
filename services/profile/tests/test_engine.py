"""The profile engine against a real nats-server and the memory store, with a clock the test moves:
windowed traits fall when time passes (and the change is published), a lost write race drops the cache
and the redelivered batch applies on the store's state, and a redelivered batch counts once.

Events come the way they do in production: published on `events.resolved.0` and applied by the kit's
partitioned engine running profile's logic (`cdp_profile.stream`)."""

from __future__ import annotations

import asyncio
import time

import grpc
import nats
import pytest

from cdp.events.v1 import events_pb2
from cdp.profile.v1 import profile_pb2
from cdp_kit.bus import Bus, dead_letter_stream, events_resolved_stream, profiles_stream, scores_stream
from cdp_kit.errors import ResourceExhausted
from cdp_kit.storage import Put, open_store
from cdp_profile.api import definition_from_message, status_message
from cdp_profile.domain import ComputedTrait, Retention
from cdp_profile.engine import DEFINITIONS, PROFILES, ProfileEngine
from cdp_profile.stream import partitioned_engines

DAY = 86_400.0
T0 = 1_790_000_000.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Events:
    """The `events.resolved.0` consumer of one engine: the kit's partitioned engine on profile's logic."""

    def __init__(self, engine: ProfileEngine, bus: Bus) -> None:
        self.engine = engine
        self.bus = bus
        self.partitioned = None

    async def start(self) -> None:
        self.engine.streams.clear()
        self.partitioned = partitioned_engines(self.engine, self.bus, partitions=1, batch_size=64, ack_wait=30)[0]
        await self.partitioned.start_partition(0)
        await self.partitioned.wait_ready()

    async def stop(self) -> None:
        """Release the partition as a replica does: what was applied is written, published, acknowledged."""
        await self.partitioned.close()

    async def feed(self, batch: events_pb2.ResolvedEventBatch) -> int:
        """Publish a batch and wait until its effects are durable; its stream position."""
        ack = await self.bus.js.publish("events.resolved.0", batch.SerializeToString())
        await self.durable(ack.seq)
        return ack.seq

    async def durable(self, seq: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.partitioned.pipelines[0].checkpoint < seq:
            assert time.monotonic() < deadline, f"position {seq} not durable in {timeout}s"
            await asyncio.sleep(0.01)


def order(message_id: str, person: str, at: float, revenue: float) -> events_pb2.ResolvedEvent:
    event = events_pb2.Event(
        message_id=message_id, source_id="t", type=events_pb2.EVENT_TYPE_TRACK, event="Order Completed"
    )
    event.timestamp.FromNanoseconds(int(at * 1e9))
    event.received_at.FromNanoseconds(int(at * 1e9))
    event.properties.update({"revenue": revenue})
    return events_pb2.ResolvedEvent(event=event, person_id=person, identifiers=[f"user_id:{person}"])


@pytest.fixture
async def engine(nats_server):
    clock = Clock(T0)
    async with open_store("memory://") as store, Bus.connect(nats_server.url, name="engine-test") as bus:
        await bus.ensure_streams(events_resolved_stream(), scores_stream(), profiles_stream(), dead_letter_stream())
        engine = ProfileEngine(
            store,
            bus.publisher,
            partitions=1,
            owned=[0],
            retention=Retention(max_events=100),
            telemetry=bus.telemetry,
            clock=clock,
        )
        await engine.start()
        engine.test_clock = clock
        engine.events = Events(engine, bus)
        await engine.events.start()
        try:
            yield engine
        finally:
            await engine.events.stop()
            await engine.stop()


async def changes_of(nats_url: str, person: str) -> list[profile_pb2.ProfileChanged]:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("PROFILES")
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            batch = profile_pb2.ProfileChangedBatch.FromString((await js.get_msg("PROFILES", seq)).data)
            out.extend(c for c in batch.changes if c.person_id == person)
        return out
    finally:
        await nc.close()


async def test_a_windowed_count_falls_when_an_order_ages_out_without_a_new_event(engine, nats_server):
    await engine.define(
        ComputedTrait.from_dict(
            {"name": "orders_30d", "op": "count", "event_names": ["Order Completed"], "window": "30d"}
        )
    )
    batch = events_pb2.ResolvedEventBatch(
        events=[order("o1", "p1", T0 - 20 * DAY, 10), order("o2", "p1", T0 - 2 * DAY, 20)]
    )
    await engine.events.feed(batch)
    assert engine.profiles["p1"].view(now=T0).computed["orders_30d"] == 2

    engine.test_clock.now = T0 + 11 * DAY  # o1 is now 31 days old
    assert await engine.expire_due() == 1
    assert engine.profiles["p1"].view(now=engine.test_clock.now).computed["orders_30d"] == 1
    feed = await changes_of(nats_server.url, "p1")
    assert feed[-1].cause == "expiry" and feed[-1].computed["orders_30d"].number_value == 1
    # Durable too: a restart reads the fallen value back.
    await engine.flush()
    stored = await engine.store.get(PROFILES, "p1")
    assert stored is not None


async def test_a_redelivered_batch_counts_once(engine):
    await engine.define(
        ComputedTrait.from_dict(
            {"name": "revenue", "op": "sum", "property": "revenue", "event_names": ["Order Completed"]}
        )
    )
    batch = events_pb2.ResolvedEventBatch(events=[order("o1", "p1", T0, 10), order("o2", "p1", T0, 5)])
    await engine.events.feed(batch)
    # Redelivered after a lost acknowledgement: the consumer is gone, a new one delivers the stream
    # again from its start, onto the same hot state and store.
    await engine.events.stop()
    await engine.events.bus.js.delete_consumer("EVENTS_RESOLVED", "profile-p0")
    await engine.events.start()
    await engine.events.durable(1)
    await asyncio.sleep(0.2)
    assert engine.profiles["p1"].view(now=T0).computed["revenue"] == 15


async def test_a_lost_write_race_drops_the_cache_and_the_retry_applies_on_the_stored_state(engine):
    await engine.define(ComputedTrait.from_dict({"name": "orders", "op": "count", "event_names": ["Order Completed"]}))
    first = events_pb2.ResolvedEventBatch(events=[order("o1", "p1", T0, 10)])
    await engine.events.feed(first)
    # Another replica wrote p1 behind this one's back (a stale owner during a rollout).
    record = await engine.store.get(PROFILES, "p1")
    await engine.store.put(PROFILES, "p1", record.doc, expected_version=record.version)

    second = events_pb2.ResolvedEventBatch(events=[order("o2", "p1", T0 + 1, 10)])
    # The write fails, the cache is dropped, and the batch is applied again on the stored state.
    await engine.events.feed(second)
    profile = engine.profiles["p1"]
    assert profile.view(now=T0).computed["orders"] == 2
    assert [e.event_id for e in profile.events(limit=10)[0]] == ["t:o2", "t:o1"]


async def test_a_definition_added_later_is_backfilled_once_even_while_events_arrive(engine):
    events = [order(f"o{i}", "p1", T0 + i, 1) for i in range(10)]
    await engine.events.feed(events_pb2.ResolvedEventBatch(events=events))
    backfill = await engine.define(
        ComputedTrait.from_dict(
            {"name": "spent", "op": "sum", "property": "revenue", "event_names": ["Order Completed"]}
        )
    )
    later = [order("o10", "p1", T0 + 10, 1)]
    await engine.events.feed(events_pb2.ResolvedEventBatch(events=later))
    for task in list(engine._tasks):
        if task.get_name().startswith("backfill"):
            await task
    assert backfill.state == "ready" and backfill.done == backfill.total == 1
    assert engine.profiles["p1"].view(now=T0).computed["spent"] == 11


async def test_a_definition_with_operators_reads_back_from_the_store_and_the_api_as_the_same(nats_server):
    definition = {"name": "big_orders_30d", "op": "count", "event_names": ["Order Completed"],
                  "where": {"revenue": {"$lte": 100, "$gt": 50}, "$anonymous_id": None}, "window": "30d"}  # fmt: skip
    clock = Clock(T0)
    async with open_store("memory://") as store, Bus.connect(nats_server.url, name="engine-test") as bus:
        await bus.ensure_streams(events_resolved_stream(), scores_stream(), profiles_stream(), dead_letter_stream())

        async def started() -> ProfileEngine:
            engine = ProfileEngine(
                store, bus.publisher, partitions=1, owned=[0], retention=Retention(max_events=100),
                telemetry=bus.telemetry, clock=clock,
            )  # fmt: skip
            await engine.start()
            return engine

        engine = await started()
        await engine.define(ComputedTrait.from_dict(definition))
        orders = [order(f"o{i}", "p1", T0 - i * DAY, revenue) for i, revenue in enumerate([40, 60, 100, 120, 75.5])]
        events = Events(engine, bus)
        await events.start()
        await events.feed(events_pb2.ResolvedEventBatch(events=orders))
        await events.stop()
        assert engine.profiles["p1"].view(now=T0).computed["big_orders_30d"] == 3
        await engine.flush()
        await engine.stop()
        # Definitions stored before operators existed are objects, not JSON text; they still load.
        old = {"definition": {"name": "orders", "op": "count"}, "defined_at": T0, "state": "ready"}
        await store.bulk_write([Put(DEFINITIONS, "orders", old)])

        engine = await started()
        try:
            loaded = engine.backfills["big_orders_30d"]
            assert loaded.trait == ComputedTrait.from_dict(definition)
            assert engine.backfills["orders"].trait == ComputedTrait("orders", "count")
            # Defined again as the API lists it (a protobuf Struct), it is the same definition: kept, not
            # backfilled again.
            listed = definition_from_message(status_message(loaded).definition)
            assert await engine.define(listed) is loaded
            assert engine.profiles["p1"].view(now=T0).computed["big_orders_30d"] == 3
        finally:
            await engine.stop()


def located(
    message_id: str, name: str, at: float, *, user_id: str, card: str = "", place: tuple = (), device: str = ""
) -> events_pb2.ResolvedEvent:
    """An SDK-like event: its context has the device, a location and time zone, the ip and a user agent."""
    event = events_pb2.Event(
        message_id=message_id, source_id="t", type=events_pb2.EVENT_TYPE_TRACK, event=name, user_id=user_id
    )
    event.timestamp.FromNanoseconds(int(at * 1e9))
    event.received_at.FromNanoseconds(int(at * 1e9))
    if card:
        event.properties.update({"card_country": card})
    context = event.context
    context.ip = "203.0.113.7"
    context.user_agent = "Mozilla/5.0"
    if device:
        context.device.id = device
    if place:
        country, latitude, longitude, timezone = place
        context.location.country = country
        context.location.latitude = latitude
        context.location.longitude = longitude
        context.timezone = timezone
    return events_pb2.ResolvedEvent(event=event, person_id="p1", identifiers=[f"user_id:{user_id}"])


TOKYO = ("JP", 35.6762, 139.6503, "Asia/Tokyo")
BERLIN = ("DE", 52.52, 13.405, "Europe/Berlin")
NEW_YORK = ("US", 40.7128, -74.006, "America/New_York")
FRAUD_SIGNALS = [
    {"name": "devices_24h", "op": "unique_count", "event_type": "any", "property": "$context.device.id", "window": "24h"},
    {"name": "send_hour", "op": "most_frequent", "event_type": "any", "property": "$hour"},
    {"name": "accounts_24h", "op": "unique_count", "event_type": "any", "property": "$user_id", "window": "24h"},
    {"name": "speed_7d", "op": "max_speed", "event_type": "any", "property": "$context.location", "window": "7d"},
    {"name": "geo_mismatch_24h", "op": "mismatch_count", "event_names": ["Order Completed"],
     "property": "card_country", "compare": "$context.location.country", "window": "24h"},
]  # fmt: skip


async def test_context_pseudo_paths_feed_traits_and_a_backfill_after_a_restart_equals_live(nats_server):
    """T0 is 14:13 UTC: 13:13 in Tokyo 10 h earlier, in Berlin 3 h earlier, in UTC 1 h earlier (in UTC
    alone, the first two would be 04 and 11)."""
    clock = Clock(T0)
    async with open_store("memory://") as store, Bus.connect(nats_server.url, name="engine-test") as bus:
        await bus.ensure_streams(events_resolved_stream(), scores_stream(), profiles_stream(), dead_letter_stream())

        async def started() -> ProfileEngine:
            engine = ProfileEngine(
                store,
                bus.publisher,
                partitions=1,
                owned=[0],
                retention=Retention(max_events=100),
                telemetry=bus.telemetry,
                clock=clock,
            )
            await engine.start()
            return engine

        async def backfilled(engine: ProfileEngine) -> None:
            for task in list(engine._tasks):
                if task.get_name().startswith("backfill"):
                    await task

        engine = await started()
        for definition in FRAUD_SIGNALS:
            await engine.define(ComputedTrait.from_dict(definition))
        assert engine.defs.needs_context
        batch = events_pb2.ResolvedEventBatch(
            events=[
                located("e1", "Order Completed", T0 - 10 * 3600, user_id="u1", card="jp", place=TOKYO, device="d1"),
                located("e2", "Order Completed", T0 - 3 * 3600, user_id="u1", card="JP", place=BERLIN, device="d2"),
                located("e3", "Order Completed", T0 - 2 * 3600, user_id="u2", card="us", place=NEW_YORK, device="d2"),
                located("e4", "Signed Up", T0 - 3600, user_id="u3", device="d3"),
            ]
        )
        events = Events(engine, bus)
        await events.start()
        await events.feed(batch)
        await events.stop()
        await backfilled(engine)
        live = engine.profiles["p1"].view(now=T0).computed
        assert live == {
            "devices_24h": 3,
            "send_hour": 13,
            "accounts_24h": 3,
            "speed_7d": pytest.approx(6385, abs=1),  # Berlin -> New York in an hour
            "geo_mismatch_24h": 1,  # a Japanese card in Germany
        }
        await engine.flush()
        await engine.stop()

        # A restart reads the timeline back from the store; the same definitions under new names are
        # backfilled from it and give what live application gave.
        engine = await started()
        try:
            for definition in FRAUD_SIGNALS:
                await engine.define(ComputedTrait.from_dict({**definition, "name": "re_" + definition["name"]}))
            await backfilled(engine)
            computed = engine.profiles["p1"].view(now=T0).computed
            assert {name: computed["re_" + name] for name in live} == live
            (entry, *_) = engine.profiles["p1"].timeline()
            assert entry.context == {
                "ip": "203.0.113.7",
                "timezone": "Asia/Tokyo",
                "device": {"id": "d1"},
                "location": {"country": "JP", "latitude": 35.6762, "longitude": 139.6503},
            }  # no user agent: no definition reads it
        finally:
            await engine.stop()


class HeldPublisher:
    """A publisher that holds the next publish until released (a slow JetStream acknowledgement)."""

    def __init__(self, publisher) -> None:
        self.publisher = publisher
        self.hold = None
        self.reached = None

    async def publish_batch(self, messages):
        if self.hold is not None:
            hold, self.hold = self.hold, None
            self.reached.set()
            await hold.wait()
        return await self.publisher.publish_batch(messages)

    def __getattr__(self, name: str):
        return getattr(self.publisher, name)


async def test_a_deletion_while_a_batch_is_being_published_leaves_no_change_message_in_the_outbox(engine, nats_server):
    from cdp_kit.bus import privacy_stream
    from cdp_profile.engine import CHECKPOINTS

    async with Bus.connect(nats_server.url, name="privacy") as bus:
        await bus.ensure_streams(privacy_stream())

    events = engine.events
    await events.feed(events_pb2.ResolvedEventBatch(events=[order("o1", "p1", T0, 10)]))
    # The partitioned engine publishes through the bus: hold its next publish.
    events.bus.publisher = held = HeldPublisher(events.bus.publisher)
    release = asyncio.Event()
    held.hold, held.reached = release, asyncio.Event()
    second = events_pb2.ResolvedEventBatch(events=[order("o2", "p1", T0 + 1, 99_999)])
    await events.bus.js.publish("events.resolved.0", second.SerializeToString())
    await held.reached.wait()  # committed, not yet published: the outbox holds p1's change
    outbox = events.partitioned.outbox
    assert [r async for r in engine.store.scan_all(outbox)]
    deleting = asyncio.create_task(engine.delete("p1", suppress=False, request_id="r1"))
    await asyncio.sleep(0.1)
    release.set()
    await deleting
    await engine.flush()
    assert [r async for r in engine.store.scan_all(outbox)] == []
    checkpoint = await engine.store.get(CHECKPOINTS, "events.resolved.0")
    assert checkpoint.doc["stream_seq"] == 2


async def test_the_computed_traits_a_deployment_holds_are_capped_and_a_deleted_one_frees_its_place(nats_server):
    async with open_store("memory://") as store, Bus.connect(nats_server.url, name="engine-test") as bus:
        await bus.ensure_streams(events_resolved_stream(), scores_stream(), profiles_stream(), dead_letter_stream())
        engine = ProfileEngine(
            store,
            bus.publisher,
            partitions=1,
            owned=[0],
            retention=Retention(max_events=100),
            telemetry=bus.telemetry,
            max_computed_traits=2,
            clock=Clock(T0),
        )
        await engine.start()
        try:

            def trait(name: str, event: str = "Order Completed") -> ComputedTrait:
                return ComputedTrait.from_dict({"name": name, "op": "count", "event_names": [event]})

            await engine.define(trait("a"))
            await engine.define(trait("b"))
            with pytest.raises(ResourceExhausted) as caught:
                await engine.define(trait("c"))
            assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "CDP_PROFILE_MAX_COMPUTED_TRAITS=2" in caught.value.message
            assert sorted(engine.backfills) == ["a", "b"]
            await engine.define(trait("b", "Login"))  # redefining a held name takes no new place
            await engine.undefine("a")
            await engine.define(trait("c"))
            assert sorted(engine.backfills) == ["b", "c"]
        finally:
            await engine.stop()


async def test_get_profile_answers_every_change_and_an_aged_window_building_the_answer_once_per_change(
    engine, monkeypatch
):
    from cdp_profile.api import ProfileApi
    from cdp_profile.domain import Profile

    views = []
    view = Profile.view

    def counted(profile, **kwargs):
        views.append(profile.person_id)
        return view(profile, **kwargs)

    monkeypatch.setattr(Profile, "view", counted)
    api = ProfileApi(engine)
    request = profile_pb2.GetProfileRequest(person_id="p1")
    await engine.define(
        ComputedTrait.from_dict(
            {"name": "orders_30d", "op": "count", "event_names": ["Order Completed"], "window": "30d"}
        )
    )
    await engine.events.feed(
        events_pb2.ResolvedEventBatch(
            events=[order("o1", "p1", T0 - 20 * DAY, 10), order("o2", "p1", T0 - 2 * DAY, 20)]
        )
    )
    first = await api.GetProfile(request, None)
    assert first.computed["orders_30d"].number_value == 2 and first.event_count == 2
    assert (await api.GetProfile(request, None)) == first
    assert views == ["p1"], "two reads without a change between them build the answer once"

    await engine.events.feed(events_pb2.ResolvedEventBatch(events=[order("o3", "p1", T0 - DAY, 5)]))
    assert (await api.GetProfile(request, None)).computed["orders_30d"].number_value == 3

    # o1 ages out of the window: no event and no expiry pass yet, the answer follows the clock anyway.
    engine.test_clock.now = T0 + 11 * DAY
    assert (await api.GetProfile(request, None)).computed["orders_30d"].number_value == 2
    # An API write is a change too.
    await engine.update_traits("p1", {"plan": "pro"}, {}, source="api", at=None, request_id="w1")
    assert (await api.GetProfile(request, None)).traits["plan"].value.string_value == "pro"
    # As of a past time or with history: built for that read, never from the shared answer.
    past = profile_pb2.GetProfileRequest(person_id="p1")
    past.as_of.FromSeconds(int(T0 - 3 * DAY))
    assert "plan" not in (await api.GetProfile(past, None)).traits


async def test_a_deleted_persons_answer_is_not_kept(engine, nats_server):
    from cdp_kit.bus import privacy_stream
    from cdp_kit.errors import NotFound
    from cdp_profile.api import ProfileApi

    async with Bus.connect(nats_server.url, name="privacy") as bus:
        await bus.ensure_streams(privacy_stream())
    api = ProfileApi(engine)
    await engine.events.feed(events_pb2.ResolvedEventBatch(events=[order("o1", "p1", T0, 10)]))
    await engine.update_traits("p1", {"email": "ada@example.com"}, {}, source="api", at=None, request_id="w1")
    assert (await api.GetProfile(profile_pb2.GetProfileRequest(person_id="p1"), None)).traits["email"]
    await engine.delete("p1", suppress=False, request_id="r1")
    assert "p1" not in engine.hot.views  # personal data gone from memory, not just unreachable
    with pytest.raises(NotFound):
        await api.GetProfile(profile_pb2.GetProfileRequest(person_id="p1"), None)


async def test_a_deletion_without_suppression_leaves_no_hash_of_the_persons_identifiers_on_the_bus(engine, nats_server):
    """privacy.deleted stays in PRIVACY without an age limit (suppressions are rebuilt from it). The hashes
    of a person's identifiers are what a suppression needs; a plain deletion needs only the person ids, so
    its notice carries none: nothing linkable to the person's email or user id is kept there for ever."""
    import hashlib

    from cdp.privacy.v1 import privacy_pb2
    from cdp_kit.bus import privacy_stream
    from cdp_kit.identifier_hash import IdentifierHashKeys

    async with Bus.connect(nats_server.url, name="privacy") as bus:
        await bus.ensure_streams(privacy_stream())
    for person in ("p1", "p2"):
        await engine.events.feed(events_pb2.ResolvedEventBatch(events=[order(f"o-{person}", person, T0, 10)]))
        await engine.update_traits(person, {"email": f"{person}@example.com"}, {}, source="api", at=None,
                                   request_id=f"w-{person}")  # fmt: skip
    plain = await engine.delete("p1", suppress=False, request_id="r1")
    suppressed = await engine.delete("p2", suppress=True, request_id="r2")
    assert plain["identifiers"] >= 1 and suppressed["identifiers"] >= 1  # the answer still counts them

    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        notices = {}
        info = await js.stream_info("PRIVACY")
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            notice = privacy_pb2.PrivacyDeleted.FromString((await js.get_msg("PRIVACY", seq)).data)
            notices[notice.request_id] = notice
    finally:
        await nc.close()
    assert notices["r1"].person_id == "p1" and not notices["r1"].suppress
    assert list(notices["r1"].identifier_hashes) == []
    assert notices["r2"].suppress
    # Keyed (the engine runs with the development key here), never the plain SHA-256 a reader could test.
    key = IdentifierHashKeys.for_development().current
    assert key.hash("user_id:p2") in notices["r2"].identifier_hashes
    assert notices["r2"].identifier_hash_key_id == key.id
    assert hashlib.sha256(b"user_id:p2").hexdigest() not in notices["r2"].identifier_hashes


class HeldWrites:
    """Holds the store's writes of `person`'s profile until released (a slow commit); `fail` fails the
    next one. Other writes pass: the engine's own (an earlier batch's outbox cleanup, say) may land after
    a batch is durable, and holding one of those instead would make `held` say a write of the person's is
    waiting when none is. A context manager: leaving it releases, so a failing test never leaves a write
    held for the teardown to wait on."""

    def __init__(self, store, person: str = "p1") -> None:
        self.write = store.bulk_write
        self.person = person
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self.fail = False
        store.bulk_write = self.bulk_write

    def __enter__(self) -> HeldWrites:
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()

    async def bulk_write(self, ops) -> None:
        if not any(getattr(op, "collection", None) == PROFILES and op.key == self.person for op in ops):
            await self.write(ops)
            return
        self.held.set()
        await self.release.wait()
        if self.fail:
            from cdp_kit.errors import Unavailable

            self.fail = False
            raise Unavailable("store down")
        await self.write(ops)


async def test_get_profile_never_shows_a_change_before_it_is_written(engine):
    """Read-your-durable-writes: a batch applied while its commit is held is not visible to readers;
    the read waits for the commit and answers after it lands (a person with nothing pending answers at once)."""
    from cdp_profile.api import ProfileApi

    api = ProfileApi(engine)
    await engine.events.feed(events_pb2.ResolvedEventBatch(events=[order("o1", "p1", T0, 10)]))
    await engine.events.feed(events_pb2.ResolvedEventBatch(events=[order("o9", "p2", T0, 10)]))
    with HeldWrites(engine.store) as held:
        await engine.events.bus.js.publish(
            "events.resolved.0",
            events_pb2.ResolvedEventBatch(events=[order("o2", "p1", T0 + 1, 20)]).SerializeToString(),
        )
        await asyncio.wait_for(held.held.wait(), 10)
        assert engine.profiles["p1"].events(limit=10)[0][0].event_id == "t:o2"  # applied in memory, not written

        # Another person, nothing pending: answered at once.
        assert (await api.GetProfile(profile_pb2.GetProfileRequest(person_id="p2"), None)).event_count == 1
        released = False

        async def read():
            answer = await api.GetProfile(profile_pb2.GetProfileRequest(person_id="p1"), None)
            return released, answer

        reading = asyncio.create_task(read())
        try:
            await asyncio.sleep(0.3)
            assert not reading.done(), "the read answered while p1's change was not durable"
        finally:
            released = True
            held.release.set()
        seen_after_release, answer = await asyncio.wait_for(reading, 10)
        assert seen_after_release and answer.event_count == 2


async def test_a_read_waiting_for_a_write_that_fails_is_unavailable_and_then_answers_what_was_stored(engine):
    from cdp_kit.errors import Unavailable
    from cdp_profile.api import ProfileApi

    api = ProfileApi(engine)
    request = profile_pb2.GetProfileRequest(person_id="p1")
    await engine.events.feed(events_pb2.ResolvedEventBatch(events=[order("o1", "p1", T0, 10)]))
    with HeldWrites(engine.store) as held:
        held.fail = True
        await engine.events.bus.js.publish(
            "events.resolved.0",
            events_pb2.ResolvedEventBatch(events=[order("o2", "p1", T0 + 1, 20)]).SerializeToString(),
        )
        await asyncio.wait_for(held.held.wait(), 10)
        reading = asyncio.create_task(api.GetProfile(request, None))
        await asyncio.sleep(0.1)
        held.release.set()
        with pytest.raises(Unavailable) as failed:
            await asyncio.wait_for(reading, 10)
        assert failed.value.retry_after > 0
        # The store is back: the batch comes again, lands, and the read shows it.
        deadline = time.monotonic() + 10
        while True:
            try:
                answer = await api.GetProfile(request, None)
            except Unavailable:
                answer = None
            if answer is not None and answer.event_count == 2:
                break
            assert time.monotonic() < deadline, "the redelivered batch was not applied"
            await asyncio.sleep(0.05)


async def test_a_read_during_an_api_write_shows_the_new_trait_only_once_it_is_written(engine):
    from cdp_profile.api import ProfileApi

    api = ProfileApi(engine)
    request = profile_pb2.GetProfileRequest(person_id="p1")
    await engine.events.feed(events_pb2.ResolvedEventBatch(events=[order("o1", "p1", T0, 10)]))
    with HeldWrites(engine.store) as held:
        writing = asyncio.create_task(
            engine.update_traits("p1", {"plan": "pro"}, {}, source="api", at=None, request_id="w1")
        )
        try:
            await asyncio.wait_for(held.held.wait(), 10)
            reading = asyncio.create_task(api.GetProfile(request, None))
            await asyncio.sleep(0.2)
            assert not reading.done(), "the read answered while the API write was not durable"
        finally:
            held.release.set()
        await asyncio.wait_for(writing, 10)
        assert (await asyncio.wait_for(reading, 10)).traits["plan"].value.string_value == "pro"


async def backfilled(engine: ProfileEngine) -> None:
    for task in list(engine._tasks):
        if task.get_name().startswith("backfill"):
            await task


async def test_deleting_a_computed_trait_publishes_its_removal_so_readers_drop_it(engine, nats_server):
    # Segmentation and orchestration hold a copy of every field they read, from profiles.changed: a
    # definition deleted without a change kept its segments' members for good (found by a marketer trial).
    await engine.define(ComputedTrait.from_dict({"name": "orders", "op": "count", "event_names": ["Order Completed"]}))
    await engine.events.feed(events_pb2.ResolvedEventBatch(events=[order("o1", "p1", T0, 10)]))
    await engine.undefine("orders")
    last = (await changes_of(nats_server.url, "p1"))[-1]
    assert last.cause == "backfill" and list(last.computed) == ["orders"]
    assert last.computed["orders"].WhichOneof("kind") == "null_value"
    assert "orders" not in engine.profiles["p1"].view(now=T0).computed


async def test_redefining_a_computed_trait_publishes_the_removal_of_values_it_no_longer_has(engine, nats_server):
    await engine.define(ComputedTrait.from_dict({"name": "big", "op": "count", "event_names": ["Order Completed"]}))
    await engine.events.feed(
        events_pb2.ResolvedEventBatch(events=[order("o1", "p1", T0, 10), order("o2", "p2", T0, 500)])
    )
    await engine.define(
        ComputedTrait.from_dict(
            {"name": "big", "op": "count", "event_names": ["Order Completed"], "where": {"revenue": {"$gt": 100}}}
        )
    )
    await backfilled(engine)
    p1, p2 = (await changes_of(nats_server.url, "p1"))[-1], (await changes_of(nats_server.url, "p2"))[-1]
    assert p1.cause == "backfill" and p1.computed["big"].WhichOneof("kind") == "null_value"  # was 1, now none
    assert p2.cause == "backfill" and p2.computed["big"].number_value == 1
    assert "big" not in engine.profiles["p1"].view(now=T0).computed
