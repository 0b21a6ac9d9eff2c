"""ExplainMembership: why a person is (or is not) in a segment, over gRPC on a real nats-server and the memory
store, tokens on. Per node of the live definition: its own text, whether it held (TRUE / FALSE, MISSING
where a field it reads has no value, UNKNOWN where it cannot be evaluated alone) and the fields it reads;
the person's membership and whether the definition holds now, with a note when they differ. Never a value
of the person's (asserted on the serialized answer). Errors name the field; the scope is a reader's.

The evaluation is the engine's: for random definitions and records the explained root is the compiled
predicate's answer and every node agrees with its operands; for random persons fed through the engine,
`matches` is the engine's predicate and equals the membership once applied."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import random
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import hypothesis.strategies as st
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings

from cdp.profile.v1 import profile_pb2
from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from cdp_kit.auth import write_tokens_file
from cdp_kit.bus import Bus, partition_for, profiles_stream, segments_stream, subjects
from cdp_kit.natsserver import free_port
from cdp_kit.service import ServiceRuntime, serving
from cdp_kit.storage import open_store
from cdp_kit.timestamps import to_seconds
from cdp_lang.percentiles import population_percentiles
from cdp_segmentation.api import SCOPES, SegmentationApi
from cdp_segmentation.domain import And, Not, Or, compile_segment, to_text
from cdp_segmentation.engine import SegmentationEngine
from cdp_segmentation.explain import Evaluating, explain_node, walk
from cdp_segmentation.settings import SegmentationSettings
from cdp_testing.fakes import Delivery

pb = segmentation_pb2
TRUE, FALSE = pb.CONDITION_RESULT_TRUE, pb.CONDITION_RESULT_FALSE
MISSING, UNKNOWN = pb.CONDITION_RESULT_MISSING, pb.CONDITION_RESULT_UNKNOWN
ADMIN = [("authorization", "Bearer admin-token")]
READER = [("authorization", "Bearer reader-token")]
PROFILE_ONLY = [("authorization", "Bearer profile-token")]

# The language's random definitions and records (the evaluators' agreement test's strategies).
_spec = importlib.util.spec_from_file_location(
    "segmentation_language_properties", Path(__file__).parent / "domain" / "test_language_properties.py"
)
properties = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(properties)


class Profile:
    """The profile service as the engine sees it: computed traits defined, then waited for (`gate` holds
    `ready` until the test opens it)."""

    def __init__(self) -> None:
        self.held: dict[str, dict] = {}
        self.gate: asyncio.Event | None = None

    async def define(self, definitions) -> None:
        for definition in definitions:
            self.held[definition["name"]] = dict(definition)

    async def undefine(self, names) -> None:
        for name in names:
            self.held.pop(name, None)

    async def ready(self, names) -> None:
        if self.gate is not None:
            await self.gate.wait()


class Clock:
    """The engine's clock: the wall clock, or a set instant."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self) -> float:
        return time.time() if self.at is None else self.at


def change(person: str, *, traits=None, computed=None, scores=None) -> profile_pb2.ProfileChanged:
    message = profile_pb2.ProfileChanged(person_id=person, cause="event")
    message.at.GetCurrentTime()
    for name, value in (traits or {}).items():
        if isinstance(value, str):
            message.traits[name].string_value = value
        elif isinstance(value, bool):
            message.traits[name].bool_value = value
        else:
            message.traits[name].number_value = value
    for name, value in (computed or {}).items():
        message.computed[name].number_value = value
    for name, value in (scores or {}).items():
        message.scores[name] = value
    return message


class Service:
    def __init__(self, stub, engine: SegmentationEngine, profile: Profile, clock: Clock) -> None:
        self.stub = stub
        self.engine = engine
        self.profile = profile
        self.clock = clock
        self.seq = 0

    async def feed(self, *changes: profile_pb2.ProfileChanged) -> None:
        self.seq += 1
        batch = profile_pb2.ProfileChangedBatch(changes=list(changes))
        await self.engine.handle([Delivery(batch, subjects.profiles_changed(0), self.seq)])

    async def create(self, segment_id: str, text: str, *, wait: bool = True) -> pb.Segment:
        request = pb.CreateSegmentRequest(id=segment_id, definition=pb.Definition(text=text), wait=wait)
        return await self.stub.CreateSegment(request, metadata=ADMIN)

    async def explain(self, segment_id: str, person_id: str, metadata=READER) -> pb.ExplainMembershipResponse:
        request = pb.ExplainMembershipRequest(segment_id=segment_id, person_id=person_id)
        return await self.stub.ExplainMembership(request, metadata=metadata)


