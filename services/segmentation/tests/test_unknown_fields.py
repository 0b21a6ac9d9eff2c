"""A definition reading a score no deployed model writes, or a computed trait the profile service does not
define, is refused with INVALID_ARGUMENT naming the field and the known names close to it; it never goes
live with no members. Traits are open-ended and never refused. A source that cannot be asked, and a
scoring service listing no model yet (its first start deploys the shipped models in the background),
leave their root unchecked.

The service runs on a gRPC port over a real nats-server; the scoring and profile services it asks are
small gRPC servers answering ListModels and ListComputedTraits as theirs do."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest

from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from cdp_kit.bus import Bus, profiles_stream, segments_stream, subjects
from cdp_kit.errors import InvalidArgument
from cdp_kit.service import ServiceRuntime, serving
from cdp_kit.storage import open_store
from cdp_segmentation.api import SCOPES, SegmentationApi
from cdp_segmentation.catalogue import segment_from_doc
from cdp_segmentation.domain import compile_segment, parse
from cdp_segmentation.engine import SEGMENTS, SegmentationEngine
from cdp_segmentation.fields import KnownFields, check_fields, computed_traits, deployed_models, field_sources
from cdp_segmentation.settings import SegmentationSettings
from cdp_testing.fakes import Delivery

pb = segmentation_pb2
LIVE = pb.SEGMENT_STATE_LIVE
SCORES = ["churn_risk", "cluster", "clv_value_365d"]


class Scoring(scoring_pb2_grpc.ScoringServiceServicer):
    """ListModels as the scoring service answers it: each model's versions with their outputs."""

    def __init__(self) -> None:
        self.models: dict[str, list[str]] = {}
        self.reads: dict[str, list[str]] = {}  # model -> the computed traits it reads
        self.down = False
        self.tokens: list[str] = []

    async def ListModels(self, request, context):
        self.tokens.append(dict(context.invocation_metadata()).get("authorization", ""))
        if self.down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "scoring is starting")
        models = []
        for name, scores in self.models.items():
            spec = scoring_pb2.ModelSpec(name=name, version="1", outputs=[scoring_pb2.Output(score=s) for s in scores])
            for trait in self.reads.get(name, []):
                spec.computed_traits.add().update({"name": trait, "op": "count", "window": "30d"})
            shadow = scoring_pb2.ModelVersion(spec=spec, role=scoring_pb2.ROLE_SHADOW)
            models.append(scoring_pb2.Model(name=name, versions=[shadow]))
        return scoring_pb2.ListModelsResponse(models=models)


class Profile(profile_pb2_grpc.ProfileServiceServicer):
    """ListComputedTraits as the profile service answers it; the engine's define/ready/undefine calls."""

    def __init__(self) -> None:
        self.traits: set[str] = set()
        self.ops: dict[str, str] = {}  # a trait's op when not "last"

    async def ListComputedTraits(self, request, context):
        return profile_pb2.ListComputedTraitsResponse(
            traits=[
                profile_pb2.ComputedTraitStatus(
                    definition=profile_pb2.ComputedTraitDefinition(name=n, op=self.ops.get(n, "last")), state="ready"
                )
                for n in sorted(self.traits)
            ]
        )

    async def define(self, definitions) -> None:
        self.traits.update(d["name"] for d in definitions)

    async def ready(self, names) -> None:
        assert set(names) <= self.traits

    async def undefine(self, names) -> None:
        self.traits.difference_update(names)


class Platform:
    def __init__(self, stub, engine: SegmentationEngine, scoring: Scoring, profile: Profile) -> None:
        self.stub, self.engine, self.scoring, self.profile = stub, engine, scoring, profile

    async def create(self, segment_id: str, text: str) -> pb.Segment:
        request = pb.CreateSegmentRequest(id=segment_id, definition=pb.Definition(text=text), wait=True)
        return await self.stub.CreateSegment(request)

    async def refused(self, call) -> str:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return caught.value.details()


