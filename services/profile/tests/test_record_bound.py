"""A person's record stays within the store's document limit however many busy computed traits it holds.

Each windowed trait's state is bounded on its own (aggregates: ~1,000 exact contributions, then buckets),
but the bound is per state: 60 busy windowed traits, each held twice (the live state and the timeline
base's), took one person's record past the store's 8 MiB (`MAX_DOCUMENT_BYTES`), after which every later
event of the person failed its partition's batch. The record is bounded as a whole (`Profile.to_doc`,
"A record within the store's limit" in the README): past `COMPUTED_MAX_BYTES` of computed states the
busiest coarsen further, and the write says so (`cdp.profile.record.trimmed`).

The profile's logic is driven directly (no bus), events applied as the partitioned engine applies them and
their writes committed on the engine's write chain, on the memory store, which refuses a document past the
limit as every store does."""

from __future__ import annotations

import orjson

from cdp.events.v1 import events_pb2
from cdp.profile.v1 import profile_pb2
from cdp_kit.held import apply_updates
from cdp_kit.profile_fields import change_fields
from cdp_kit.storage import open_store
from cdp_kit.storage.model import MAX_DOCUMENT_BYTES
from cdp_profile.domain import ComputedTrait, Retention
from cdp_profile.domain.profile import RECORD_MAX_BYTES
from cdp_profile.engine import PROFILES, ProfileEngine
from cdp_profile.state import HotProfiles
from cdp_profile.stream import EventsLogic
from cdp_testing.fakes import T0, Clock, Delivery
from cdp_testing.metrics import MetricsCapture

# Busy windowed traits of the kinds a customer defines: counts, sums, the last page seen, distinct pages.
OPS = [("count", None), ("sum", "revenue"), ("last", "page"), ("unique_count", "page")]
TRAITS = 60
EVENTS = 1200
PER_MESSAGE = 100


def _definitions() -> list[ComputedTrait]:
    return [
        ComputedTrait.from_dict(
            {"name": f"t{i}_30d", "op": op, "event_names": ["Ping"], "window": "30d"}
            | ({"property": prop} if prop else {})
        )
        for i, (op, prop) in ((i, OPS[i % len(OPS)]) for i in range(TRAITS))
    ]


