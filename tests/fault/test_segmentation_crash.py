"""Kill the segmentation service mid-stream, restart it, and check every published transition against a
reference computed from the published profile changes.

Segmentation holds fields and memberships in memory, snapshots them every second with the stream
positions they include, and on start replays `profiles.changed` from there, publishing again what the
replay finds under the same ids (JetStream drops the copies). The traps: a transition never published
(lost), one published twice (a duplicate enter), one that never happened (a replay over newer state
flipping a membership back and forth), and memberships that come back wrong from a snapshot. The check
is exact: per person and segment, the published enters and exits are the reference's, in order, with
their times.
"""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest
from nats.js.errors import NotFoundError

from cdp.profile.v1 import profile_pb2
from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from cdp_kit.bus import partition_for
from cdp_testing.processes import SegmentationProcess, started_on_profiles

PARTITIONS = 4
PERSONS = 240
MESSAGES = 1_200  # of 1 to 5 changes each: about 3,600 changes
T0_MS = 1_790_000_000_000
SEGMENTS = {
    "vip": 'traits.plan = "pro"',
    "active": "computed.orders_90d >= 30",
    "vip_active": 'in_segment("vip") and in_segment("active")',
    "dormant": 'not in_segment("active")',
}


def member(segment: str, fields: dict, inside: set[str]) -> bool:
    if segment == "vip":
        return fields.get("plan") == "pro"
    if segment == "active":
        return fields.get("orders", -1) >= 30
    if segment == "vip_active":
        return "vip" in inside and "active" in inside
    return "active" not in inside


def plan(seed: int):
    """The messages to publish, and per (person, segment) the reference transitions: (entered, at_ms)."""
    rng = random.Random(seed)
    persons: dict[int, list[str]] = {}
    for i in range(PERSONS):
        person = f"p_{i:04d}"
        persons.setdefault(partition_for(person, PARTITIONS), []).append(person)
    state: dict[str, dict] = {}
    inside: dict[str, set[str]] = {}
    expected: dict[tuple[str, str], list[tuple[bool, int]]] = {}
    messages = []
    at_ms = T0_MS
    for _ in range(MESSAGES):
        p = rng.choice(sorted(persons))
        batch = profile_pb2.ProfileChangedBatch()
        for _ in range(rng.randint(1, 5)):
            person = rng.choice(persons[p])
            at_ms += 1
            change = batch.changes.add(person_id=person, cause="event")
            change.at.FromMilliseconds(at_ms)
            if person in state and rng.random() < 0.05:
                change.removed, change.cause = True, "delete"
                for segment in sorted(inside.pop(person)):
                    expected.setdefault((person, segment), []).append((False, at_ms))
                del state[person]
                continue
            fields = state.setdefault(person, {})
            if rng.random() < 0.5:
                fields["plan"] = rng.choice(["free", "pro", "team"])
                change.traits["plan"].string_value = fields["plan"]
            else:
                fields["orders"] = float(rng.randrange(60))
                change.computed["orders_90d"].number_value = fields["orders"]
            now = inside.setdefault(person, set())
            for segment in SEGMENTS:  # dependencies first
                want = member(segment, fields, now)
                if want != (segment in now):
                    (now.add if want else now.discard)(segment)
                    expected.setdefault((person, segment), []).append((want, at_ms))
        messages.append((p, batch.SerializeToString()))
    return messages, expected, inside


async def published(js) -> dict[tuple[str, str], list[tuple[bool, int]]]:
    info = await js.stream_info("SEGMENTS")
    out: dict[tuple[str, str], list[tuple[bool, int]]] = {}
    ids = set()
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        if not info.state.messages:
            break
        msg = await js.get_msg("SEGMENTS", seq)
        for event in segmentation_pb2.SegmentEventBatch.FromString(msg.data).events:
            assert event.id not in ids, f"transition {event.id} published twice"
            ids.add(event.id)
            kind = "entered" if event.entered else "exited"
            assert msg.subject == f"segments.{kind}.{partition_for(event.person_id, PARTITIONS)}"
            at_ms = round((event.at.seconds + event.at.nanos / 1e9) * 1000)
            out.setdefault((event.person_id, event.segment_id), []).append((event.entered, at_ms))
    return out


