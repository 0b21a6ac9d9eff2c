"""The segmentation engine against a real nats-server and the memory store: profile changes in,
membership transitions out (checked on the SEGMENTS stream itself)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import nats
import pytest

from cdp.profile.v1 import profile_pb2
from cdp.segmentation.v1 import segmentation_pb2
from cdp_kit.bus import Bus, profiles_stream, segments_stream, subjects
from cdp_kit.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from cdp_kit.storage import open_store
from cdp_kit.timestamps import set_seconds, to_seconds
from cdp_segmentation.domain import parse
from cdp_segmentation.engine import LIVE, SEGMENTS, SegmentationEngine
from cdp_segmentation.percentiles import ROUNDS
from cdp_segmentation.stream import SegmentationStream, engine_spec
from cdp_testing.fakes import T0, Clock, Delivery


def changed(changes: list[profile_pb2.ProfileChanged], seq: int, delivered: int = 1) -> Delivery:
    """One `profiles.changed.0` message as the consumer hands it to the engine."""
    batch = profile_pb2.ProfileChangedBatch(changes=changes)
    return Delivery(batch, subjects.profiles_changed(0), seq, delivered=delivered)


def change(person: str, *, at=T0, cause="event", removed=False, traits=None, computed=None, scores=None):
    message = profile_pb2.ProfileChanged(person_id=person, removed=removed, cause=cause)
    set_seconds(message.at, at)
    for name, value in (traits or {}).items():
        if value is None:
            message.traits[name].null_value = 0
        elif isinstance(value, str):
            message.traits[name].string_value = value
        else:
            message.traits[name].number_value = value
    for name, value in (computed or {}).items():
        message.computed[name].number_value = value
    for name, value in (scores or {}).items():
        message.scores[name] = value
    return message


@dataclass
class Event:
    person: str
    segment: str
    entered: bool
    at: float
    reason: str
    id: str


async def published(nats_url: str) -> list[Event]:
    """Every transition on the SEGMENTS stream, in stream order."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("SEGMENTS")
        out = []
        if info.state.messages:
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                msg = await js.get_msg("SEGMENTS", seq)
                for e in segmentation_pb2.SegmentEventBatch.FromString(msg.data).events:
                    assert msg.subject == f"segments.{'entered' if e.entered else 'exited'}.0"
                    at = to_seconds(e.at)
                    out.append(Event(e.person_id, e.segment_id, e.entered, at, e.reason, e.id))
        return out
    finally:
        await nc.close()


def moves(events: list[Event]) -> list[tuple[str, str, str, str]]:
    return [(e.person, e.segment, "enter" if e.entered else "exit", e.reason) for e in events]


class Profile:
    """What the engine asks the profile service: definitions, then their readiness."""

    def __init__(self) -> None:
        self.defined: list[dict] = []
        self.undefined: list[str] = []

    async def define(self, definitions) -> None:
        self.defined.extend(definitions)

    async def ready(self, names) -> None:
        assert set(names) <= {d["name"] for d in self.defined}

    async def undefine(self, names) -> None:
        self.undefined.extend(names)


async def make_engine(store, bus, clock, profile=None) -> SegmentationEngine:
    engine = SegmentationEngine(
        store,
        bus.publisher,
        partitions=1,
        owned=[0],
        telemetry=bus.telemetry,
        define_traits=profile.define if profile else None,
        traits_ready=profile.ready if profile else None,
        undefine_traits=profile.undefine if profile else None,
        snapshot_interval=3600,
        timer_resolution=3600,
        # Rounds are the tests' to run: with the clock standing still, the engine's own loop wakes one
        # interval of real time after the start and would take the round of the boundary the clock stands
        # at, a test's `recompute_percentiles()` then finding it ran (0). An hour (T0 is 800 s past one): the
        # loop's first round is 2,800 s of real time away.
        percentile_interval=3600,
        clock=clock,
    )
    await engine.start()
    return engine


@pytest.fixture
async def setup(nats_server):
    clock = Clock(T0)
    profile = Profile()
    async with open_store("memory://") as store, Bus.connect(nats_server.url, name="segmentation-test") as bus:
        await bus.ensure_streams(profiles_stream(), segments_stream())
        engine = await make_engine(store, bus, clock, profile)
        try:
            yield engine, store, bus, clock, profile
        finally:
            await engine.stop()


async def create(engine, segment_id: str, text: str):
    segment = await engine.create(segment_id, parse(text))
    return await engine.wait_live(segment.id)


async def test_a_change_that_meets_a_definition_enters_and_one_that_breaks_it_exits(setup, nats_server):
    engine, *_ = setup
    await create(engine, "pro", 'traits.plan = "pro"')
    await engine.handle([changed([change("p1", traits={"plan": "pro"}, at=T0 + 1)], 1)])
    await engine.handle([changed([change("p1", traits={"plan": "free"}, at=T0 + 2, cause="api")], 2)])
    events = await published(nats_server.url)
    assert moves(events) == [("p1", "pro", "enter", "event"), ("p1", "pro", "exit", "api")]
    assert [e.at for e in events] == [pytest.approx(T0 + 1), pytest.approx(T0 + 2)]
    assert engine.membership("p1") == {}