@contextlib.asynccontextmanager
async def platform(nats_url: str, *, scoring_address: str | None = "") -> AsyncIterator[Platform]:
    scoring, profile = Scoring(), Profile()
    peers = grpc.aio.server()
    scoring_pb2_grpc.add_ScoringServiceServicer_to_server(scoring, peers)
    profile_pb2_grpc.add_ProfileServiceServicer_to_server(profile, peers)
    port = peers.add_insecure_port("127.0.0.1:0")
    await peers.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    dead = grpc.aio.insecure_channel("127.0.0.1:1")  # nothing listens there

    async def setup(runtime: ServiceRuntime) -> None:
        store = await runtime.stack.enter_async_context(open_store("memory://"))
        bus = await runtime.stack.enter_async_context(Bus.connect(nats_url, name="segmentation-fields-test"))
        await bus.ensure_streams(profiles_stream(), segments_stream())
        scores_channel = dead if scoring_address is None else channel
        engine = SegmentationEngine(
            store,
            bus.publisher,
            partitions=1,
            owned=[0],
            telemetry=runtime.telemetry,
            define_traits=profile.define,
            traits_ready=profile.ready,
            undefine_traits=profile.undefine,
            known_fields=field_sources(
                models=deployed_models(scores_channel, "scoring-token", timeout=2.0),
                computed=computed_traits(channel, "profile-token", timeout=2.0),
            ),
            snapshot_interval=3600,
            timer_resolution=3600,
        )
        await engine.start()
        runtime.stack.push_async_callback(engine.stop)
        runtime.parts.update(engine=engine, store=store)
        runtime.grpc.add_service(
            segmentation_pb2_grpc.add_SegmentationServiceServicer_to_server,
            SegmentationApi(engine),
            pb.DESCRIPTOR.services_by_name["SegmentationService"],
            scopes=SCOPES,
        )

    settings = SegmentationSettings(
        nats_url=nats_url,
        grpc_host="127.0.0.1",
        grpc_port=0,
        auth_mode="none",
        partitions=1,
        shutdown_grace=1.0,
        store_url="memory://",
    )
    try:
        async with serving(settings, setup) as runtime:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as client:
                yield Platform(
                    segmentation_pb2_grpc.SegmentationServiceStub(client), runtime.parts["engine"], scoring, profile
                )
    finally:
        await channel.close()
        await dead.close()
        await peers.stop(None)


@pytest.fixture
async def running(nats_server):
    async with platform(nats_server.url) as started:
        started.scoring.models = {"churn": ["churn_risk"], "clusters": ["cluster"], "clv": ["clv_value_365d"]}
        started.profile.traits = {"orders_30d", "tickets_90d"}
        yield started


async def test_a_misspelt_score_is_refused_naming_it_and_the_score_meant(running):
    details = await running.refused(running.create("oops3", "scores.churn_rsik > 0.5"))
    assert "scores.churn_rsik" in details and "did you mean scores.churn_risk?" in details
    assert details.startswith("definition: ")
    assert running.engine.segments == {}  # nothing stored, nothing built
    assert [r async for r in running.engine.store.scan_all(SEGMENTS)] == []
    assert running.scoring.tokens[-1] == "Bearer scoring-token"
    # The score it meant is served, from a model in any role (here: shadow).
    assert (await running.create("at_risk", "scores.churn_risk > 0.5")).state == LIVE


async def test_a_computed_trait_nobody_defines_is_refused_and_an_event_condition_is_not(running):
    details = await running.refused(running.create("oops4", "computed.no_such_trait > 1"))
    assert "computed.no_such_trait" in details and "profile service defines no such computed trait" in details
    assert "known: computed.orders_30d, computed.tickets_90d" in details
    close = await running.refused(running.create("oops5", "computed.order_30d > 1"))
    assert "did you mean computed.orders_30d?" in close
    # A computed trait a deployed model reads counts as defined: scoring defines it on profile, perhaps
    # a moment after the model is listed (first start).
    running.scoring.reads = {"churn": ["sessions_7d"]}
    assert (await running.create("active", "computed.sessions_7d > 1")).state == LIVE
    # A definition's own event conditions are computed traits it defines: read, never refused.
    own = 'count(event = "Order Completed", within 30d) >= 1 and computed.orders_30d > 0'
    assert (await running.create("buyers", own)).state == LIVE


async def test_every_unknown_field_is_named_at_once_and_traits_are_free_form(running):
    details = await running.refused(
        running.create("two", 'scores.clusterr = 3 and computed.tickets_9d > 1 and traits.nickname = "x"')
    )
    assert "scores.clusterr" in details and "computed.tickets_9d" in details and "traits." not in details
    assert (await running.create("anyone", 'traits.brand_new_trait = "x"')).state == LIVE