@contextlib.asynccontextmanager
async def running(nats_url: str, tmp_path: Path) -> AsyncIterator[Service]:
    tokens = tmp_path / "tokens.json"
    write_tokens_file(
        tokens,
        [
            ("admin", "admin-token", ["*"]),
            ("reader", "reader-token", ["segmentation:read"]),
            ("profile", "profile-token", ["profile:read"]),
        ],
    )
    settings = SegmentationSettings(
        nats_url=nats_url, grpc_host="127.0.0.1", grpc_port=0, auth_mode="tokens", auth_tokens_file=tokens,
        partitions=1, shutdown_grace=1.0, store_url="memory://",
    )  # fmt: skip
    profile, clock = Profile(), Clock()

    async def setup(runtime: ServiceRuntime) -> None:
        store = await runtime.stack.enter_async_context(open_store(settings.store_url))
        bus = await runtime.stack.enter_async_context(Bus.connect(settings.nats_url, name="segmentation-explain"))
        await bus.ensure_streams(profiles_stream(), segments_stream())
        engine = SegmentationEngine(
            store, bus.publisher, partitions=1, owned=[0], telemetry=runtime.telemetry,
            define_traits=profile.define, traits_ready=profile.ready, undefine_traits=profile.undefine,
            snapshot_interval=3600, timer_resolution=3600, clock=clock,
        )  # fmt: skip
        await engine.start()
        runtime.stack.push_async_callback(engine.stop)
        runtime.parts["engine"] = engine
        runtime.grpc.add_service(
            segmentation_pb2_grpc.add_SegmentationServiceServicer_to_server,
            SegmentationApi(engine),
            pb.DESCRIPTOR.services_by_name["SegmentationService"],
            scopes=SCOPES,
        )

    async with serving(settings, setup) as runtime:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
            stub = segmentation_pb2_grpc.SegmentationServiceStub(channel)
            yield Service(stub, runtime.parts["engine"], profile, clock)


@pytest.fixture
async def service(nats_server, tmp_path):
    async with running(nats_server.url, tmp_path) as started:
        yield started


def leaves(tree: pb.ExplainedCondition) -> dict[str, pb.ExplainedCondition]:
    return {node.text: node for node in walk(tree) if not node.operands}


def error_reason(error: grpc.aio.AioRpcError) -> str:
    for detail in rpc_status.from_call(error).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


def bad_fields(error: grpc.aio.AioRpcError) -> list[str]:
    found = []
    for detail in rpc_status.from_call(error).details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found += [v.field for v in bad.field_violations]
    return found


# --- what an explanation says ------------------------------------------------------------------------


async def test_a_member_is_explained_by_the_leaves_that_held(service):
    await service.feed(change("p_ann", traits={"plan": "pro"}, scores={"churn_risk": 0.2}))
    await service.create("keep", 'scores.churn_risk < 0.5 and traits.plan = "pro"')

    answer = await service.explain("keep", "p_ann")

    assert (answer.segment_id, answer.person_id, answer.segment_version) == ("keep", "p_ann", 1)
    assert answer.member and answer.matches and not answer.note
    assert to_seconds(answer.since) > 0 and to_seconds(answer.evaluated_at) >= to_seconds(answer.since)
    assert (answer.tree.kind, answer.tree.text, answer.tree.result) == (
        "and",
        'scores.churn_risk < 0.5 and traits.plan = "pro"',
        TRUE,
    )
    found = leaves(answer.tree)
    assert found["scores.churn_risk < 0.5"].result == TRUE
    assert list(found["scores.churn_risk < 0.5"].fields) == ["scores.churn_risk"]
    assert found['traits.plan = "pro"'].result == TRUE and found['traits.plan = "pro"'].kind == "field"
    assert list(found['traits.plan = "pro"'].fields) == ["traits.plan"]
    assert not any(node.missing for node in walk(answer.tree))


async def test_a_non_member_is_shown_the_leaf_that_failed(service):
    await service.feed(change("p_bob", traits={"plan": "pro"}, scores={"churn_risk": 0.8}))
    await service.create("keep", 'scores.churn_risk < 0.5 and traits.plan = "pro"')

    answer = await service.explain("keep", "p_bob")

    assert not answer.member and not answer.matches and not answer.note
    assert not answer.HasField("since")
    assert answer.tree.result == FALSE
    found = leaves(answer.tree)
    assert found["scores.churn_risk < 0.5"].result == FALSE
    assert found['traits.plan = "pro"'].result == TRUE