async def test_only_segments_reading_a_changed_field_are_evaluated(setup):
    engine, *_ = setup
    for i in range(10):
        await create(engine, f"s{i}", f"scores.s{i} > 0.5")
    await engine.handle([changed([change("p1", scores={f"s{i}": 0.1 for i in range(10)})], 1)])
    evaluated = []
    for segment in engine.segments.values():
        original = segment.compiled.predicate

        def spy(record, members, now, _original=original, _id=segment.id):
            evaluated.append(_id)
            return _original(record, members, now)

        segment.predicate = spy
    await engine.handle([changed([change("p1", scores={"s3": 0.9})], 2)])
    assert evaluated == ["s3"]
    assert set(engine.membership("p1")) == {"s3"}


async def test_a_new_segment_is_evaluated_over_the_population_then_kept_current(setup, nats_server):
    engine, *_ = setup
    changes = [change(f"p{i}", scores={"churn": i / 10}) for i in range(10)]
    await engine.handle([changed(changes, 1)])
    segment = await create(engine, "churny", "scores.churn >= 0.7")
    assert (segment.state, segment.done, segment.total) == (LIVE, 10, 10)
    assert sorted(engine.members["churny"]) == ["p7", "p8", "p9"]
    assert moves(await published(nats_server.url)) == [(f"p{i}", "churny", "enter", "created") for i in (7, 8, 9)]
    await engine.handle([changed([change("p1", scores={"churn": 0.95})], 2)])
    assert "churny" in engine.membership("p1")


async def test_builds_running_at_once_each_go_live_whichever_ends_first(setup, monkeypatch):
    # An import creates many segments at once. Each build keeps the set of persons changed while it evaluates
    # the population; one ending first must take its own set away, not another build's equal one (two empty
    # sets are equal): the other then failed going live with "list.remove(x): x not in list".
    engine, *_ = setup
    await engine.handle([changed([change("p1", traits={"plan": "free"})], 1)])
    population, evaluated, gate = engine._population, asyncio.Event(), asyncio.Event()

    async def held_back(compiled, *, progress):
        result = await population(compiled, progress=progress)
        if progress.id == "slow":
            evaluated.set()
            await gate.wait()  # evaluated; goes live only once "fast" is live and p1 has changed
        return result

    monkeypatch.setattr(engine, "_population", held_back)
    await engine.create("slow", parse('traits.plan = "pro"'))
    await evaluated.wait()
    assert (await create(engine, "fast", "scores.x > 1")).state == LIVE
    await engine.handle([changed([change("p1", traits={"plan": "pro"}, at=T0 + 5)], 2)])
    gate.set()
    slow = await engine.wait_live("slow")
    assert (slow.state, slow.error) == (LIVE, "")
    assert set(engine.membership("p1")) == {"slow"}
    assert engine._touched == []


async def test_an_update_publishes_the_membership_difference(setup, nats_server):
    engine, *_ = setup
    await engine.handle([changed([change(f"p{i}", scores={"churn": i / 10}) for i in range(10)], 1)])
    await create(engine, "churny", "scores.churn >= 0.7")
    segment = await engine.update("churny", parse("scores.churn >= 0.5 and scores.churn < 0.8"))
    segment = await engine.wait_live("churny")
    entered, exited, sample_in, sample_out = segment.last_diff
    assert (entered, exited, sample_in, sample_out) == (2, 2, ["p5", "p6"], ["p8", "p9"])
    assert segment.version == 2
    updates = [m for m in moves(await published(nats_server.url)) if m[3] == "updated"]
    assert sorted(updates) == [
        ("p5", "churny", "enter", "updated"),
        ("p6", "churny", "enter", "updated"),
        ("p8", "churny", "exit", "updated"),
        ("p9", "churny", "exit", "updated"),
    ]


async def test_delete_exits_every_member_and_is_refused_while_referred_to(setup, nats_server):
    engine, *_ = setup
    await engine.handle([changed([change("p1", traits={"plan": "pro"}), change("p2", traits={"plan": "pro"})], 1)])
    await create(engine, "pro", 'traits.plan = "pro"')
    await create(engine, "pro_de", 'in_segment("pro") and traits.country = "DE"')
    with pytest.raises(FailedPrecondition, match="pro_de"):
        await engine.delete("pro")
    await engine.delete("pro_de")
    assert await engine.delete("pro") == 2
    exits = [m for m in moves(await published(nats_server.url)) if m[2] == "exit"]
    assert sorted(exits) == [("p1", "pro", "exit", "deleted"), ("p2", "pro", "exit", "deleted")]
    assert engine.membership("p1") == {}
    await create(engine, "x", "scores.a > 1")
    with pytest.raises(AlreadyExists):
        await engine.create("x", parse("scores.a > 1"))


async def test_segments_referring_to_a_segment_follow_it_in_the_same_change(setup, nats_server):
    engine, *_ = setup
    await create(engine, "pro", 'traits.plan = "pro"')
    await create(engine, "pro_de", 'in_segment("pro") and traits.country = "DE"')
    await create(engine, "not_pro_de", 'not in_segment("pro_de")')
    await engine.handle([changed([change("p1", traits={"country": "DE"})], 1)])
    assert set(engine.membership("p1")) == {"not_pro_de"}
    await engine.handle([changed([change("p1", traits={"plan": "pro"}, at=T0 + 5)], 2)])
    assert set(engine.membership("p1")) == {"pro", "pro_de"}
    last = moves(await published(nats_server.url))[-3:]
    assert sorted(last) == [
        ("p1", "not_pro_de", "exit", "event"),
        ("p1", "pro", "enter", "event"),
        ("p1", "pro_de", "enter", "event"),
    ]


