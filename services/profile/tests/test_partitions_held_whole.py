"""A partition loaded whole (at start, or when it arrives) answers for persons it does not hold without
asking the store: they have no record (state.py). A record another writer put there meanwhile (a
replica combining a merge in a shared store) is not lost for that: the write that expected none is
refused, the cache is reloaded from the store, and the batch applied again follows the record.

The profile's logic is driven directly (no bus), as the partitioned engine drives it: a batch is
applied, its writes are committed on the engine's write chain, and a failed commit recovers the
partition before the batch comes again."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from cdp.events.v1 import events_pb2
from cdp_kit.storage import open_store
from cdp_kit.telemetry import setup_telemetry
from cdp_profile.domain import Retention
from cdp_profile.engine import PROFILES, ProfileEngine
from cdp_profile.stream import EventsLogic
from cdp_testing.fakes import T0, Clock, Delivery


@dataclass
class _Stored:
    ok: bool = True


class Publisher:
    async def publish_batch(self, messages):
        return [_Stored() for _ in messages]


def visit(person: str, message_id: str) -> Delivery:
    event = events_pb2.Event(
        message_id=message_id, source_id="t", type=events_pb2.EVENT_TYPE_TRACK, event="Order Completed"
    )
    event.timestamp.FromNanoseconds(int(T0 * 1e9))
    event.received_at.FromNanoseconds(int(T0 * 1e9))
    batch = events_pb2.ResolvedEventBatch()
    batch.events.add(event=event, person_id=person, identifiers=[f"user_id:{person}"])
    return Delivery(batch, "events.resolved.0", 1)


@pytest.fixture
async def engine():
    async with open_store("memory://") as store:
        engine = ProfileEngine(
            store,
            Publisher(),
            partitions=1,
            owned=[0],
            retention=Retention(max_events=100),
            telemetry=setup_telemetry("profile-test"),
            clock=Clock(T0),
        )
        await engine.start()
        try:
            yield engine
        finally:
            await engine.stop()


async def apply_until_written(engine: ProfileEngine, delivery: Delivery) -> int:
    """Apply a batch as the partitioned engine does, again after each failed commit; the failures."""
    logic = EventsLogic(engine)
    failures = 0
    while True:
        effects = await logic.apply(0, [logic.decode(delivery)])
        try:
            await engine.chain.submit(effects.writes)
            return failures
        except Exception:
            failures += 1
            assert failures < 3, "the batch never committed"
            await logic.recover(0)


async def test_a_first_seen_person_starts_a_profile_of_its_own(engine):
    assert await apply_until_written(engine, visit("p_new", "m1")) == 0
    assert engine.hot.profiles["p_new"].view(now=T0).event_count == 1
    assert (await engine.store.get(PROFILES, "p_new")).version == 1


async def test_a_record_written_by_another_replica_meanwhile_is_followed_after_a_reload(engine):
    await apply_until_written(engine, visit("p_win", "m1"))
    # Another replica sharing the store merged p_away (never seen here) into p_win.
    await engine.store.put(PROFILES, "p_away", {"merged_into": "p_win", "merge_id": "x1"})

    await apply_until_written(engine, visit("p_away", "m2"))

    assert "p_away" not in engine.hot.profiles
    assert engine.hot.root("p_away") == "p_win"
    assert engine.hot.profiles["p_win"].view(now=T0).event_count == 2
    stored = await engine.store.get(PROFILES, "p_away")
    assert stored.doc == {"merged_into": "p_win", "merge_id": "x1"}
