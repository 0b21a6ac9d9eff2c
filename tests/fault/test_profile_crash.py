"""Kill the profile service mid-stream, restart it, and compare every stored profile with a reference
built by applying the same events to the domain model in memory.

Counts and sums are the trap: an event applied twice (redelivered after a crash) would count twice, an
event lost would count zero times. Whatever the kills interrupted, the stored profiles must equal the
reference exactly, and every event must be on its person's timeline once.
"""

from __future__ import annotations

import asyncio
import random

import nats
import pytest
from nats.js.errors import NotFoundError

from cdp.events.v1 import events_pb2
from cdp.profile.v1 import profile_pb2
from cdp_kit.bus import events_resolved_stream
from cdp_kit.bus.streams import ensure_stream
from cdp_kit.storage import Put, open_store
from cdp_profile.domain import ComputedTrait, ComputedTraits, Profile, Retention, TimelineEntry
from cdp_profile.events import to_profile_event
from cdp_profile.records import decode_profile, row_entries
from cdp_testing.processes import ProfileProcess

EVENTS = 6_000
PER_MESSAGE = 20
NOW = 1_795_000_000
DEFINITIONS = [
    {"name": "orders", "op": "count", "event_names": ["Order Completed"]},
    {"name": "revenue", "op": "sum", "event_names": ["Order Completed"], "property": "price"},
    {"name": "aov", "op": "avg", "event_names": ["Order Completed"], "property": "price"},
    {"name": "skus", "op": "unique_count", "property": "sku"},
    {"name": "views_long", "op": "count", "event_names": ["Viewed"], "window": "3650d"},
]


def random_events(seed: int) -> list[events_pb2.ResolvedEvent]:
    rng = random.Random(seed)
    out = []
    for i in range(EVENTS):
        person = f"p_{rng.randrange(150):04d}"
        ev = events_pb2.Event(message_id=f"e{i}", source_id="crash", user_id=f"user-{person}")
        ev.timestamp.FromSeconds(NOW - rng.randrange(86_400 * 30))
        ev.received_at.FromSeconds(NOW)
        if rng.random() < 0.2:
            ev.type = events_pb2.EVENT_TYPE_IDENTIFY
            ev.traits.update({"plan": rng.choice(["free", "pro"]), "n": i})
        else:
            ev.type = events_pb2.EVENT_TYPE_TRACK
            ev.event = rng.choice(["Order Completed", "Viewed"])
            ev.properties.update({"price": rng.randrange(1, 100), "sku": f"s{rng.randrange(40)}"})
        out.append(events_pb2.ResolvedEvent(event=ev, person_id=person, identifiers=[f"user_id:user-{person}"]))
    return out


def reference(events, retention: Retention) -> dict[str, Profile]:
    defs = ComputedTraits([ComputedTrait.from_dict(d) for d in DEFINITIONS])
    profiles: dict[str, Profile] = {}
    for resolved in events:
        profile = profiles.setdefault(resolved.person_id, Profile.new(resolved.person_id, retention=retention))
        profile.apply(to_profile_event(resolved), defs, now=NOW)
    return profiles


async def stored(store_url: str, retention: Retention) -> dict[str, Profile]:
    async with open_store(store_url) as store:
        timelines: dict[str, list[TimelineEntry]] = {}
        async for record in store.scan_all("profile_timeline", page_size=5000):
            for entry in row_entries(record.doc):  # a page, or one entry (older releases)
                timelines.setdefault(entry.origin, []).append(entry)
        out = {}
        async for record in store.scan_all("profiles"):
            out[record.key] = decode_profile(record.doc, timelines.get(record.key, []), retention)
    return out


async def processed(js) -> int:
    try:
        return (await js.consumer_info("EVENTS_RESOLVED", "profile-p0")).ack_floor.stream_seq
    except NotFoundError:
        return 0


@pytest.mark.timeout(240)
async def test_killed_mid_stream_restarts_to_the_reference_profiles(nats_server, tmp_path):
    events = random_events(seed=3)
    retention = Retention(max_events=1000, max_age_seconds=None)
    store_url = f"sqlite:///{tmp_path / 'profile.db'}"
    async with open_store(store_url) as store:
        await store.bulk_write(
            [
                Put("profile_computed_traits", d["name"], {"definition": d, "defined_at": 0, "state": "ready"})
                for d in DEFINITIONS
            ]
        )
    service = ProfileProcess(
        nats_server.url,
        tmp_path,
        store_url=store_url,
        partitions=1,
        CDP_PROFILE_BATCH_SIZE="8",
        CDP_PROFILE_ACK_WAIT="1",
        CDP_PROFILE_TIMELINE_MAX_EVENTS="1000",
        CDP_PROFILE_TIMELINE_MAX_AGE_DAYS="0",
        CDP_IDENTITY_ADDRESS="127.0.0.1:1",
    )
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    try:
        await ensure_stream(js, events_resolved_stream())
        messages = 0
        for start in range(0, EVENTS, PER_MESSAGE):
            batch = events_pb2.ResolvedEventBatch(events=events[start : start + PER_MESSAGE])
            await js.publish("events.resolved.0", batch.SerializeToString(), headers={"Nats-Msg-Id": f"b{start}"})
            messages += 1
        service.start()
        kills = 0
        for _ in range(5):
            target = min(await processed(js) + 40, messages)
            for _ in range(20_000):
                if await processed(js) >= target:
                    break
                await asyncio.sleep(0.01)
            if await processed(js) >= messages:
                break
            service.kill()
            kills += 1
            service.start()
        for _ in range(600):
            if await processed(js) >= messages:
                break
            await asyncio.sleep(0.1)
        service.stop()
        assert kills >= 3, "the service finished before it could be killed; make the stream longer"
        expected = reference(events, retention)
        actual = await stored(store_url, retention)
        assert set(actual) == set(expected), "a person is missing or extra"
        for person, profile in expected.items():
            want, got = profile.view(now=NOW), actual[person].view(now=NOW)
            assert got.event_count == want.event_count, f"{person}: events lost or doubled"
            assert got.computed == pytest.approx(want.computed), f"{person}: computed traits differ"
            assert {k: v.value for k, v in got.traits.items()} == {k: v.value for k, v in want.traits.items()}
            ids = [e.event_id for e in actual[person].events(limit=10_000)[0]]
            assert len(ids) == len(set(ids)) == want.event_count
        # Downstream saw every event's change, even those whose publish a kill interrupted.
        published = set()
        info = await js.stream_info("PROFILES")
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            batch = profile_pb2.ProfileChangedBatch.FromString((await js.get_msg("PROFILES", seq)).data)
            for change in batch.changes:
                published.update(change.event_ids)
        assert published == {f"crash:{r.event.message_id}" for r in events}, "a change never reached profiles.changed"
    finally:
        service.stop()
        await nc.close()