async def test_cycles_and_unknown_references_are_refused(setup):
    engine, *_ = setup
    await create(engine, "a", "scores.x > 1")
    await create(engine, "b", 'in_segment("a")')
    with pytest.raises(InvalidArgument, match="cycle"):
        await engine.update("a", parse('in_segment("b")'))
    with pytest.raises(InvalidArgument, match="nope"):
        await engine.create("c", parse('in_segment("nope")'))
    assert engine.segments["a"].compiled.segments == frozenset()


async def test_time_passing_enters_and_exits_at_the_instant_the_condition_flips(setup, nats_server):
    engine, _store, _bus, clock, _ = setup
    await create(engine, "recent", "traits.last_seen_at > now - 14d")
    await engine.handle([changed([change("p1", traits={"last_seen_at": T0 - 86_400})], 1)])
    assert "recent" in engine.membership("p1")
    clock.now = T0 + 12 * 86_400
    assert await engine.fire_timers() == 0
    clock.now = T0 + 13 * 86_400 + 5
    assert await engine.fire_timers() == 1
    assert engine.membership("p1") == {}
    last = (await published(nats_server.url))[-1]
    assert (last.person, last.entered, last.reason) == ("p1", False, "time")
    assert last.at == pytest.approx(T0 + 13 * 86_400)  # when it flipped, not when the timer ran


async def test_a_removed_profile_leaves_every_segment(setup, nats_server):
    engine, *_ = setup
    await create(engine, "pro", 'traits.plan = "pro"')
    await engine.handle([changed([change("p1", traits={"plan": "pro"})], 1)])
    await engine.handle([changed([change("p1", removed=True, cause="merge", at=T0 + 3)], 2)])
    assert moves(await published(nats_server.url))[-1] == ("p1", "pro", "exit", "removed")
    assert "p1" not in engine.persons


async def test_event_conditions_are_defined_on_the_profile_service_and_read_as_computed_traits(setup, nats_server):
    engine, _store, _bus, _clock, profile = setup
    segment = await create(
        engine, "buyers", 'count(event = "Order Completed" and properties.total > 50, within 30d) >= 3'
    )
    [definition] = profile.defined
    assert definition["op"] == "count" and definition["window"] == "30d"
    assert definition["event_names"] == ["Order Completed"]
    assert definition["where"] == {"total": {"$gt": 50}}
    assert segment.compiled.fields == {f"computed.{definition['name']}"}
    await engine.handle([changed([change("p1", computed={definition["name"]: 3})], 1)])
    await engine.handle([changed([change("p1", computed={definition["name"]: 2}, cause="expiry")], 2)])
    assert moves(await published(nats_server.url)) == [
        ("p1", "buyers", "enter", "event"),
        ("p1", "buyers", "exit", "expiry"),
    ]


async def test_estimate_counts_without_creating(setup):
    engine, *_ = setup
    await engine.handle([changed([change(f"p{i}", scores={"clv": float(i)}) for i in range(100)], 1)])
    estimate = await engine.estimate(parse("scores.clv >= 90"))
    assert (estimate.size, estimate.population) == (10, 100)
    assert estimate.sample == [f"p{i}" for i in range(90, 100)]
    assert engine.segments == {}


async def test_list_members_pages_in_person_order(setup):
    engine, *_ = setup
    await engine.handle([changed([change(f"p{i:03d}", scores={"clv": 1.0}) for i in range(25)], 1)])
    await create(engine, "all", "scores.clv > 0")
    seen, after = [], ""
    while True:
        page, more, total = engine.list_members("all", after=after, limit=10)
        assert total == 25
        seen += [p for p, _ in page]
        if not more:
            break
        after = page[-1][0]
    assert seen == [f"p{i:03d}" for i in range(25)]


async def test_a_restart_keeps_memberships_and_publishes_nothing_twice(setup, nats_server):
    engine, store, bus, clock, profile = setup
    await create(engine, "pro", 'traits.plan = "pro"')
    await create(engine, "soon", "traits.trial_ends_at < now")
    await engine.handle([changed([change("p1", traits={"plan": "pro", "trial_ends_at": T0 + 60})], 1)])
    await engine.snapshot()
    # After the snapshot: p2 enters and p1 leaves; then the process dies before the next snapshot.
    after = [
        (1, change("p2", traits={"plan": "pro"}, at=T0 + 1)),
        (2, change("p1", traits={"plan": "free"}, at=T0 + 2)),
    ]
    for seq, c in after:
        await engine.handle([changed([c], seq + 1)])
    before = await published(nats_server.url)
    for task in engine._tasks:  # stopped without a final snapshot: as if killed
        task.cancel()
    await asyncio.gather(*engine._tasks, return_exceptions=True)
    engine._tasks.clear()
    clock.now = T0 + 61  # the trial ended while it was down

    second = await make_engine(store, bus, clock, profile)
    try:

        async def stream():
            for seq, c in after:
                yield "profiles.changed.0", seq + 1, profile_pb2.ProfileChangedBatch(changes=[c]).SerializeToString()

        assert await second.replay(stream()) == 2
        second.resume_builds()
        await second.fire_timers()  # (or its timer loop did: the clock says the trial ended a second ago)
        events = await published(nats_server.url)
        assert moves(events[: len(before)]) == moves(before)
        # Only the timer is news: the replayed transitions were duplicates JetStream dropped.
        assert moves(events[len(before) :]) == [("p1", "soon", "enter", "time")]
        assert set(second.membership("p1")) == {"soon"} and set(second.membership("p2")) == {"pro"}
        assert len({e.id for e in events}) == len(events)
    finally:
        await second.stop()