async def test_an_update_and_an_estimate_are_checked_and_the_live_definition_keeps_serving(running):
    assert (await running.create("vip", "scores.clv_value_365d > 100")).state == LIVE
    update = pb.UpdateSegmentRequest(id="vip", name="renamed", definition=pb.Definition(text="scores.clv > 1"))
    details = await running.refused(running.stub.UpdateSegment(update))
    assert "did you mean scores.clv_value_365d?" in details
    segment = await running.stub.GetSegment(pb.GetSegmentRequest(id="vip"))
    assert (segment.text, segment.version, segment.state, segment.name) == ("scores.clv_value_365d > 100", 1, LIVE, "")
    estimate = running.stub.Estimate(pb.EstimateRequest(definition=pb.Definition(text="scores.churn_rsik > 0.5")))
    assert "scores.churn_rsik" in await running.refused(estimate)


async def test_a_scoring_service_not_answering_or_listing_no_model_yet_leaves_scores_unchecked(nats_server):
    async with platform(nats_server.url, scoring_address=None) as unreachable:
        assert (await unreachable.create("early", "scores.churn_risk > 0.5")).state == LIVE
        # Computed traits are still checked: the profile service answers.
        assert "computed.nope" in await unreachable.refused(unreachable.create("nope", "computed.nope > 1"))
    async with platform(nats_server.url) as starting:
        starting.scoring.down = True
        assert (await starting.create("early", "scores.churn_risk > 0.5")).state == LIVE
        starting.scoring.down = False  # first start: answering, the shipped models not deployed yet
        assert (await starting.create("early2", "scores.fraud_risk > 0.5")).state == LIVE
        starting.scoring.models = {"fraud": ["fraud_risk"]}
        assert "scores.fraud_rsik" in await starting.refused(starting.create("late", "scores.fraud_rsik > 0.5"))


def test_a_root_not_known_is_not_checked():
    compiled = compile_segment(parse("scores.anything > 1 and computed.whatever > 2"))
    check_fields(compiled, KnownFields({}))
    with pytest.raises(Exception, match=r"scores\.anything"):
        check_fields(compiled, KnownFields({"scores": frozenset({"churn_risk"})}))


@pytest.mark.parametrize(
    "text",
    [
        'scores.churn_risk > "high"',
        "scores.churn_risk = true",
        'traits.plan = "pro" and not scores.churn_risk in ["low", "mid"]',
        'scores.churn_risk starts_with "0."',
    ],
)
def test_a_score_compared_with_text_or_true_false_is_refused_naming_it(text):
    # A score is always a number: a comparison with text or true/false matches no one, for good (a marketer
    # trial's `scores.churn_risk > "high"` went live with 0 members and said nothing).
    compiled = compile_segment(parse(text))
    for known in (KnownFields({}), KnownFields({"scores": frozenset({"churn_risk"})})):
        with pytest.raises(InvalidArgument, match=r"scores\.churn_risk is a number") as refused:
            check_fields(compiled, known)
        assert refused.value.field == "definition"


def test_a_score_compared_with_a_number_a_field_or_a_percentile_passes():
    for text in ("scores.churn_risk > 0.5", "scores.churn_risk > scores.fraud_risk", "scores.clv >= percentile(scores.clv, 90)",
                 "scores.churn_risk in [0.1, 0.2]", "scores.churn_risk exists", 'traits.tier = "high"'):  # fmt: skip
        check_fields(compile_segment(parse(text)), KnownFields({}))


def _changed(seq: int, person: str, *, traits=None, computed=None, consent=None) -> Delivery:
    """One `profiles.changed.0` message with one change, as the consumer hands it to the engine."""
    message = profile_pb2.ProfileChanged(person_id=person, cause="event", created=seq == 0)
    message.at.GetCurrentTime()
    for name, value in (traits or {}).items():
        if isinstance(value, bool):
            message.traits[name].bool_value = value
        elif isinstance(value, str):
            message.traits[name].string_value = value
        else:
            message.traits[name].number_value = value
    for name, value in (consent or {}).items():
        message.consent[name] = value
    for name, value in (computed or {}).items():
        message.computed[name].number_value = value
    return Delivery(profile_pb2.ProfileChangedBatch(changes=[message]), subjects.profiles_changed(0), seq)