async def test_a_field_the_person_lacks_is_missing_and_a_not_over_it_holds(service):
    await service.feed(change("p_cid", traits={"city": "Oslo"}))
    await service.create("risky", "scores.churn_risk >= 0.5 or traits.plan exists")
    await service.create("not_free", 'not traits.plan = "free"')

    risky = await service.explain("risky", "p_cid")
    assert not risky.member and not risky.matches
    assert (risky.tree.kind, risky.tree.result) == ("or", FALSE)
    found = leaves(risky.tree)
    assert found["scores.churn_risk >= 0.5"].result == MISSING
    assert list(found["scores.churn_risk >= 0.5"].missing) == ["scores.churn_risk"]
    assert found["traits.plan exists"].result == MISSING

    negated = await service.explain("not_free", "p_cid")
    assert negated.member and negated.matches
    assert (negated.tree.kind, negated.tree.text, negated.tree.result) == ("not", 'not traits.plan = "free"', TRUE)
    [inner] = negated.tree.operands
    assert (inner.text, inner.result, list(inner.missing)) == ('traits.plan = "free"', MISSING, ["traits.plan"])


async def test_a_segment_reference_is_explained_by_the_membership_it_reads(service):
    await service.feed(
        change("p_ann", traits={"plan": "pro"}, scores={"churn_risk": 0.9}),
        change("p_bob", traits={"plan": "free"}, scores={"churn_risk": 0.9}),
    )
    await service.create("pro", 'traits.plan = "pro"')
    await service.create("at_risk_free", 'scores.churn_risk > 0.7 and not in_segment("pro")')

    ann = await service.explain("at_risk_free", "p_ann")
    assert not ann.member and not ann.matches and ann.tree.result == FALSE
    [risk, negated] = ann.tree.operands
    assert risk.result == TRUE
    assert (negated.kind, negated.result) == ("not", FALSE)
    [reference] = negated.operands
    assert (reference.kind, reference.text, reference.segment_id, reference.result) == (
        "segment",
        'in_segment("pro")',
        "pro",
        TRUE,
    )
    assert list(reference.fields) == []

    bob = await service.explain("at_risk_free", "p_bob")
    assert bob.member and bob.matches
    assert leaves(bob.tree)['in_segment("pro")'].result == FALSE


async def test_an_event_condition_reads_its_computed_trait_and_counts_none_as_zero(service):
    created = await service.create("buyers", 'count(event = "Order Completed", within 30d) >= 2')
    [trait] = created.computed_traits
    await service.feed(change("p_ann", computed={trait: 3}), change("p_bob", traits={"plan": "pro"}))

    ann = await service.explain("buyers", "p_ann")
    assert ann.member and ann.matches
    assert (ann.tree.kind, ann.tree.result, list(ann.tree.fields)) == ("aggregate", TRUE, [f"computed.{trait}"])
    assert ann.tree.text == 'count("Order Completed", within 30d) >= 2'

    bob = await service.explain("buyers", "p_bob")  # no order: a count of 0, not a missing value
    assert not bob.member and not bob.matches
    assert (bob.tree.result, list(bob.tree.missing)) == (FALSE, [])


async def test_a_percentile_with_no_value_yet_is_unknown(service):
    await service.feed(change("p_ann", traits={"plan": "pro"}))  # nobody has a number in scores.clv
    await service.create("top", "scores.clv >= percentile(scores.clv, 90)")
    answer = await service.explain("top", "p_ann")
    assert not answer.member and not answer.matches
    assert (answer.tree.result, list(answer.tree.fields)) == (UNKNOWN, ["scores.clv"])