async def test_a_failed_publish_is_published_by_the_retry(setup, nats_server, monkeypatch):
    """Through the partitioned engine (stream.py), which now owns publishing and its retries."""
    engine, store, bus, _clock, _ = setup
    await create(engine, "pro", 'traits.plan = "pro"')
    real = bus.publisher.publish_batch
    calls = {"n": 0}

    async def flaky(messages, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("bus down")
        return await real(messages, **kw)

    monkeypatch.setattr(bus.publisher, "publish_batch", flaky)
    stream = SegmentationStream(
        engine, engine_spec(partitions=1, batch_size=64, ack_wait=30, snapshot_every=3600), bus=bus, store=store
    )
    running = asyncio.create_task(stream.run())
    try:
        batch = profile_pb2.ProfileChangedBatch(changes=[change("p1", traits={"plan": "pro"})])
        await bus.js.publish(subjects.profiles_changed(0), batch.SerializeToString())
        deadline = asyncio.get_running_loop().time() + 10
        while not await published(nats_server.url):
            assert asyncio.get_running_loop().time() < deadline, "the transition was not published"
            await asyncio.sleep(0.05)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    assert calls["n"] >= 2
    assert moves(await published(nats_server.url)) == [("p1", "pro", "enter", "event")]


async def test_a_build_waits_for_the_segments_it_refers_to(setup):
    engine, *_ = setup
    await engine.handle([changed([change("p1", traits={"plan": "pro"})], 1)])
    first = await engine.create("pro", parse('traits.plan = "pro"'))
    second = await engine.create("pro2", parse('in_segment("pro")'))
    await asyncio.gather(engine.wait_live(first.id), engine.wait_live(second.id))
    assert set(engine.membership("p1")) == {"pro", "pro2"}


async def test_threshold_segments_skipped_by_range_keep_exact_memberships(setup):
    """A change evaluates only the threshold segments whose number lies in the range the field moved
    over; memberships must still be exactly what evaluating every segment gives."""
    import random

    engine, *_ = setup
    texts = {f"gt{i}": f"scores.x > {i / 10}" for i in range(10)}
    texts |= {"le5": "scores.x <= 0.5", "eq3": "scores.x = 0.3", "ne3": "scores.x != 0.3"}
    texts |= {"count2": 'count("Order Completed") >= 2', "both": 'in_segment("gt5") and in_segment("count2")'}
    for segment_id, text in texts.items():
        await create(engine, segment_id, text)
    [order_count] = engine.segments["count2"].compiled.fields
    rng = random.Random(1)
    values = [None, 0.0, 0.3, 0.5, 0.55, 1.0, "high", 0.1, 0.9]
    for seq in range(1, 400):
        person = f"p{rng.randrange(5)}"
        message = change(person, at=T0 + seq)
        value = rng.choice(values)
        if value is None:
            message.scores.clear()
            message.traits["x"].null_value = 0  # another field moves; x keeps its value
        elif isinstance(value, str):
            message.computed[order_count.removeprefix("computed.")].number_value = rng.randrange(4)
        else:
            message.scores["x"] = value
        await engine.handle([changed([message], seq)])
        fields = engine.persons[person].fields
        want: set[str] = set()
        for segment_id in texts:  # dependencies after what they refer to
            if engine.segments[segment_id].compiled.evaluate(fields, want, T0):
                want.add(segment_id)
        assert set(engine.membership(person)) == want, (seq, fields)


async def test_standby_replicas_repeat_each_others_lifecycle_and_publish_each_transition_once(nats_server):
    """Hot standby: two engines hold every partition (their own snapshots), share the segment store, and
    tell each other about lifecycle calls; both publish, and JetStream keeps one copy of each transition."""
    clock = Clock(T0)
    async with open_store("memory://") as store, Bus.connect(nats_server.url, name="standby-test") as bus:
        await bus.ensure_streams(profiles_stream(), segments_stream())
        engines: list[SegmentationEngine] = []

        def announcer(index: int):
            async def announce(what: str) -> None:
                await engines[1 - index].reload(what)

            return announce

        for index in range(2):
            engine = SegmentationEngine(
                store,
                bus.publisher,
                partitions=1,
                owned=[0],
                telemetry=bus.telemetry,
                snapshot_interval=3600,
                timer_resolution=3600,
                namespace=f"_r{index}",
                announce=announcer(index),
                clock=clock,
            )
            await engine.start()
            engines.append(engine)
        a, b = engines
        try:
            changes = [changed([change("p1", traits={"plan": "pro"}), change("p2", traits={"plan": "free"})], 1)]
            for engine in engines:
                await engine.handle(changes)
            await a.create("pro", parse('traits.plan = "pro"'))
            await a.wait_live("pro")
            await b.wait_live("pro")
            for engine in engines:
                await engine.handle([changed([change("p2", traits={"plan": "pro"}, at=T0 + 1)], 2)])
            assert set(a.members["pro"]) == set(b.members["pro"]) == {"p1", "p2"}
            await b.delete("pro")
            assert "pro" not in a.segments and a.membership("p1") == {}
            assert moves(await published(nats_server.url)) == [
                ("p1", "pro", "enter", "created"),
                ("p2", "pro", "enter", "event"),
                ("p1", "pro", "exit", "deleted"),
                ("p2", "pro", "exit", "deleted"),
            ]
        finally:
            for engine in engines:
                await engine.stop()


async def test_computed_traits_no_segment_reads_any_more_are_deleted_on_the_profile_service(setup):
    engine, _store, _bus, _clock, profile = setup
    shared = 'count("Order Completed", within 30d) >= 1'
    await create(engine, "a", shared)
    await create(engine, "b", f"{shared} and scores.x > 0.5")
    await create(engine, "c", 'count("Login", within 14d) >= 1')
    login = next(d["name"] for d in profile.defined if d["event_names"] == ["Login"])
    orders = next(d["name"] for d in profile.defined if d["event_names"] == ["Order Completed"])
    await engine.update("c", parse("scores.x > 0.9"))
    await engine.wait_live("c")
    assert profile.undefined == [login]  # c no longer counts logins
    await engine.delete("a")
    assert profile.undefined == [login]  # b still counts orders
    await engine.delete("b")
    assert profile.undefined == [login, orders]


async def test_a_stored_segment_that_cannot_be_loaded_is_left_out_and_can_be_deleted(setup, caplog):
    engine, store, bus, clock, profile = setup
    await create(engine, "fine", "scores.x > 1")
    record = await store.get(SEGMENTS, "fine")
    await store.put(SEGMENTS, "broken", {**record.doc, "tree": '{"field": "traits.x", "op": "sounds_like"}'})
    restarted = await make_engine(store, bus, clock, profile)
    try:
        assert sorted(restarted.segments) == ["fine"] and list(restarted.unreadable) == ["broken"]
        assert any(getattr(r, "segment", None) == "broken" for r in caplog.records if r.levelname == "ERROR")
        assert await restarted.delete("broken") == 0
        assert await store.get(SEGMENTS, "broken") is None and restarted.unreadable == {}
    finally:
        await restarted.stop()


async def test_a_percentile_is_exact_when_built_and_follows_the_population_on_its_schedule(setup, nats_server):
    engine, _store, _bus, clock, _profile = setup
    await engine.handle([changed([change(f"p{i}", scores={"clv": float(i)}) for i in range(20)], 1)])
    estimate = await engine.estimate(parse("scores.clv >= percentile(scores.clv, 90)"))
    assert (estimate.size, estimate.population) == (2, 20)
    await create(engine, "top", "scores.clv >= percentile(scores.clv, 90)")
    assert sorted(engine.members["top"]) == ["p18", "p19"]  # the top decile of twenty
    # Two persons become the biggest: each is compared with the value of the last round as it changes...
    await engine.handle([changed([change("p5", scores={"clv": 100.0}), change("p6", scores={"clv": 101.0})], 2)])
    assert sorted(engine.members["top"]) == ["p18", "p19", "p5", "p6"]
    # ...and the next round moves the percentile (19 + 0.1 * 81) and evaluates only those it passed over.
    assert await engine.recompute_percentiles() == 2
    assert sorted(engine.members["top"]) == ["p5", "p6"]
    assert await engine.recompute_percentiles() == 0  # nothing moved it since
    assert moves(await published(nats_server.url))[-4:] == [
        ("p5", "top", "enter", "event"),
        ("p6", "top", "enter", "event"),
        ("p18", "top", "exit", "percentile"),
        ("p19", "top", "exit", "percentile"),
    ]
    # A person leaving the population moves it too.
    await engine.handle([changed([change("p6", removed=True, at=T0 + 3)], 3)])
    assert await engine.recompute_percentiles() == 0  # one round per boundary: this one's has run
    clock.advance(engine.percentile_interval)
    await engine.recompute_percentiles()
    assert engine.percentiles == {"scores.clv@90": pytest.approx(18.2)}  # 19 left: rank 16.2, from 18 to 19
    assert sorted(engine.members["top"]) == ["p19", "p5"]


async def test_the_percentiles_are_kept_with_the_snapshot(setup, nats_server):
    engine, store, bus, clock, profile = setup
    await engine.handle([changed([change(f"p{i}", scores={"clv": float(i)}) for i in range(10)], 1)])
    await create(engine, "top", "scores.clv > percentile(scores.clv, 50)")
    await engine.snapshot()
    again = await make_engine(store, bus, clock, profile)
    try:
        assert again.percentiles == {"scores.clv@50": 4.5}
        assert sorted(again.members["top"]) == ["p5", "p6", "p7", "p8", "p9"]
        assert again.segments["top"].compiled.evaluate({"scores.clv": 4.6})
    finally:
        await again.stop()


async def test_a_percentile_round_published_before_a_crash_is_published_once(setup, nats_server):
    """Its transitions keep their ids (segment, person, direction, round) after a restart, and the changes
    applied after the round are replayed with the value the round set, as they were first evaluated."""
    engine, store, bus, clock, profile = setup
    await engine.handle([changed([change(f"p{i}", scores={"clv": float(i)}) for i in range(20)], 1)])
    await create(engine, "top", "scores.clv >= percentile(scores.clv, 90)")  # snapshotted as it goes live
    after = [
        (2, [change("p5", scores={"clv": 100.0}), change("p6", scores={"clv": 101.0})]),
        (3, [change("p7", scores={"clv": 20.0})]),  # below the round's 27.1, above the build's 17.1
    ]
    await engine.handle([changed(after[0][1], 2)])
    clock.advance(engine.percentile_interval)
    assert await engine.recompute_percentiles() == 2  # p18 and p19 exit: the value moved to 27.1
    await engine.handle([changed(after[1][1], 3)])
    before = await published(nats_server.url)
    for task in engine._tasks:  # stopped without a final snapshot: as if killed
        task.cancel()
    await asyncio.gather(*engine._tasks, return_exceptions=True)
    engine._tasks.clear()
    clock.advance(3 * engine.percentile_interval)  # down across a few boundaries

    second = await make_engine(store, bus, clock, profile)
    try:

        async def stream():
            for seq, changes in after:
                yield "profiles.changed.0", seq, profile_pb2.ProfileChangedBatch(changes=changes).SerializeToString()

        assert await second.replay(stream()) == 3
        second.resume_builds()
        await second.recompute_percentiles()  # the first round after the restart
        events = await published(nats_server.url)
        assert moves(events) == moves(before)  # nothing twice, and p7 never entered
        assert moves(before)[-2:] == [("p18", "top", "exit", "percentile"), ("p19", "top", "exit", "percentile")]
        assert sorted(second.members["top"]) == ["p5", "p6"]
        assert [r async for r in store.scan_all(ROUNDS)]
        await second.snapshot()  # it includes every round logged: none is kept
        assert [r async for r in store.scan_all(ROUNDS)] == []
    finally:
        await second.stop()


async def test_a_field_compared_with_another_is_evaluated_on_a_change_of_either(setup, nats_server):
    engine, *_ = setup
    # Two thresholds on computed.last make it threshold-indexed; the comparison with computed.avg is not one.
    await create(engine, "big", "computed.last > 100")
    await create(engine, "huge", "computed.last > 1000")
    await create(engine, "above_average", "computed.last > computed.avg")
    await engine.handle([changed([change("p1", computed={"last": 50.0, "avg": 80.0})], 1)])
    assert engine.membership("p1") == {}
    await engine.handle([changed([change("p1", computed={"avg": 40.0})], 2)])
    assert set(engine.membership("p1")) == {"above_average"}
    await engine.handle([changed([change("p1", computed={"last": 30.0})], 3)])
    assert engine.membership("p1") == {}
    assert [m[2:] for m in moves(await published(nats_server.url))] == [("enter", "event"), ("exit", "event")]


DAY = 86_400


def timer_moves(events: list[Event]) -> list[tuple[str, str, str, float]]:
    """The transitions time alone caused: (person, segment, direction, the instant it flipped)."""
    return [(e.person, e.segment, "enter" if e.entered else "exit", e.at) for e in events if e.reason == "time"]


async def test_a_segment_built_over_the_population_gives_its_persons_timers(setup, nats_server):
    """The persons are there before the segment: a member whose membership ends with time alone exits on
    time, and a non-member whom time alone brings in enters on time, without a change of theirs."""
    engine, _store, _bus, clock, _ = setup
    await engine.handle(
        [
            changed(
                [
                    change("recent", traits={"seen_at": T0 - 5 * DAY}),  # in until T0 + 2d
                    change("lapsing", traits={"seen_at": T0 - 20 * DAY}),  # out until T0 + 10d
                ],
                1,
            )
        ]
    )
    await create(engine, "active", "traits.seen_at > now - 7d")
    await create(engine, "lapsed", "traits.seen_at < now - 30d")
    assert set(engine.membership("recent")) == {"active"} and engine.membership("lapsing") == {}
    clock.now = T0 + 2 * DAY + 5
    await engine.fire_timers()
    clock.now = T0 + 10 * DAY + 5
    await engine.fire_timers()
    assert timer_moves(await published(nats_server.url)) == [
        ("recent", "active", "exit", T0 + 2 * DAY),
        ("lapsing", "lapsed", "enter", T0 + 10 * DAY),
    ]
    assert set(engine.membership("lapsing")) == {"lapsed"} and engine.membership("recent") == {}


async def test_an_update_moves_the_timers_of_unchanged_members_to_the_new_definition(setup, nats_server):
    """Window 14d -> 3d: a member seen a day ago stays a member at go-live (no transition) and exits when
    the new window has passed, not when the old one would have."""
    engine, _store, _bus, clock, _ = setup
    await engine.handle([changed([change("p1", traits={"seen_at": T0 - DAY})], 1)])
    await create(engine, "active", "traits.seen_at > now - 14d")
    await engine.update("active", parse("traits.seen_at > now - 3d"))
    await engine.wait_live("active")
    assert set(engine.membership("p1")) == {"active"}
    clock.now = T0 + 2 * DAY + 5
    await engine.fire_timers()
    assert timer_moves(await published(nats_server.url)) == [("p1", "active", "exit", T0 + 2 * DAY)]
    assert engine.membership("p1") == {}


async def test_a_definition_that_becomes_time_based_gives_its_unchanged_members_timers(setup, nats_server):
    engine, _store, _bus, clock, _ = setup
    await engine.handle([changed([change("p1", traits={"plan": "pro", "trial_ends_at": T0 + 60})], 1)])
    await create(engine, "trial", 'traits.plan = "pro"')
    await engine.update("trial", parse('traits.plan = "pro" and traits.trial_ends_at > now'))
    await engine.wait_live("trial")
    assert set(engine.membership("p1")) == {"trial"}
    clock.now = T0 + 61
    await engine.fire_timers()
    assert timer_moves(await published(nats_server.url)) == [("p1", "trial", "exit", T0 + 60)]


async def test_a_timer_of_an_earlier_version_flips_nothing(setup, nats_server):
    """Window 3d -> 14d: the timer the first version set (at seen + 3d) finds the person still a member
    of the new one; the exit comes when the new window has passed."""
    engine, _store, _bus, clock, _ = setup
    await engine.handle([changed([change("p1", traits={"seen_at": T0 - DAY})], 1)])
    await create(engine, "active", "traits.seen_at > now - 3d")
    await engine.update("active", parse("traits.seen_at > now - 14d"))
    await engine.wait_live("active")
    clock.now = T0 + 2 * DAY + 5
    await engine.fire_timers()
    assert set(engine.membership("p1")) == {"active"}
    clock.now = T0 + 13 * DAY + 5
    await engine.fire_timers()
    events = await published(nats_server.url)
    assert timer_moves(events) == [("p1", "active", "exit", T0 + 13 * DAY)]
    assert [m for m in moves(events) if m[3] == "updated"] == []


@pytest.mark.parametrize("evaluated_before", [False, True], ids=["never-evaluated", "evaluated-at-T0"])
async def test_timers_of_a_built_segment_come_back_right_after_a_restart(setup, nats_server, evaluated_before):
    """A segment built over persons last evaluated before it existed (or never: no segment was live when
    they changed): after a crash, the timers restored from the snapshot flip each person at the instant its
    condition flips, under the id the first process published it with. Neither lost (a restart scheduling
    from its own clock) nor sent again at an instant the build had already passed (from the person's last
    evaluation, before the build)."""
    engine, store, bus, clock, profile = setup
    if evaluated_before:
        await create(engine, "pro", 'traits.plan = "pro"')  # a person first seen is evaluated against it
    # Out from T0 + 1d (the first comparison stops holding) until T0 + 5d (the second starts to).
    await engine.handle([changed([change("p1", traits={"a_at": T0, "b_at": T0 - 5 * DAY})], 1)])
    clock.now = T0 + 2 * DAY
    await create(engine, "either", "traits.a_at > now - 1d or traits.b_at < now - 10d")
    assert engine.membership("p1") == {}
    await engine.snapshot()
    clock.now = T0 + 5 * DAY + 5
    await engine.fire_timers()  # the entry goes out; the process dies before the next snapshot
    for task in engine._tasks:
        task.cancel()
    await asyncio.gather(*engine._tasks, return_exceptions=True)
    engine._tasks.clear()
    clock.now = T0 + 6 * DAY

    second = await make_engine(store, bus, clock, profile)
    try:
        await second.fire_timers()
        events = await published(nats_server.url)
        assert timer_moves(events) == [("p1", "either", "enter", T0 + 5 * DAY)]
        assert set(second.membership("p1")) == {"either"}
        clock.now = T0 + 30 * DAY
        await second.fire_timers()
        assert len(await published(nats_server.url)) == len(events)  # nothing more: it stays in
    finally:
        await second.stop()


async def _nothing() -> int:
    return 0


async def test_a_segment_live_again_after_a_crash_releases_the_traits_of_its_previous_definition(setup, nats_server):
    """`c` counts logins; it is updated to count orders, goes live, and the process dies before the build
    stores it live and releases the login count. The restart takes `c` as live (no rebuild) and, once its
    builds resume, deletes the login count on the profile service and forgets the values held for it, as
    the update's build would have; the order count, which `c` reads now, stays. Each transition once."""
    engine, store, bus, clock, profile = setup
    await create(engine, "c", 'count("Login", within 14d) >= 1')
    login = next(d["name"] for d in profile.defined if d["event_names"] == ["Login"])
    await engine.handle([changed([change("p1", computed={login: 2}), change("p2", computed={login: 1})], 1)])
    await engine.snapshot()
    dead = asyncio.Event()

    async def dies() -> int:
        engine.snapshot = _nothing  # (the fixture stops it: a dead process writes nothing)
        dead.set()
        await asyncio.Event().wait()  # never returns: the crash below ends the process here
        return 0

    engine.snapshot = dies
    await engine.update("c", parse('count("Order Completed", within 30d) >= 1'))
    await asyncio.wait_for(dead.wait(), 20)
    orders = next(d["name"] for d in profile.defined if d["event_names"] == ["Order Completed"])
    building = list(engine._builds.values())
    for task in [*building, *engine._tasks]:
        task.cancel()
    await asyncio.gather(*building, *engine._tasks, return_exceptions=True)
    engine._tasks.clear()
    assert profile.undefined == []

    second = await make_engine(store, bus, clock, profile)
    try:
        assert second.segments["c"].version == 2 and second.segments["c"].state == LIVE
        second.resume_builds()
        for _ in range(100):
            if profile.undefined:
                break
            await asyncio.sleep(0.02)
        assert profile.undefined == [login]
        assert all(f"computed.{login}" not in second.persons[p].fields for p in ("p1", "p2"))
        assert orders not in profile.undefined
        events = await published(nats_server.url)
        assert sorted((e.person, e.entered) for e in events) == [
            ("p1", False),
            ("p1", True),
            ("p2", False),
            ("p2", True),
        ]
    finally:
        await second.stop()


# A person met for the first time: a change that began the profile (`created`) holds the whole profile, so
# nothing is read from the profile service; any other first sight (a replica whose state began after the
# person's) reads the profile once, and evaluates on what it read plus the change.


async def test_a_created_profile_is_not_read_and_an_unknown_one_is(nats_server):
    asked: list[str] = []

    async def profile_source(person_id: str):
        asked.append(person_id)
        return {"traits.country": "NO"}  # what the profile service holds beyond the change

    async with open_store("memory://") as store, Bus.connect(nats_server.url, name="segmentation-first") as bus:
        await bus.ensure_streams(profiles_stream(), segments_stream())
        engine = SegmentationEngine(
            store,
            bus.publisher,
            partitions=1,
            owned=[0],
            telemetry=bus.telemetry,
            profile_source=profile_source,
            snapshot_interval=3600,
            timer_resolution=3600,
            clock=Clock(T0),
        )
        await engine.start()
        try:
            segment = await engine.create("pro_no", parse('traits.plan = "pro" and traits.country = "NO"'))
            await engine.wait_live(segment.id)
            new = change("new", traits={"plan": "pro", "country": "NO"}, at=T0 + 1)
            new.created = True
            known_elsewhere = change("old", traits={"plan": "pro"}, at=T0 + 1)
            await engine.handle([changed([new, known_elsewhere], 1)])

            assert asked == ["old"], "only the person whose change is not the whole profile is read"
            assert set(engine.membership("new")) == {"pro_no"}
            assert set(engine.membership("old")) == {"pro_no"}  # its country came from the profile service
        finally:
            await engine.stop()


async def test_a_person_removed_while_the_population_is_evaluated_leaves_the_build_live(
    setup, nats_server, monkeypatch
):
    # A build evaluates the population a step at a time, and the stream goes on between steps: a person
    # deleted (or merged away) after the build listed the population and before it reached them made the
    # build fail with a KeyError, and the segment with it.
    from cdp_segmentation import builds

    engine, *_ = setup
    monkeypatch.setattr(builds, "CHUNK", 1)
    await engine.handle([changed([change(f"p{i:02}", scores={"churn": i / 40}) for i in range(40)], 1)])
    loop = asyncio.get_running_loop()
    first_step, removed = asyncio.Event(), threading.Event()
    step = builds._evaluate_step

    def held(*args):  # in the build's worker thread: the second step waits until p39 is gone
        if first_step.is_set():
            assert removed.wait(timeout=15)
        loop.call_soon_threadsafe(first_step.set)
        return step(*args)

    monkeypatch.setattr(builds, "_evaluate_step", held)
    segment = await engine.create("churny", parse("scores.churn >= 0.5"))
    await first_step.wait()
    await engine.handle([changed([change("p39", removed=True, at=T0 + 1)], 2)])
    removed.set()
    segment = await engine.wait_live(segment.id)
    assert (segment.state, segment.error) == (LIVE, "")
    assert sorted(engine.members["churny"]) == [f"p{i}" for i in range(20, 39)]
    entered = [m for m in moves(await published(nats_server.url)) if m[3] == "created"]
    assert sorted(entered) == [(f"p{i}", "churny", "enter", "created") for i in range(20, 39)]


async def test_the_stream_is_applied_while_a_build_evaluates_the_population(setup, monkeypatch):
    # The population's evaluation ran on the event loop, 65,536 persons between two yields: a build over a
    # large population held the stream, the gRPC calls and the partitions' leases for as long as a step.
    from cdp_segmentation import builds

    engine, *_ = setup
    await engine.handle([changed([change(f"p{i}", scores={"churn": i / 10}) for i in range(10)], 1)])
    loop = asyncio.get_running_loop()
    evaluating, released = asyncio.Event(), threading.Event()
    step = builds._evaluate_step

    def held(*args):
        loop.call_soon_threadsafe(evaluating.set)
        assert released.wait(timeout=15), "nothing was applied while the population was evaluated"
        return step(*args)

    monkeypatch.setattr(builds, "_evaluate_step", held)
    segment = await engine.create("churny", parse("scores.churn >= 0.7"))
    await evaluating.wait()
    await engine.handle([changed([change("p1", scores={"churn": 0.9}, at=T0 + 1)], 2)])
    released.set()
    segment = await engine.wait_live(segment.id)
    assert sorted(engine.members["churny"]) == ["p1", "p7", "p8", "p9"]