async def drained(js, last: dict[int, int]) -> bool:
    for p, seq in last.items():
        try:
            info = await js.consumer_info("PROFILES", f"segmentation-p{p}")
        except NotFoundError:
            return False
        if info.num_pending or info.num_ack_pending or info.ack_floor.stream_seq < seq:
            return False
    return True


async def memberships_differ(address: str, inside: dict[str, set[str]]) -> list[str]:
    problems = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = segmentation_pb2_grpc.SegmentationServiceStub(channel)
        for i in range(PERSONS):
            person = f"p_{i:04d}"
            got = await stub.GetMembership(segmentation_pb2.GetMembershipRequest(person_id=person), timeout=10)
            have = {m.segment_id for m in got.segments}
            if have != inside.get(person, set()):
                problems.append(f"{person}: {sorted(have)}, want {sorted(inside.get(person, set()))}")
    return problems


@pytest.mark.timeout(180)
async def test_killed_mid_stream_publishes_every_transition_once_and_none_that_did_not_happen(nats_server, tmp_path):
    messages, expected, inside = plan(seed=5)
    service = SegmentationProcess(
        nats_server.url,
        tmp_path,
        store_url=f"sqlite:///{tmp_path / 'segmentation.db'}",
        partitions=PARTITIONS,
        CDP_SEGMENTATION_BATCH_SIZE="8",
        CDP_SEGMENTATION_ACK_WAIT="5",
    )
    rng = random.Random(3)
    async with started_on_profiles(service, nats_server.url) as js:
        async with grpc.aio.insecure_channel(service.grpc_address) as channel:
            stub = segmentation_pb2_grpc.SegmentationServiceStub(channel)
            for segment_id, text in SEGMENTS.items():
                created = await stub.CreateSegment(
                    segmentation_pb2.CreateSegmentRequest(
                        id=segment_id, definition=segmentation_pb2.Definition(text=text), wait=True
                    ),
                    timeout=30,
                )
                assert created.state == segmentation_pb2.SEGMENT_STATE_LIVE

        last: dict[int, int] = {}

        async def publish() -> None:
            for i, (p, data) in enumerate(messages):
                ack = await js.publish(f"profiles.changed.{p}", data, headers={"Nats-Msg-Id": f"crash-{i}"})
                last[p] = ack.seq
                if i % 10 == 9:
                    await asyncio.sleep(0.08)  # about 10 s of changes, while the kills below go on

        publishing = asyncio.create_task(publish())
        kills = 0
        while kills < 3 or not publishing.done():
            await asyncio.sleep(rng.uniform(0.3, 1.8))
            service.kill()
            kills += 1
            await asyncio.to_thread(service.start)
        await publishing

        deadline = time.monotonic() + 60
        while not await drained(js, last):
            assert time.monotonic() < deadline, "the segmentation consumers never caught up; see segmentation.log"
            await asyncio.sleep(0.2)

        got = await published(js)
        wrong = [
            f"{key}: published {got.get(key, [])}, want {want}"
            for key, want in expected.items()
            if got.get(key, []) != want
        ]
        extra = [f"{key}: {events}" for key, events in got.items() if key not in expected]
        transitions = sum(len(v) for v in expected.values())
        assert not wrong and not extra, (
            f"{len(wrong)} of {len(expected)} person-segment histories differ from the reference "
            f"({transitions} transitions), {len(extra)} never should have moved; e.g. {(wrong + extra)[:4]}"
        )
        problems = await memberships_differ(service.grpc_address, inside)
        assert not problems, f"{len(problems)} persons' memberships differ, e.g. {problems[:5]}"
        # Once more from the snapshot alone, with nothing left to redeliver: nothing new is published.
        service.kill()
        service.start()
        problems = await memberships_differ(service.grpc_address, inside)
        assert not problems, f"after a restart, {len(problems)} persons' memberships differ, e.g. {problems[:5]}"
        assert await published(js) == got