async def test_no_value_of_the_person_is_in_the_answer(service):
    city, plan, score, nested = "Zanzibar-7f3", "platinum-x9", 0.123456789, "Tromsø-q2"
    person = change("p_ann", traits={"city": city, "plan": plan, "age": 41.5}, scores={"churn_risk": score})
    person.traits["address"].struct_value.update({"city": nested})
    await service.feed(person)
    await service.create(
        "everything",
        'traits.city exists and traits.plan != "free" and scores.churn_risk < 0.5 and traits.age > 18 '
        'and traits.address.city exists and traits.plan starts_with "p"',
    )
    answer = await service.explain("everything", "p_ann")
    assert answer.member and answer.matches and answer.tree.result == TRUE
    assert "traits.address.city" in {f for node in walk(answer.tree) for f in node.fields}

    wire = answer.SerializeToString()
    for value in (city, plan, nested):
        assert value.encode() not in wire
    for number in (score, 41.5):
        assert struct.pack("<d", number) not in wire and str(number).encode() not in wire


async def test_matches_and_membership_differ_while_a_time_condition_is_due(service):
    service.clock.at = 1_800_000_000.0
    ends = 1_800_000_100.0
    await service.feed(change("p_ann", traits={"trial_ends_at": ends}))
    await service.create("lapsed", "traits.trial_ends_at < now")
    before = await service.explain("lapsed", "p_ann")
    assert (before.member, before.matches, before.note) == (False, False, "")
    assert to_seconds(before.evaluated_at) == 1_800_000_000.0

    service.clock.at = ends + 1  # due, and the timer round (an hour away in this test) has not run
    due = await service.explain("lapsed", "p_ann")
    assert (due.member, due.matches, due.tree.result) == (False, True, TRUE)
    assert "time condition" in due.note and "timer" in due.note

    assert await service.engine.fire_timers() == 1
    after = await service.explain("lapsed", "p_ann")
    assert (after.member, after.matches, after.note) == (True, True, "")
    assert abs(to_seconds(after.since) - ends) < 1e-3  # the instant it flipped (the float after `ends`)


async def test_random_persons_match_their_membership_and_the_engines_predicate(service):
    """Persons with random traits and scores, several definitions: for each pair the answer's `matches` is
    the engine's predicate at the engine's instant, and equals the membership the engine keeps."""
    rng = random.Random(35)
    plans = ["pro", "free", "team", None]
    persons = []
    for n in range(60):
        traits = {}
        if (plan := rng.choice(plans)) is not None:
            traits["plan"] = plan
        if rng.random() < 0.7:
            traits["age"] = float(rng.randint(10, 80))
        scores = {"churn_risk": round(rng.random(), 3)} if rng.random() < 0.8 else {}
        persons.append(change(f"p_{n:03d}", traits=traits, scores=scores))
    await service.feed(*persons)
    definitions = {
        "a": 'traits.plan = "pro" and scores.churn_risk < 0.5',
        "b": 'traits.plan in ["pro", "team"] or not traits.age exists',
        "c": 'not (traits.age >= 30 and scores.churn_risk > 0.2) and in_segment("a") or traits.plan = "free"',
        "d": 'traits.age * 2 > scores.churn_risk * 100 and not in_segment("b")',
    }
    for segment_id, text in definitions.items():
        await service.create(segment_id, text)
    engine = service.engine
    service.clock.at = engine.clock()
    checked = 0
    for person in persons:
        held = engine.persons[person.person_id]
        for segment_id in definitions:
            answer = await service.explain(segment_id, person.person_id)
            predicate = engine.segments[segment_id].predicate(held.fields, held.members, service.clock.at)
            assert answer.matches == predicate == answer.member, (segment_id, person.person_id)
            assert answer.tree.result == (TRUE if predicate else answer.tree.result)
            assert (answer.tree.result == TRUE) == predicate
            checked += 1
    assert checked == 240


# --- two replicas splitting the partitions (static: p % 2 == ordinal, a store each) --------------------

PARTITIONS = 2
ANN = next(f"p_ann_{n}" for n in range(100) if partition_for(f"p_ann_{n}", PARTITIONS) == 0)
BOB = next(f"p_bob_{n}" for n in range(100) if partition_for(f"p_bob_{n}", PARTITIONS) == 1)


def replica_settings(nats_url: str, tokens: Path, ports: list[int], ordinal: int) -> SegmentationSettings:
    # One store for both, as replicas share one database: a segment created on one is followed by the other.
    return SegmentationSettings(
        nats_url=nats_url, grpc_host="127.0.0.1", grpc_port=ports[ordinal], auth_mode="tokens",
        auth_tokens_file=tokens, partitions=PARTITIONS, replicas=2, pod_ordinal=ordinal,
        peers=",".join(f"127.0.0.1:{port}" for port in ports), shutdown_grace=1.0,
        store_url=f"sqlite:///{tokens.parent / 'segmentation.db'}",
    )  # fmt: skip


