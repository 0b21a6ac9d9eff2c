"""Kill the scoring service mid-stream, restart it, and check every published score against a reference
computed from the published profile changes with the model's known weights.

Scoring holds each person's fields in memory, snapshots them every half second with the stream
positions they include, and on start replays `profiles.changed` from there; a redelivered batch is scored
again. The traps: a change whose score is never published (lost), a change applied again after newer ones
(the held fields go stale, and so does every score after), a removed person brought back by an old
snapshot. The model is an exact logistic model, so every score is known to the number: a published score
must be the model's value on the person's fields right after the change its `at_ms` names.
"""

from __future__ import annotations

import asyncio
import bisect
import random
import time
from dataclasses import dataclass

import grpc
import nats
import pytest
from nats.js.errors import NotFoundError

from cdp.profile.v1 import profile_pb2
from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from cdp_kit.bus import ConsumerSpec, partition_for, profiles_stream
from cdp_kit.bus.streams import ensure_stream
from cdp_testing.onnx_models import expected, logistic_model
from cdp_testing.processes import ScoringProcess, started_on_profiles

# What scoring logs once a version made live has scored the persons it holds (deployments.py).
HELD_SCORED = "held persons scored with a version made live"

PARTITIONS = 4
PERSONS = 320
MESSAGES = 1_500  # of 1 to 6 changes each: about 5,000 changes
BATCH = 8  # CDP_SCORING_BATCH_SIZE: a handled batch spans at most this many messages of one partition
ORDERS, SESSIONS = "computed.orders_90d", "computed.sessions_30d"
INPUTS = (ORDERS, SESSIONS)  # logistic_model's default features, in order, default 0
W, BIAS = [0.05, -0.03], 0.2
T0_MS = 1_790_000_000_000


@dataclass(frozen=True)
class Change:
    at_ms: int
    index: int  # the position of its message among its partition's messages
    inputs: dict[str, float] | None  # the person's model inputs right after it; None: removed


@dataclass
class Plan:
    messages: list[tuple[int, bytes]]  # (partition, ProfileChangedBatch) in publish order
    history: dict[str, list[Change]]  # per person, in order
    final: dict[str, dict[str, float]]  # the persons that exist at the end -> their model inputs


def score_of(inputs: dict[str, float]) -> float:
    return expected(W, [inputs.get(path, 0) for path in INPUTS], BIAS)


def changes(seed: int) -> Plan:
    """Every change sets at least one model input to a new value (or drops it); some also set a trait no
    model reads; some remove the person, who may come back later with fresh fields."""
    rng = random.Random(seed)
    persons: dict[int, list[str]] = {}
    for i in range(PERSONS):
        person = f"p_{i:04d}"
        persons.setdefault(partition_for(person, PARTITIONS), []).append(person)
    state: dict[str, dict[str, float]] = {}
    history: dict[str, list[Change]] = {}
    counts = dict.fromkeys(persons, 0)
    messages = []
    at_ms = T0_MS
    for _ in range(MESSAGES):
        p = rng.choice(sorted(persons))
        batch = profile_pb2.ProfileChangedBatch()
        for _ in range(rng.randint(1, 6)):
            person = rng.choice(persons[p])
            at_ms += 1
            change = batch.changes.add(person_id=person, cause="event")
            change.at.FromMilliseconds(at_ms)
            current = state.get(person)
            if current is not None and rng.random() < 0.07:
                change.removed, change.cause = True, "delete"
                del state[person]
                history.setdefault(person, []).append(Change(at_ms, counts[p], None))
                continue
            inputs = dict(current or {})
            for path in rng.choice([(ORDERS,), (SESSIONS,), INPUTS]):
                name = path.removeprefix("computed.")
                if path in inputs and rng.random() < 0.15:
                    change.computed[name].null_value = 0  # the computed trait is gone
                    del inputs[path]
                    continue
                value = inputs.get(path)
                while value == inputs.get(path):
                    value = float(rng.randrange(60))
                change.computed[name].number_value = inputs[path] = value
            if rng.random() < 0.3:
                change.traits["plan"].string_value = rng.choice(["free", "pro", "team"])
            state[person] = inputs
            history.setdefault(person, []).append(Change(at_ms, counts[p], dict(inputs)))
        counts[p] += 1
        messages.append((p, batch.SerializeToString()))
    return Plan(messages, history, state)


