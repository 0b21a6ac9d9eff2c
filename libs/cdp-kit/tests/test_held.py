"""HeldFields: per-person state snapshotted with the stream positions it includes, replayed from there."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from cdp_kit.errors import Unavailable
from cdp_kit.held import Codec, HeldFields, apply_updates
from cdp_kit.storage import MemoryStore, VersionConflict

FIELDS = "t_fields"
CHECKPOINTS = "t_checkpoints"
SUBJECT = "profiles.changed.0"

CODEC: Codec[dict[str, Any], dict[str, Any]] = Codec(
    copy=dict.copy,
    encode=lambda fields: {"fields": orjson.dumps(fields).decode()},
    decode=lambda doc: orjson.loads(doc["fields"]),
)


class Store(MemoryStore):
    """The memory store, counting erasures and failing the next `fail` bulk writes."""

    def __init__(self) -> None:
        super().__init__()
        self.erased = 0
        self.fail = 0

    async def bulk_write(self, ops):
        ops = list(ops)
        if self.fail:
            self.fail -= 1
            raise Unavailable("the store is down")
        return await super().bulk_write(ops)

    async def erase(self) -> bool:
        self.erased += 1
        return await super().erase()


def held(store, **overrides) -> HeldFields[dict[str, Any]]:
    options: dict[str, Any] = dict(
        collection=FIELDS, checkpoints=CHECKPOINTS, owns=lambda _p: True, codec=CODEC, clock=lambda: 1.0
    )
    options.update(overrides)
    return HeldFields(store, **options)


def change(h: HeldFields, person: str, **updates) -> None:
    fields = h.persons.setdefault(person, {})
    if apply_updates(fields, updates):
        h.mark(person)


async def stored(store, collection=FIELDS) -> dict[str, Any]:
    return {r.key: r.doc async for r in store.scan_all(collection)}


async def test_a_restart_comes_back_from_the_snapshot_plus_the_stream_after_it():
    store = Store()
    first = held(store)
    change(first, "p1", **{"traits.plan": "pro"})
    first.applied[SUBJECT] = 1
    assert await first.snapshot() == 2  # the person, then the position
    change(first, "p1", **{"traits.plan": "free"})  # after the snapshot: only on the stream
    first.applied[SUBJECT] = 2

    again = held(store)
    await again.load()
    assert again.persons == {"p1": {"traits.plan": "pro"}}
    assert again.applied == {SUBJECT: 1}

    async def stream():
        yield SUBJECT, 1, b"plan=pro"  # in the snapshot already
        yield SUBJECT, 2, b"plan=free"

    seen = []

    async def apply(subject, seq, data):
        seen.append(seq)
        change(again, "p1", **{"traits.plan": data.decode().split("=")[1]})
        return 1

    assert await again.replay(stream(), apply) == 1
    assert seen == [2]
    assert again.persons == {"p1": {"traits.plan": "free"}} and again.applied == {SUBJECT: 2}


async def test_nothing_changed_writes_nothing():
    store = Store()
    h = held(store)
    assert await h.snapshot() == 0
    change(h, "p1", **{"traits.a": 1.0})
    assert await h.snapshot() == 1
    change(h, "p1", **{"traits.a": 1.0})  # the same value: not a change
    assert await h.snapshot() == 0


async def test_a_removed_person_is_deleted_and_the_store_erased():
    store = Store()
    h = held(store)
    change(h, "p1", **{"traits.email": "a@example.com"})
    change(h, "p2", **{"traits.plan": "pro"})
    await h.snapshot()
    assert store.erased == 0
    assert h.remove("p1") == {"traits.email": "a@example.com"}
    assert h.remove("p1") is None
    await h.snapshot()
    assert set(await stored(store)) == {"p2"}
    assert store.erased == 1


async def test_a_person_removed_then_seen_again_is_written_and_the_store_still_erased():
    store = Store()
    h = held(store)
    change(h, "p1", **{"traits.email": "a@example.com"})
    await h.snapshot()
    h.remove("p1")
    change(h, "p1", **{"traits.plan": "pro"})  # merged away and back, before any snapshot
    await h.snapshot()
    assert orjson.loads((await stored(store))["p1"]["fields"]) == {"traits.plan": "pro"}
    assert store.erased == 1


async def test_forgotten_persons_are_neither_written_nor_deleted_by_the_next_snapshot():
    store = Store()
    h = held(store)
    change(h, "p1", **{"traits.plan": "free"})
    change(h, "p2", **{"traits.plan": "free"})
    await h.snapshot()
    change(h, "p1", **{"traits.plan": "pro"})  # changed, then handed over before a snapshot
    h.remove("p2")  # removed, then handed over before a snapshot
    assert h.forget(lambda person: person in {"p1", "p2"}) == 1
    assert h.persons == {} and h.versions == {}
    await h.snapshot()
    # The store keeps what the last snapshot wrote: the new holder replays the rest from its positions.
    assert {k: orjson.loads(v["fields"]) for k, v in (await stored(store)).items()} == {
        "p1": {"traits.plan": "free"},
        "p2": {"traits.plan": "free"},
    }
    assert store.erased == 0


async def test_a_failed_snapshot_loses_nothing():
    store = Store()
    h = held(store)
    change(h, "p1", **{"traits.a": 1.0})
    await h.snapshot()
    change(h, "p2", **{"traits.a": 2.0})
    h.remove("p1")
    h.applied[SUBJECT] = 7
    store.fail = 1
    with pytest.raises(Unavailable):
        await h.snapshot()
    assert await h.snapshot() > 0
    assert set(await stored(store)) == {"p2"}
    assert (await stored(store, CHECKPOINTS))[SUBJECT]["stream_seq"] == 7
    assert store.erased == 1


async def test_no_snapshot_while_results_wait_to_be_published():
    store = Store()
    waiting = [True]
    h = held(store, behind=lambda: waiting[0])
    change(h, "p1", **{"traits.a": 1.0})
    assert await h.snapshot() == 0
    assert await stored(store) == {}
    waiting[0] = False
    assert await h.snapshot() == 1


async def test_a_snapshot_waits_for_the_mutation_in_flight():
    store = Store()
    h = held(store)
    release = asyncio.Event()

    async def mutate():
        async with h.mutating():
            change(h, "p1", **{"traits.a": 1.0})
            await release.wait()  # publishing what the change found
            change(h, "p1", **{"traits.b": 2.0})

    task = asyncio.create_task(mutate())
    await asyncio.sleep(0)
    snapshot = asyncio.create_task(h.snapshot())
    await asyncio.sleep(0.01)
    assert not snapshot.done()
    release.set()
    await task
    await snapshot
    assert orjson.loads((await stored(store))["p1"]["fields"]) == {"traits.a": 1.0, "traits.b": 2.0}


async def test_copied_is_called_at_the_cut_before_anything_is_written():
    """A service that holds its changes back for the cut (segmentation, at its stream's quiescent point)
    lets them go on once the state is copied, not once it is written."""

    class Slow(Store):
        def __init__(self) -> None:
            super().__init__()
            self.release = asyncio.Event()

        async def bulk_write(self, ops):
            await self.release.wait()
            return await super().bulk_write(ops)

    store = Slow()
    h = held(store)
    change(h, "p1", **{"traits.plan": "pro"})
    h.applied[SUBJECT] = 1
    copied = asyncio.Event()
    snapshot = asyncio.create_task(h.snapshot(copied=copied.set))
    await asyncio.wait_for(copied.wait(), 5)
    assert await stored(store) == {}  # nothing written yet
    change(h, "p1", **{"traits.plan": "free"})  # after the cut: the next snapshot's
    h.applied[SUBJECT] = 2
    store.release.set()
    assert await snapshot == 2
    assert orjson.loads((await stored(store))["p1"]["fields"]) == {"traits.plan": "pro"}
    assert (await stored(store, CHECKPOINTS))[SUBJECT]["stream_seq"] == 1


async def test_marks_are_written_beside_the_positions_and_loaded_back():
    store = Store()
    built = {"vip": 3}
    h = held(store, marks=lambda: {"$built": {"versions": dict(built)}})
    h.marks_dirty = True  # nothing else changed: the marks alone make a snapshot due
    assert await h.snapshot() == 1
    again = held(store)
    await again.load()
    assert again.loaded_marks == {"$built": {"versions": {"vip": 3}}}
    assert again.applied == {}


async def test_only_owned_persons_are_loaded():
    store = Store()
    h = held(store)
    change(h, "p1", **{"traits.a": 1.0})
    change(h, "p2", **{"traits.a": 2.0})
    await h.snapshot()
    mine = held(store, owns=lambda person: person == "p2")
    await mine.load()
    assert set(mine.persons) == {"p2"}


async def test_versioned_writes_catch_a_second_writer():
    store = Store()
    h = held(store, versioned=True)
    change(h, "p1", **{"traits.a": 1.0})
    await h.snapshot()
    other = held(store, versioned=True)  # believes it writes p1 for the first time
    change(other, "p1", **{"traits.a": 9.0})
    with pytest.raises(VersionConflict):
        await other.snapshot()
    change(h, "p1", **{"traits.a": 2.0})
    await h.snapshot()
    assert orjson.loads((await stored(store))["p1"]["fields"]) == {"traits.a": 2.0}


async def test_fetch_on_a_miss_reads_the_profile_service_when_there_is_one():
    store = Store()
    assert await held(store).fetch("p1") is None

    async def profile(person_id):
        return {"traits.plan": "pro"} if person_id == "p1" else None

    h = held(store, fetch=profile)
    assert await h.fetch("p1") == {"traits.plan": "pro"}
    assert await h.fetch("p9") is None


def test_apply_updates_reports_what_changed_with_the_value_before():
    fields = {"traits.a": 1.0, "traits.b": "x"}
    changed = apply_updates(fields, {"traits.a": 2.0, "traits.b": None, "traits.c": True, "traits.d": None})
    assert fields == {"traits.a": 2.0, "traits.c": True}
    assert changed == {"traits.a": 1.0, "traits.b": "x", "traits.c": None}