def write_tokens(tmp_path: Path) -> Path:
    tokens = tmp_path / "tokens.json"
    write_tokens_file(
        tokens,
        [
            ("admin", "admin-token", ["*"]),
            ("reader", "reader-token", ["segmentation:read"]),
            ("profile", "profile-token", ["profile:read"]),
        ],
    )
    return tokens


async def _publish(bus, persons: dict[str, str]) -> None:
    for person, plan in persons.items():
        batch = profile_pb2.ProfileChangedBatch(changes=[change(person, traits={"plan": plan})])
        await bus.js.publish(subjects.profiles_changed(partition_for(person, PARTITIONS)), batch.SerializeToString())


async def _explained(stub, segment_id: str, person: str) -> pb.ExplainMembershipResponse:
    """The answer once the person is held and the segment live where the person is (15 s at most)."""
    deadline = time.monotonic() + 15
    while True:
        try:
            return await stub.ExplainMembership(
                pb.ExplainMembershipRequest(segment_id=segment_id, person_id=person), metadata=READER
            )
        except grpc.aio.AioRpcError as exc:
            settling = exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)
            if not settling or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_either_replica_explains_a_person_whichever_replica_holds_them(nats_server, tmp_path):
    from cdp_segmentation.__main__ import setup

    tokens = write_tokens(tmp_path)
    ports = [free_port(), free_port()]
    async with Bus.connect(nats_server.url, name="explain-test") as bus:
        await bus.ensure_streams(profiles_stream())
        async with (
            serving(replica_settings(nats_server.url, tokens, ports, 0), setup) as r0,
            serving(replica_settings(nats_server.url, tokens, ports, 1), setup) as r1,
        ):
            await _publish(bus, {ANN: "pro", BOB: "free"})
            async with (
                grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}") as c0,
                grpc.aio.insecure_channel(f"127.0.0.1:{ports[1]}") as c1,
            ):
                s0, s1 = (
                    segmentation_pb2_grpc.SegmentationServiceStub(c0),
                    segmentation_pb2_grpc.SegmentationServiceStub(c1),
                )
                request = pb.CreateSegmentRequest(
                    id="pro", definition=pb.Definition(text='traits.plan = "pro"'), wait=True
                )
                await s0.CreateSegment(request, metadata=ADMIN)
                for stub in (s0, s1):
                    ann, bob = await _explained(stub, "pro", ANN), await _explained(stub, "pro", BOB)
                    assert (ann.person_id, ann.member, ann.matches, ann.tree.result) == (ANN, True, True, TRUE)
                    assert (bob.person_id, bob.member, bob.matches, bob.tree.result) == (BOB, False, False, FALSE)
                    # The owner checks the caller's token too.
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await stub.ExplainMembership(
                            pb.ExplainMembershipRequest(segment_id="pro", person_id=BOB), metadata=PROFILE_ONLY
                        )
                    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert ANN in r0.parts["engine"].persons and BOB in r1.parts["engine"].persons


async def test_a_replica_that_cannot_reach_the_owner_names_the_partition(nats_server, tmp_path):
    from cdp_segmentation.__main__ import setup

    tokens = write_tokens(tmp_path)
    ports = [free_port(), free_port()]  # nobody listens on the second: replica 1 is down
    async with Bus.connect(nats_server.url, name="explain-test") as bus:
        await bus.ensure_streams(profiles_stream())
        async with serving(replica_settings(nats_server.url, tokens, ports, 0), setup):
            await _publish(bus, {ANN: "pro"})
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}") as channel:
                stub = segmentation_pb2_grpc.SegmentationServiceStub(channel)
                request = pb.CreateSegmentRequest(
                    id="pro", definition=pb.Definition(text='traits.plan = "pro"'), wait=True
                )
                await stub.CreateSegment(request, metadata=ADMIN)
                assert (await _explained(stub, "pro", ANN)).member
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.ExplainMembership(
                        pb.ExplainMembershipRequest(segment_id="pro", person_id=BOB), metadata=READER
                    )
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "partition 1" in caught.value.details()


# --- errors and scope --------------------------------------------------------------------------------