@dataclass(frozen=True)
class Published:
    person: str
    at_ms: int
    score: float


async def published_scores(js, partitions: int = PARTITIONS) -> list[Published]:
    """Every score on scores.updated, in stream order."""
    info = await js.stream_info("SCORES")
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        if not info.state.messages:
            break
        msg = await js.get_msg("SCORES", seq)
        batch = scoring_pb2.ScoresUpdatedBatch.FromString(msg.data)
        assert not batch.more  # one model deployed: nothing else in the message
        assert (batch.model, batch.version, list(batch.scores)) == ("churn_risk", "1.0.0", ["churn_risk"])
        assert len(batch.values) == len(batch.person_ids) == len(batch.at_ms)
        for person, value, at_ms in zip(batch.person_ids, batch.values, batch.at_ms, strict=True):
            assert msg.subject == f"scores.updated.{partition_for(person, partitions)}", f"{person} on {msg.subject}"
            out.append(Published(person, at_ms, value))
    return out


async def drained(js, last: dict[int, int]) -> bool:
    """Every durable consumer acknowledged its partition's last message and has nothing in flight."""
    for p, seq in last.items():
        try:
            info = await js.consumer_info("PROFILES", f"scoring-p{p}")
        except NotFoundError:
            return False
        if info.num_pending or info.num_ack_pending or info.ack_floor.stream_seq < seq:
            return False
    return True


async def ack_floors(js) -> dict[int, int]:
    """Each partition's consumer position: every message up to it was acknowledged."""
    floors = {}
    for p in range(PARTITIONS):
        try:
            floors[p] = (await js.consumer_info("PROFILES", f"scoring-p{p}")).ack_floor.stream_seq
        except NotFoundError:
            floors[p] = 0
    return floors


async def held_fields_differ(address: str, plan: Plan) -> list[str]:
    """Ask the service for every person it ever saw: the features it assembles from the fields it holds
    must be the reference's, and a removed person must be unknown."""
    problems = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        for person in sorted(plan.history):
            inputs = plan.final.get(person)
            try:
                response = await stub.Score(scoring_pb2.ScoreRequest(person_id=person), timeout=10)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND or inputs is not None:
                    problems.append(f"{person}: {exc.code().name} {exc.details()}, want inputs {inputs}")
                continue
            if inputs is None:
                problems.append(f"{person} was removed, yet the service holds fields for it: {response}")
                continue
            [result] = response.results
            want = [inputs.get(path, 0) for path in INPUTS]
            if list(result.features) != want or abs(result.scores["churn_risk"] - score_of(inputs)) > 1e-6:
                problems.append(f"{person}: features {list(result.features)}, want {want}")
    return problems