def _pings(first: int, count: int) -> Delivery:
    """`count` pings of one person, a second apart, each with a 100-character message id (the collector's
    longest) and a page of its own: a back end sending every server event under one user id."""
    batch = events_pb2.ResolvedEventBatch()
    for n in range(first, first + count):
        at = T0 - EVENTS + n
        event = events_pb2.Event(
            message_id=f"{n:06d}".ljust(100, "m"), source_id="server", type=events_pb2.EVENT_TYPE_TRACK, event="Ping"
        )
        event.timestamp.FromNanoseconds(int(at * 1e9))
        event.received_at.FromNanoseconds(int(at * 1e9))
        event.properties.update({"revenue": n % 97, "page": f"/products/{n:06d}/reviews?sort=newest&page={n % 7}"})
        batch.events.add(event=event, person_id="busy", identifiers=["user_id:busy"])
    return Delivery(batch, "events.resolved.0", first // count + 1)


async def test_many_busy_windowed_traits_keep_the_record_within_the_store_limit_and_every_event_applies():
    captured = MetricsCapture("profile")
    async with open_store("memory://") as store:
        engine = _engine(store, captured)
        await engine.start()
        try:
            for trait in _definitions():
                await engine.define(trait)
            logic = EventsLogic(engine)
            largest, fed = 0, {}
            for first in range(0, EVENTS, PER_MESSAGE):
                effects = await logic.apply(0, [logic.decode(_pings(first, PER_MESSAGE))])
                # Every write lands: none is refused for its size (before the bound, from the 8th on).
                await engine.chain.submit(effects.writes)
                for message in effects.messages:  # what a reader of the change feed holds (segmentation)
                    for change in profile_pb2.ProfileChangedBatch.FromString(message.payload).changes:
                        apply_updates(fed, change_fields(change))
                # The values the bound moved (distinct pages whose buckets left early) go with the write.
                held = engine.profiles["busy"].view(now=T0).computed
                assert {key: value for key, value in fed.items() if key.startswith("computed.")} == {
                    f"computed.{name}": value for name, value in held.items()
                }
                stored = await store.get(PROFILES, "busy")
                largest = max(largest, len(orjson.dumps(stored.doc)))
            profile = engine.profiles["busy"]
            assert profile.view(now=T0).event_count == EVENTS
            reloaded = HotProfiles(store, retention=engine.retention, owns=engine.owns)
            await reloaded.load(["busy"])
            stored = reloaded.profiles["busy"]
        finally:
            await engine.stop()

    assert largest <= RECORD_MAX_BYTES < MAX_DOCUMENT_BYTES, f"the record took {largest} bytes"
    # Coarsened, not lost: nothing has left the 30-day window yet, and until something leaves, buckets are
    # exact: every count and sum is the window's, the last page the newest. The distinct pages are what the
    # busiest states could keep (their oldest buckets left early): at most the window's.
    view = profile.view(now=T0)
    assert stored.view(now=T0).computed == view.computed, "the record as stored reads as the one in memory"
    for i, (op, _prop) in ((i, OPS[i % len(OPS)]) for i in range(TRAITS)):
        value = view.computed[f"t{i}_30d"]
        if op == "count":
            assert value == EVENTS
        elif op == "sum":
            assert value == sum(n % 97 for n in range(EVENTS))
        elif op == "last":
            assert value == f"/products/{EVENTS - 1:06d}/reviews?sort=newest&page={(EVENTS - 1) % 7}"
        else:
            assert 0 < value <= EVENTS
    unit, points = captured.collected()["cdp.profile.record.trimmed"]
    assert unit == "{record}" and sum(point.value for point in points) >= 1
    assert {dict(point.attributes)["part"] for point in points} == {"computed"}


def _engine(store, captured: MetricsCapture) -> ProfileEngine:
    """One replica owning the one partition, publishing nowhere, its metrics captured."""
    return ProfileEngine(
        store,
        _NoBus(),
        partitions=1,
        owned=[0],
        retention=Retention(max_events=100),
        telemetry=captured.telemetry,
        clock=Clock(T0),
    )


class _NoBus:
    async def publish_batch(self, messages):  # pragma: no cover - the tests publish nothing
        return []


async def test_a_person_at_the_bound_is_logged_once_a_while_and_counted_every_time(caplog):
    """A person at their record's bound is trimmed on nearly every write: a WARNING per event of a busy
    person flooded the log. Logged once per person in TRIM_LOG_SECONDS; the metric counts every trim."""
    captured = MetricsCapture("profile")
    async with open_store("memory://") as store:
        engine = _engine(store, captured)
        with caplog.at_level("WARNING", logger="cdp.profile.engine"):
            for _ in range(5):
                engine._record_trimmed("busy", {"computed": 3})
            engine._record_trimmed("other", {"base": 1})
            engine._record_trimmed("busy", {"history": 2})  # histories alone: routine, never logged
            # so are the remembered event ids and the listed identifiers (a person merged from many accounts)
            engine._record_trimmed("merged", {"seen": 1, "identifiers": 1})
    lines = [r for r in caplog.records if "computed-trait budget" in r.getMessage()]
    assert [r.person_id for r in lines] == ["busy", "other"]
    assert not [r for r in caplog.records if r.levelname == "WARNING" and getattr(r, "person_id", "") == "merged"]
    _, points = captured.collected()["cdp.profile.record.trimmed"]
    counts = {dict(point.attributes)["part"]: point.value for point in points}
    assert counts == {"computed": 5, "base": 1, "history": 1, "seen": 1, "identifiers": 1}