async def test_errors_name_the_field(service):
    await service.feed(change("p_ann", traits={"plan": "pro"}))
    await service.create("pro", 'traits.plan = "pro"')

    with pytest.raises(grpc.aio.AioRpcError) as unknown_segment:
        await service.explain("nope", "p_ann")
    assert unknown_segment.value.code() == grpc.StatusCode.NOT_FOUND
    assert "segment_id" in unknown_segment.value.details() and "nope" in unknown_segment.value.details()

    with pytest.raises(grpc.aio.AioRpcError) as unknown_person:
        await service.explain("pro", "p_ghost")
    assert unknown_person.value.code() == grpc.StatusCode.NOT_FOUND
    assert "person_id" in unknown_person.value.details()
    assert error_reason(unknown_person.value) == "person_not_held"

    for request, field in (
        (pb.ExplainMembershipRequest(segment_id="Not An Id", person_id="p_ann"), "segment_id"),
        (pb.ExplainMembershipRequest(segment_id="pro"), "person_id"),
        (pb.ExplainMembershipRequest(segment_id="pro", person_id="p\x00ann"), "person_id"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await service.stub.ExplainMembership(request, metadata=READER)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_fields(bad.value) == [field]


async def test_a_segment_still_building_is_a_failed_precondition(service):
    await service.feed(change("p_ann", traits={"plan": "pro"}))
    service.profile.gate = asyncio.Event()  # its computed trait never becomes ready: the build waits
    created = await service.create("buyers", 'performed("Order Completed")', wait=False)
    assert created.state == pb.SEGMENT_STATE_BUILDING
    with pytest.raises(grpc.aio.AioRpcError) as building:
        await service.explain("buyers", "p_ann")
    assert building.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not live yet" in building.value.details() and "buyers" in building.value.details()
    service.profile.gate.set()


async def test_a_token_without_segmentation_read_is_refused(service):
    await service.feed(change("p_ann", traits={"plan": "pro"}))
    await service.create("pro", 'traits.plan = "pro"')
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await service.explain("pro", "p_ann", metadata=PROFILE_ONLY)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "segmentation:read" in refused.value.details()
    assert SCOPES["ExplainMembership"] == "segmentation:read"
    assert (await service.explain("pro", "p_ann", metadata=READER)).member


# --- the engine's own evaluation, for random definitions and records --------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    node=properties.segments(properties.RECORD_PATHS),
    now=properties.nows,
    counted=st.sampled_from([frozenset(), frozenset({"scores.s", "traits.a"})]),
)
def test_the_explained_root_is_the_compiled_predicate_and_every_node_agrees_with_its_operands(data, node, now, counted):
    fields = sorted(set(properties.RECORD_FIELDS) | compile_segment(node).fields)
    records = data.draw(st.lists(st.dictionaries(st.sampled_from(fields), properties.values), min_size=1, max_size=8))
    sets = data.draw(properties.member_sets(len(records)))
    probe = compile_segment(node, counted=counted)
    # Some percentiles have a value (the population's), some none yet.
    values = population_percentiles(probe.percentiles, records) if data.draw(st.booleans()) else {}
    segment = compile_segment(node, values, counted=counted)
    for record, members in zip(records, sets, strict=True):
        at = Evaluating(record, members, now, values, live=lambda s: s != "s3")
        tree = explain_node(segment.node, segment.plan, at)
        assert (tree.result == TRUE) == segment.evaluate(record, members, now), to_text(node)
        assert tree.text == to_text(node)
        _assert_consistent(tree, segment.node, record, members, now, values, counted)


def _assert_consistent(tree, node, record, members, now, values, counted) -> None:
    holds = tree.result == TRUE
    if isinstance(node, Not):
        assert tree.kind == "not" and holds != (tree.operands[0].result == TRUE)
        _assert_consistent(tree.operands[0], node.operand, record, members, now, values, counted)
        return
    if isinstance(node, And | Or):
        results = [operand.result == TRUE for operand in tree.operands]
        assert holds == (all(results) if isinstance(node, And) else any(results))
        for operand, inner in zip(tree.operands, node.operands, strict=True):
            _assert_consistent(operand, inner, record, members, now, values, counted)
        return
    # A leaf: what the same leaf compiled on its own says, and MISSING only with a field named missing.
    alone = compile_segment(node, values, counted=counted).evaluate(record, members, now)
    assert holds == alone, to_text(node)
    assert tree.text == to_text(node) and not tree.operands
    assert set(tree.missing) <= set(tree.fields)
    if tree.result == MISSING:
        assert tree.missing
    if holds:
        assert tree.result == TRUE