@pytest.mark.timeout(180)
async def test_killed_mid_stream_publishes_every_score_and_recovers_the_fields(nats_server, tmp_path):
    plan = changes(seed=11)
    service = ScoringProcess(
        nats_server.url,
        tmp_path,
        store_url=f"sqlite:///{tmp_path / 'scoring.db'}",
        partitions=PARTITIONS,
        CDP_SCORING_SHIP_MODELS="false",
        CDP_SCORING_SNAPSHOT_SECONDS="0.5",
        CDP_SCORING_BATCH_SIZE=str(BATCH),
        # Longer than a restart takes, as the default (30 s) is: a batch the killed process had in flight
        # comes back after the restarted one has been given newer messages.
        CDP_SCORING_ACK_WAIT="5",
        CDP_LOG_LEVEL="INFO",  # the deploy's scoring of the persons held is read from the log
    )
    rng = random.Random(7)
    async with started_on_profiles(service, nats_server.url) as js:
        async with grpc.aio.insecure_channel(service.grpc_address) as channel:
            deployed = await scoring_pb2_grpc.ScoringServiceStub(channel).DeployModel(
                scoring_pb2.DeployModelRequest(onnx=logistic_model(weights=W, bias=BIAS)), timeout=30
            )
        assert deployed.live_version == "1.0.0"
        # A version made live scores the persons held (none yet) in the background, stamped with the
        # service's clock: once done, the stream path alone publishes, which is what the counts below add up.
        await service.logged(HELD_SCORED)

        positions: dict[int, list[int]] = {p: [] for p in range(PARTITIONS)}  # stream seq of each message

        async def publish() -> None:
            for i, (p, data) in enumerate(plan.messages):
                ack = await js.publish(f"profiles.changed.{p}", data, headers={"Nats-Msg-Id": f"crash-{i}"})
                positions[p].append(ack.seq)
                if i % 10 == 9:
                    await asyncio.sleep(0.08)  # about 15 s of changes, while the kills below go on

        publishing = asyncio.create_task(publish())
        floors_at_kills = []
        while len(floors_at_kills) < 3 or not publishing.done():
            await asyncio.sleep(rng.uniform(0.1, 1.5))
            service.kill()
            floors_at_kills.append(await ack_floors(js))
            await asyncio.to_thread(service.start)  # the changes keep coming while it starts
        await publishing
        last = {p: seqs[-1] for p, seqs in positions.items() if seqs}

        deadline = time.monotonic() + 60
        while not await drained(js, last):
            assert time.monotonic() < deadline, "the scoring consumers never caught up; see scoring.log"
            await asyncio.sleep(0.2)
        try:
            dead = (await js.stream_info("DLQ")).state.messages
        except NotFoundError:
            dead = 0
        assert dead == 0, "profile changes were dead-lettered instead of scored"

        scores = await published_scores(js)
        by_person: dict[str, list[Published]] = {}
        for row in scores:
            by_person.setdefault(row.person, []).append(row)

        # Nothing corrupted: a score is the model's value on the fields right after the change it names.
        wrong = []
        for row in scores:
            change = next((c for c in plan.history.get(row.person, []) if c.at_ms == row.at_ms), None)
            if change is None or change.inputs is None:
                wrong.append(f"{row.person} scored at {row.at_ms}, when it did not change (or was removed)")
            elif abs(row.score - score_of(change.inputs)) > 1e-6:
                wrong.append(f"{row.person} at {row.at_ms}: {row.score}, want {score_of(change.inputs)}")
        assert not wrong, f"{len(wrong)} of {len(scores)} scores are not of their change, e.g. {wrong[:5]}"

        def unmoved(person: str, change: Change) -> bool:
            """Whether the score published last before `change` for the person, after their last removal
            before it, already has the change's value (then nothing new was there to publish)."""
            removed = max(
                (c.at_ms for c in plan.history[person] if c.inputs is None and c.at_ms < change.at_ms), default=-1
            )
            before = [r for r in by_person.get(person, []) if removed < r.at_ms < change.at_ms]
            if not before or change.inputs is None:
                return False
            return abs(max(before, key=lambda r: r.at_ms).score - score_of(change.inputs)) <= 1e-6

        # The last score of every person is of their last change, on their final fields.
        # (Or of an earlier change with the same value: a score that does not move is not published again.)
        stale = []
        for person, inputs in plan.final.items():
            rows = by_person.get(person, [])
            last_change = plan.history[person][-1].at_ms
            wrong_value = not rows or abs(rows[-1].score - score_of(inputs)) > 1e-6
            if wrong_value or (rows[-1].at_ms != last_change and not unmoved(person, plan.history[person][-1])):
                stale.append(f"{person}: last {rows[-1:]}, want at {last_change} {score_of(inputs)}")
        assert not stale, f"{len(stale)} of {len(plan.final)} persons' last score is stale, e.g. {stale[:5]}"

        # Nothing lost: a change without a score of its own was folded into a later change of the same
        # person handled in the same batch, so one at most BATCH - 1 messages later on its partition; or it
        # was in flight when a kill came (at most BATCH messages past the acknowledged position), and the
        # restarted process may have handled the person's later changes before its redelivery.
        in_flight: dict[int, set[int]] = {p: set() for p in range(PARTITIONS)}
        for floors in floors_at_kills:
            for p, floor in floors.items():
                first = bisect.bisect_right(positions[p], floor)  # the index of the first unacknowledged message
                in_flight[p].update(range(first, first + BATCH))
        # A change whose value is the one last published for the person (since they last were removed)
        # moved nothing: it is not published again, and is not lost.
        lost = []
        for person, history in plan.history.items():
            scored = {row.at_ms for row in by_person.get(person, [])}
            p = partition_for(person, PARTITIONS)
            for change, after in zip(history, [*history[1:], None], strict=True):
                if change.inputs is None or change.at_ms in scored or unmoved(person, change):
                    continue
                if after is None or (after.index - change.index >= BATCH and change.index not in in_flight[p]):
                    lost.append(f"{person} at {change.at_ms} (next change {after})")
        changed = sum(c.inputs is not None for h in plan.history.values() for c in h)
        assert not lost, f"{len(lost)} of {changed} changes never got a score, e.g. {lost[:5]}"

        problems = await held_fields_differ(service.grpc_address, plan)
        assert not problems, f"{len(problems)} persons' held fields differ, e.g. {problems[:5]}"
        # Once more from the snapshot plus the replay alone, with nothing left to redeliver.
        service.kill()
        service.start()
        problems = await held_fields_differ(service.grpc_address, plan)
        assert not problems, f"after a restart, {len(problems)} persons' fields differ, e.g. {problems[:5]}"


