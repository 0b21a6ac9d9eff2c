"""A person's timeline as the store holds it: the newest entries in the person's record, the rest in pages
of PAGE_ENTRIES entries (`timeline.py`), and stores the release before pages wrote (one row per entry)
still read, alone or mixed with pages within one person.

Every test drives the profile's logic directly (no bus): events applied as the partitioned engine applies
them, identity's merges and unmerges as its input applies them, their writes committed on the engine's
write chain to the memory store. After each step the store, read back the way a restarted replica reads
it (and the way readers outside the service do, `records.stored_timeline`), holds exactly the timeline
the engine holds in memory: no entry lost, none twice, none that retention dropped."""

from __future__ import annotations

import orjson

from cdp.events.v1 import events_pb2
from cdp.identity.v1 import identity_pb2
from cdp_kit.storage import Put, open_store
from cdp_profile.apply import apply_identity
from cdp_profile.domain import ComputedTraits, Profile, Retention
from cdp_profile.engine import ProfileEngine
from cdp_profile.events import to_profile_event
from cdp_profile.records import (
    HEAD,
    PROFILES,
    TIMELINE,
    decode_entry,
    encode_entry,
    encode_profile,
    head_entries,
    row_entries,
    stored_timeline,
    timeline_key,
    timeline_prefix,
)
from cdp_profile.state import HotProfiles
from cdp_profile.stream import EventsLogic
from cdp_profile.timeline import HEAD_MAX_BYTES, PAGE_ENTRIES
from cdp_testing.fakes import T0, Clock, Delivery
from cdp_testing.metrics import MetricsCapture


class _NoBus:
    async def publish_batch(self, messages):  # pragma: no cover - nothing is published here
        return []


def _engine(store, retention: Retention, clock: Clock | None = None, *, pages: bool = True) -> ProfileEngine:
    return ProfileEngine(
        store,
        _NoBus(),
        partitions=1,
        owned=[0],
        retention=retention,
        telemetry=MetricsCapture("profile").telemetry,
        clock=clock or Clock(T0),
        timeline_pages=pages,
    )


def _event(person: str, n: int, *, at: float | None = None, size: int = 0) -> events_pb2.ResolvedEvent:
    at = T0 - 10_000 + n if at is None else at
    event = events_pb2.Event(message_id=f"{person}-{n:05d}", source_id="web", type=events_pb2.EVENT_TYPE_TRACK)
    event.event = "Viewed"
    event.timestamp.FromNanoseconds(int(at * 1e9))
    event.received_at.FromNanoseconds(int(at * 1e9))
    event.properties.update({"sku": f"sku-{n}", "note": "x" * size})
    return events_pb2.ResolvedEvent(event=event, person_id=person, identifiers=[f"user_id:{person}"])


class Feed:
    """Batches of events into the engine, as its events input applies and writes them."""

    def __init__(self, engine: ProfileEngine) -> None:
        self.engine = engine
        self.logic = EventsLogic(engine)
        self.seq = 0
        self.timeline_ops = 0  # rows of the timeline written or deleted

    async def __call__(self, *events: events_pb2.ResolvedEvent) -> None:
        self.seq += 1
        delivery = Delivery(events_pb2.ResolvedEventBatch(events=events), "events.resolved.0", self.seq)
        effects = await self.logic.apply(0, [self.logic.decode(delivery)])
        self.timeline_ops += sum(1 for op in effects.writes if op.collection == TIMELINE)
        await self.engine.chain.submit(effects.writes)

    async def pairs(self, person: str, start: int, stop: int, *, checked: bool = False) -> None:
        """`person`'s events start..stop-1, two a batch (the pipeline's shape); `checked`: the store read back
        after each batch holds what the engine holds."""
        for n in range(start, stop, 2):
            await self(_event(person, n), _event(person, n + 1))
            if checked:
                await self.engine.flush()
                await assert_stored_as_held(self.engine, person)

    async def identity(self, kind: str, winner: str, loser: str, merge_id: str) -> None:
        message = (identity_pb2.IdentityMerged if kind == "merged" else identity_pb2.IdentityUnmerged)(
            merge_id=merge_id, winner=winner, loser=loser
        )
        self.seq += 1
        out = await apply_identity(
            self.engine.hot,
            [Delivery(message, f"identity.{kind}.0", self.seq)],
            self.engine.defs,
            owns=self.engine.owns,
            now=self.engine.clock(),
        )
        await self.engine.commit(out.changes, ops=out.ops)


async def _rows(store) -> dict[str, dict]:
    return {record.key: record.doc async for record in store.scan_all(TIMELINE)}


async def _reloaded(store, retention: Retention, person: str) -> Profile:
    """The person as a replica starting on this store loads it."""
    hot = HotProfiles(store, retention=retention, owns=lambda _person: True)
    await hot.load([person])
    return hot.profiles[person]