async def test_a_named_count_or_sum_trait_a_person_lacks_reads_as_zero_in_builds_and_live(running):
    # A marketer trial: `computed.orders < 1` matched no one, while someone who never ordered has 0 orders.
    running.profile.traits |= {"orders", "spent", "last_total"}
    running.profile.ops.update(orders="count", spent="sum")  # last_total: "last", no value stays no value
    engine, seq = running.engine, iter(range(1, 100))
    await engine.handle([_changed(next(seq), "buyer", computed={"orders": 2.0, "spent": 80.0, "last_total": 30.0})])
    await engine.handle([_changed(next(seq), "browser", traits={"plan": "free"})])  # no computed trait at all

    async def members(segment_id: str) -> list[str]:
        answer = await running.stub.ListMembers(pb.ListMembersRequest(segment_id=segment_id))
        return sorted(m.person_id for m in answer.members)

    assert (await running.create("never_ordered", "computed.orders < 1")).state == LIVE
    assert await members("never_ordered") == ["browser"]  # the build: every held person, not only the trait's
    assert (await running.create("small", "computed.spent <= 10 and computed.orders = 0")).state == LIVE
    assert await members("small") == ["browser"]
    assert (await running.create("cheap_last", "computed.last_total < 100")).state == LIVE
    assert await members("cheap_last") == ["buyer"]
    estimate = await running.stub.Estimate(pb.EstimateRequest(definition=pb.Definition(text="computed.orders < 1")))
    assert estimate.size == 1
    # Live: a person who just appeared, without the trait, enters; their first order takes them out.
    await engine.handle([_changed(next(seq), "newcomer", traits={"plan": "free"})])
    assert await members("never_ordered") == ["browser", "newcomer"]
    await engine.handle([_changed(next(seq), "newcomer", computed={"orders": 1.0})])
    assert await members("never_ordered") == ["browser"]
    # Stored with it: a restart, or another replica loading it, reads it the same way.
    record = await engine.store.get(SEGMENTS, "never_ordered")
    loaded = segment_from_doc("never_ordered", record.doc)
    assert loaded.compiled.counted == frozenset({"computed.orders"})
    assert loaded.compiled.evaluate({"traits.plan": "free"})


async def test_a_wrong_type_or_an_unknown_consent_key_is_answered_with_warnings_not_refused(running):
    # A marketer trial: `traits.vip = "true"` (vip is true/false on the profiles) and a consent purpose
    # spelt with a capital gave empty audiences and said nothing.
    engine = running.engine
    people = [
        ("ann", {"vip": True, "plan": "pro", "seats": 3.0}, {"purpose:marketing": True, "channel:email": True}),
        ("bob", {"vip": False, "plan": "free", "seats": 1.0}, {"purpose:marketing": False}),
    ]
    for seq, (person, traits, consent) in enumerate(people, start=1):
        await engine.handle([_changed(seq, person, traits=traits, consent=consent)])

    created = await running.create("vips", 'traits.vip = "true"')
    assert created.state == LIVE and created.size == 0  # not refused: traits are open-ended
    assert list(created.warnings) == ["traits.vip is compared with text, but the profiles hold true/false there"]
    estimate = await running.stub.Estimate(
        pb.EstimateRequest(definition=pb.Definition(text="consent.purpose:Marketing = true"))
    )
    assert estimate.size == 0
    [warning] = estimate.warnings
    assert warning.startswith("consent.purpose:Marketing: no profile has this consent key")
    assert "consent.purpose:marketing" in warning
    update = pb.UpdateSegmentRequest(
        id="vips", definition=pb.Definition(text='traits.seats >= "2" or traits.plna = "pro"')
    )
    updated = await running.stub.UpdateSegment(update)
    assert list(updated.segment.warnings) == [
        "traits.seats is compared with text, but the profiles hold a number there",
        "traits.plna: no profile has this trait; did you mean traits.plan?",
    ]
    # What the profiles hold, right: no warning; and none is kept past the call that found it.
    fine = await running.stub.UpdateSegment(
        pb.UpdateSegmentRequest(
            id="vips", definition=pb.Definition(text='traits.vip = true and traits.plan in ["pro", 1]')
        )
    )
    assert list(fine.segment.warnings) == [] and fine.segment.size == 1
    assert list((await running.stub.GetSegment(pb.GetSegmentRequest(id="vips"))).warnings) == []