@pytest.mark.timeout(120)
async def test_a_change_redelivered_after_newer_ones_does_not_take_the_fields_back(nats_server, tmp_path):
    """One way the kills above go wrong, made deterministic. The killed process had been given a change
    and not acknowledged it; JetStream redelivers it once its ack wait is over, which outlasts a restart
    (as the default 30 s does), so the restarted process is given the person's next change first."""
    service = ScoringProcess(
        nats_server.url,
        tmp_path,
        store_url=f"sqlite:///{tmp_path / 'scoring.db'}",
        partitions=1,
        CDP_SCORING_SHIP_MODELS="false",
        CDP_SCORING_SNAPSHOT_SECONDS="0.5",
        CDP_SCORING_BATCH_SIZE=str(BATCH),
        CDP_SCORING_ACK_WAIT="8",
        CDP_LOG_LEVEL="INFO",  # the deploy's scoring of the persons held is read from the log
    )

    def orders(value: float, at_ms: int) -> bytes:
        change = profile_pb2.ProfileChanged(person_id="p_x", cause="event")
        change.computed["orders_90d"].number_value = value
        change.at.FromMilliseconds(at_ms)
        return profile_pb2.ProfileChangedBatch(changes=[change]).SerializeToString()

    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    try:
        await ensure_stream(js, profiles_stream())
        spec = ConsumerSpec(
            stream="PROFILES",
            durable="scoring-p0",
            filter_subjects=("profiles.changed.0",),
            batch_size=BATCH,
            ack_wait=8,
            max_ack_pending=BATCH,
        )
        await js.add_consumer("PROFILES", spec.config())
        await js.publish("profiles.changed.0", orders(1, T0_MS + 1))
        killed = await js.pull_subscribe_bind(durable="scoring-p0", stream="PROFILES")
        [_given] = await killed.fetch(1, timeout=5)  # never acknowledged: its process was SIGKILLed
        await killed.unsubscribe()

        service.start()  # replays the change it was given, then consumes
        async with grpc.aio.insecure_channel(service.grpc_address) as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            await stub.DeployModel(
                scoring_pb2.DeployModelRequest(onnx=logistic_model(weights=W, bias=BIAS)), timeout=30
            )
            # The deploy scores p_x (held: the first change was given again at the start) with the service's
            # clock; the next change is published once that is done, so that its score is news.
            await service.logged(HELD_SCORED)
            await js.publish("profiles.changed.0", orders(2, T0_MS + 2))
            deadline = time.monotonic() + 60
            while not await drained(js, {0: 2}):  # the redelivered first change included
                assert time.monotonic() < deadline, "the scoring consumer never caught up; see scoring.log"
                await asyncio.sleep(0.2)
            [result] = (await stub.Score(scoring_pb2.ScoreRequest(person_id="p_x"), timeout=10)).results
        assert list(result.features) == [2.0, 0.0], "the held fields went back to the older change"
        *earlier, latest = await published_scores(js, partitions=1)
        # Stamped with the change's time, or just after the person's update before it if that is later (the
        # deploy's, stamped with the service's clock): a person's stamps never go backwards (scoring's
        # published.py), so the profile keeps it.
        assert latest.at_ms == max([T0_MS + 2, *(row.at_ms + 1 for row in earlier if row.person == "p_x")])
        assert latest.score == pytest.approx(score_of({ORDERS: 2.0}), abs=1e-6)
    finally:
        service.stop()
        await nc.close()