async def assert_stored_as_held(engine: ProfileEngine, person: str) -> None:
    """The store holds exactly the timeline the engine holds: read back by a replica and by `stored_timeline`."""
    held = engine.profiles[person]
    record = await engine.store.get(PROFILES, person)
    origins = [person, *record.doc.get("merged_from", [])]
    rows = [
        row.doc for origin in origins async for row in engine.store.scan_all(TIMELINE, prefix=timeline_prefix(origin))
    ]
    assert stored_timeline(record.doc, rows) == held.timeline()
    # and each entry once: in the record's head or in one row
    raw = head_entries(record.doc) + [entry for row in rows for entry in row_entries(row)]
    assert sorted(raw) == held.timeline()
    reloaded = await _reloaded(engine.store, engine.retention, person)
    assert reloaded.timeline() == held.timeline()
    assert reloaded.to_doc() == held.to_doc()


async def test_an_event_writes_its_record_and_a_share_of_a_page_and_a_restart_reads_the_same_timeline():
    async with open_store("memory://") as store:
        engine = _engine(store, Retention(max_events=1000))
        feed = Feed(engine)
        await feed.pairs("ann", 0, 40)
        await engine.flush()
        rows = await _rows(store)
        # 40 entries: two full pages in the timeline collection, the newest 8 in ann's record.
        assert [len(row_entries(doc)) for doc in rows.values()] == [PAGE_ENTRIES, PAGE_ENTRIES]
        assert all(key.startswith(timeline_prefix("ann")) and key.endswith("|page") for key in rows)
        record = await store.get(PROFILES, "ann")
        assert len(orjson.loads(record.doc[HEAD])) == 40 - 2 * PAGE_ENTRIES
        assert feed.timeline_ops == 2, "a row written per page, none per event"
        await assert_stored_as_held(engine, "ann")
        assert len(engine.profiles["ann"].timeline()) == 40


async def test_a_store_of_the_release_before_pages_loads_to_the_same_profile_and_takes_new_events_in_pages():
    retention = Retention(max_events=30)
    # What the release before pages stored for bob, who absorbed carl: a record without a head and a row per
    # entry of each part, keyed by the part's origin.
    bob = Profile.new("bob", retention=retention)
    carl = Profile.new("carl", retention=retention)
    for n in range(12):
        bob.apply(to_profile_event(_event("bob", n)), _no_defs(), now=T0)
        carl.apply(to_profile_event(_event("carl", n, at=T0 - 10_000 + n + 0.5)), _no_defs(), now=T0)
    bob.merge(carl, merge_id="m1", at=T0 - 5_000, defs=_no_defs(), now=T0)
    async with open_store("memory://") as store:
        ops = [
            Put(PROFILES, "bob", encode_profile(bob)),
            Put(PROFILES, "carl", {"merged_into": "bob", "merge_id": "m1"}),
        ]
        ops += [Put(TIMELINE, timeline_key(entry), encode_entry(entry)) for entry in bob.timeline()]
        await store.bulk_write(ops)
        assert HEAD not in (await store.get(PROFILES, "bob")).doc

        loaded = await _reloaded(store, retention, "bob")
        assert loaded.to_doc() == bob.to_doc()
        assert loaded.timeline() == bob.timeline() and len(bob.timeline()) == 24

        # The upgraded replica adds bob's new events to his record and then in pages; retention (30) drops
        # the oldest entries, rows of the older format, which are deleted.
        engine = _engine(store, retention)
        await engine.start()
        await Feed(engine).pairs("bob", 12, 32, checked=True)
        rows = await _rows(store)
        singles = [key for key, doc in rows.items() if "entry" in doc]
        pages = [key for key, doc in rows.items() if "entries" in doc]
        assert pages and singles, "both formats within one person"
        held = {(e.origin, e.event_id) for e in engine.profiles["bob"].timeline()}
        assert len(held) == 30
        for doc in rows.values():  # no row keeps an entry retention dropped
            assert {(e.origin, e.event_id) for e in row_entries(doc)} <= held
        await engine.stop()


def _no_defs() -> ComputedTraits:
    return ComputedTraits([])


async def test_retention_by_count_and_by_age_rewrites_or_deletes_the_pages_it_cuts_into():
    clock = Clock(T0)
    retention = Retention(max_events=20, max_age_seconds=3_600)
    async with open_store("memory://") as store:
        engine = _engine(store, retention, clock)
        await engine.start()
        feed = Feed(engine)
        for n in range(0, 50):
            await feed(_event("dee", n, at=T0 - 1_000 + n))
        await engine.flush()
        await assert_stored_as_held(engine, "dee")
        held = engine.profiles["dee"].timeline()
        assert len(held) == 20
        rows = await _rows(store)
        stored = [(e.origin, e.event_id) for doc in rows.values() for e in row_entries(doc)]
        assert len(stored) == len(set(stored)) and set(stored) <= {(e.origin, e.event_id) for e in held}
        # An hour on, every entry has aged out: the next event takes them off, their pages go, and the head
        # holds that event alone.
        clock.advance(3_600)
        await feed(_event("dee", 100, at=clock()))
        await engine.flush()
        assert [e.event_id for e in engine.profiles["dee"].timeline()] == ["web:dee-00100"]
        assert await _rows(store) == {}
        assert len(orjson.loads((await store.get(PROFILES, "dee")).doc[HEAD])) == 1
        await assert_stored_as_held(engine, "dee")
        await engine.stop()


