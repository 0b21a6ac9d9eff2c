"""Kill the segmentation service mid-stream, restart it, and check every published transition against a
reference computed from the published profile changes.

Segmentation holds fields and memberships in memory, snapshots them every second with the stream
positions they include, and on start replays `profiles.changed` from there, publishing again what the
replay finds under the same ids (JetStream drops the copies). The traps: a transition never published
(lost), one published twice (a duplicate enter), one that never happened (a replay over newer state
flipping a membership back and forth), and memberships that come back wrong from a snapshot. The check
is exact: per person and segment, the published enters and exits are the reference's, in order, with
their times.

One segment reads the time (`trial`: `traits.trial_ends_at > now`), set once for some persons to end a
few seconds of wall time after the change is published: whether the change is applied before the end (an
enter, then the timer's exit at the end) or after it (nothing) depends on how far behind the service is,
so either history is right, but never an enter without its exit. A replay evaluating a change with the
restart's time instead of its batch's lost the exit of a person who entered before a kill and whose trial
ended before the restart.
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
    "trial": "traits.trial_ends_at > now",
}
TIMED = "trial"


def member(segment: str, fields: dict, inside: set[str]) -> bool:
    if segment == "vip":
        return fields.get("plan") == "pro"
    if segment == "active":
        return fields.get("orders", -1) >= 30
    if segment == "vip_active":
        return "vip" in inside and "active" in inside
    return "active" not in inside


def plan(seed: int, start: float):
    """The messages to publish, per (person, segment) the reference transitions: (entered, at_ms), and per
    person whose trial is set the histories of `trial` that are right. Message i is published about
    i * 8 ms after `start` (wall time, seconds); a trial ends 1 to 5 s after that."""
    rng = random.Random(seed)
    trials: dict[str, list[list[tuple[bool, int]]]] = {}
    persons: dict[int, list[str]] = {}
    for i in range(PERSONS):
        person = f"p_{i:04d}"
        persons.setdefault(partition_for(person, PARTITIONS), []).append(person)
    state: dict[str, dict] = {}
    inside: dict[str, set[str]] = {}
    expected: dict[tuple[str, str], list[tuple[bool, int]]] = {}
    messages = []
    at_ms = T0_MS
    for i in range(MESSAGES):
        p = rng.choice(sorted(persons))
        batch = profile_pb2.ProfileChangedBatch()
        for _ in range(rng.randint(1, 5)):
            person = rng.choice(persons[p])
            at_ms += 1
            change = batch.changes.add(person_id=person, cause="event")
            change.at.FromMilliseconds(at_ms)
            if person in state and rng.random() < 0.05:
                change.removed, change.cause = True, "delete"
                right = trials.get(person)
                if right is not None and len(right) == 2:  # the first removal since its trial: it may exit so
                    right.append([right[1][0], (False, at_ms)])
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
            if person not in trials and rng.random() < 0.03:
                ends_ms = round((start + i * 0.008 + rng.uniform(1.0, 5.0)) * 1000)
                change.traits["trial_ends_at"].number_value = ends_ms / 1000
                trials[person] = [[], [(True, at_ms), (False, ends_ms)]]
            now = inside.setdefault(person, set())
            for segment in SEGMENTS:  # dependencies first
                if segment == TIMED:
                    continue
                want = member(segment, fields, now)
                if want != (segment in now):
                    (now.add if want else now.discard)(segment)
                    expected.setdefault((person, segment), []).append((want, at_ms))
        messages.append((p, batch.SerializeToString()))
    return messages, expected, inside, trials


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

        messages, expected, inside, trials = plan(seed=5, start=time.time())
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

        # Every trial has ended: what was entered has its exit published within a few timer rounds (the
        # timer's, or a removal's); one still missing then is reported below.
        ends = max(right[1][1][1] for right in trials.values()) / 1000
        await asyncio.sleep(max(0.0, ends - time.time()))
        for _ in range(50):
            if not [key for key, events in (await published(js)).items() if key[1] == TIMED and len(events) % 2]:
                break
            await asyncio.sleep(0.2)

        got = await published(js)
        wrong_trials = [
            f"{person}: published {got.get((person, TIMED), [])}, want one of {right}"
            for person, right in trials.items()
            if got.get((person, TIMED), []) not in right
        ]
        trials_run = sum(bool(got.get((person, TIMED))) for person in trials)
        assert not wrong_trials, (
            f"{len(wrong_trials)} of {len(trials)} trials ({trials_run} entered) differ, e.g. {wrong_trials[:4]}"
        )
        wrong = [
            f"{key}: published {got.get(key, [])}, want {want}"
            for key, want in expected.items()
            if got.get(key, []) != want
        ]
        extra = [f"{key}: {events}" for key, events in got.items() if key not in expected and key[1] != TIMED]
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