async def test_events_with_large_properties_leave_the_record_before_a_page_fills():
    async with open_store("memory://") as store:
        engine = _engine(store, Retention(max_events=1000))
        feed = Feed(engine)
        largest_head = 0
        for n in range(12):
            await feed(_event("eve", n, size=20_000))
            await engine.flush()
            head = (await store.get(PROFILES, "eve")).doc.get(HEAD, "")
            largest_head = max(largest_head, len(head))
        assert largest_head <= HEAD_MAX_BYTES
        rows = await _rows(store)
        assert len(rows) >= 12 // 4 and all(len(row_entries(doc)) < PAGE_ENTRIES for doc in rows.values())
        await assert_stored_as_held(engine, "eve")


async def test_merges_and_splits_move_no_row_and_every_part_reads_back_whole():
    async with open_store("memory://") as store:
        engine = _engine(store, Retention(max_events=1000))
        await engine.start()
        feed = Feed(engine)
        for n in range(0, 21):
            await feed(_event("fay", n), _event("gus", n, at=T0 - 10_000 + n + 0.5))
        await engine.flush()
        before = await _rows(store)
        await feed.identity("merged", "fay", "gus", "m1")
        await engine.flush()
        assert await _rows(store) == before, "a merge writes no timeline row"
        assert HEAD not in (await store.get(PROFILES, "gus")).doc  # gus's head went with his part into fay's
        await assert_stored_as_held(engine, "fay")
        assert len(engine.profiles["fay"].timeline()) == 42
        await feed(_event("fay", 100), _event("gus", 100))  # gus's events now go to fay's profile
        await feed.identity("unmerged", "fay", "gus", "m1")
        await engine.flush()
        await assert_stored_as_held(engine, "fay")
        await assert_stored_as_held(engine, "gus")
        assert len(engine.profiles["gus"].timeline()) == 22 and len(engine.profiles["fay"].timeline()) == 22
        await engine.stop()


async def test_a_deletion_leaves_no_page_no_row_of_the_older_format_and_no_head(running_engine, tmp_path):
    async with running_engine(f"sqlite:///{tmp_path / 'p.db'}", hash_key="k" * 32, name="pages-delete") as engine:
        events = [_event("hal", n) for n in range(40)]
        for first in range(0, 40, 10):
            await engine.feed(*events[first : first + 10])
        await engine.feed(*(_event("ivy", n) for n in range(3)))
        await engine.flush()
        # A row the release before pages wrote for hal, and pages and a head this one wrote.
        old = Profile.new("hal")
        old.apply(to_profile_event(_event("hal", -1)), _no_defs(), now=T0)
        (entry,) = old.timeline()
        await engine.store.put(TIMELINE, timeline_key(entry), encode_entry(entry))
        rows = await _rows(engine.store)
        assert sum(1 for key in rows if key.startswith(timeline_prefix("hal"))) == 40 // PAGE_ENTRIES + 1
        assert HEAD in (await engine.store.get(PROFILES, "hal")).doc

        result = await engine.delete("hal", suppress=False, request_id="r-hal")
        await engine.flush()
        assert result["timeline_events"] == 40
        rows = await _rows(engine.store)
        assert not [key for key in rows if key.startswith(timeline_prefix("hal"))]
        assert set((await engine.store.get(PROFILES, "hal")).doc) == {"deleted_at", "request_id"}
        dump = orjson.dumps([rows, [r.doc async for r in engine.store.scan_all(PROFILES)]]).decode()
        assert "hal-000" not in dump and "ivy-0000" in dump  # ivy's head is untouched


async def test_with_pages_off_every_entry_is_a_row_the_release_before_pages_reads():
    """CDP_PROFILE_TIMELINE_PAGES=false, for a rolling upgrade from a release before pages: its replicas still
    running read each timeline row with `decode_entry` and rewrite a record without a head, so this release
    must write nothing else until they are gone. Retention still takes what it drops off the rows."""
    retention = Retention(max_events=20)
    async with open_store("memory://") as store:
        engine = _engine(store, retention, pages=False)
        await engine.start()
        await Feed(engine).pairs("joe", 0, 30)
        await engine.flush()
        rows = await _rows(store)
        assert HEAD not in (await store.get(PROFILES, "joe")).doc
        # Each row as the release before pages wrote it, and read the way it reads them.
        assert sorted(decode_entry(doc) for doc in rows.values()) == engine.profiles["joe"].timeline()
        assert sorted(rows) == sorted(timeline_key(entry) for entry in engine.profiles["joe"].timeline())
        assert len(rows) == 20
        await assert_stored_as_held(engine, "joe")
        await engine.stop()
        # Pages on again (the upgrade done): the same store goes on, the rows read as they are.
        engine = _engine(store, retention)
        await engine.start()
        await Feed(engine).pairs("joe", 30, 50, checked=True)
        assert len(engine.profiles["joe"].timeline()) == 20
        await engine.stop()
