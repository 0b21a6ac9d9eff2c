"""SegmentationService over gRPC, in-process on a real nats-server and the memory store: create from text
and from the JSON tree, errors that name the field (line and column for text, the JSON path for the
tree), lifecycle (update with its membership difference, delete, references and cycles), estimates
(event conditions defined as computed traits), member pages and a person's memberships.

Hostile definitions: nesting and size limits (what is accepted travels in every response, what is not is
refused naming the limit, and never stored), the cap on computed traits per definition, and computed
traits deleted again on the profile service by whatever stops reading them (delete, failed create,
Estimate), so none is left orphaned.

Profile changes are fed to the engine as the `profiles.changed` consumer would; the profile service is
a fake that records the computed traits the engine defines and deletes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from cdp.profile.v1 import profile_pb2
from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from cdp_kit.bus import Bus, profiles_stream, segments_stream, subjects
from cdp_kit.errors import InvalidArgument, ResourceExhausted
from cdp_kit.service import ServiceRuntime, serving
from cdp_kit.storage import open_store
from cdp_kit.timestamps import to_seconds
from cdp_segmentation.api import MAX_PAGE, MAX_TEXT, SCOPES, SegmentationApi, whole_numbers
from cdp_segmentation.domain import from_json, parse, to_json
from cdp_segmentation.domain.nodes import MAX_DEPTH
from cdp_segmentation.engine import SEGMENTS, SegmentationEngine
from cdp_segmentation.settings import SegmentationSettings
from cdp_testing.fakes import T0, Clock, Delivery

pb = segmentation_pb2
LIVE = pb.SEGMENT_STATE_LIVE
HOUR = 3600.0
BUYERS = 'count(event = "Order Completed" and properties.total > 50, within 30d) >= 3'


class Profile:
    """The profile service as the engine sees it: computed traits defined, then waited for. `gate`, when
    set, holds `ready` until the test opens it; event names in `refuse` are refused as the real client
    refuses what the profile service finds invalid, and past `capacity` held traits a new one is refused
    as the profile service's CDP_PROFILE_MAX_COMPUTED_TRAITS refuses it. `held`: what is defined now."""

    def __init__(self) -> None:
        self.defined: list[dict] = []
        self.held: dict[str, dict] = {}
        self.refuse: set[str] = set()
        self.capacity = 1_000
        self.gate: asyncio.Event | None = None

    async def define(self, definitions) -> None:
        for definition in definitions:
            if set(definition.get("event_names") or ()) & self.refuse:
                raise InvalidArgument("definition", "an event condition the profile service refuses: test")
            if definition["name"] not in self.held and len(self.held) >= self.capacity:
                raise ResourceExhausted("the profile service holds no more computed traits: test")
            self.defined.append(dict(definition))
            self.held[definition["name"]] = dict(definition)

    async def undefine(self, names) -> None:
        for name in names:
            self.held.pop(name, None)

    async def ready(self, names) -> None:
        assert set(names) <= {d["name"] for d in self.defined}
        if self.gate is not None:
            await self.gate.wait()


def changed(changes: list[profile_pb2.ProfileChanged], seq: int) -> Delivery:
    """One `profiles.changed.0` message as the consumer hands it to the engine."""
    return Delivery(profile_pb2.ProfileChangedBatch(changes=changes), subjects.profiles_changed(0), seq)


def change(person: str, *, traits=None, computed=None, scores=None) -> profile_pb2.ProfileChanged:
    message = profile_pb2.ProfileChanged(person_id=person, cause="event")
    message.at.GetCurrentTime()
    for name, value in (traits or {}).items():
        if isinstance(value, str):
            message.traits[name].string_value = value
        else:
            message.traits[name].number_value = value
    for name, value in (computed or {}).items():
        message.computed[name].number_value = value
    for name, value in (scores or {}).items():
        message.scores[name] = value
    return message


class Service:
    def __init__(self, stub: segmentation_pb2_grpc.SegmentationServiceStub, engine: SegmentationEngine) -> None:
        self.stub = stub
        self.engine = engine
        self.seq = 0

    async def feed(self, *changes: profile_pb2.ProfileChanged) -> None:
        self.seq += 1
        await self.engine.handle([changed(list(changes), self.seq)])

    async def create(self, segment_id: str, text: str, **kw) -> pb.Segment:
        request = pb.CreateSegmentRequest(id=segment_id, definition=pb.Definition(text=text), wait=True, **kw)
        return await self.stub.CreateSegment(request)


def text(value: str) -> pb.Definition:
    return pb.Definition(text=value)


def tree(value: dict) -> pb.Definition:
    definition = pb.Definition()
    json_format.ParseDict(value, definition.tree)
    return definition


def as_dict(message) -> dict:
    return json_format.MessageToDict(message)


def violations(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    """(field, description) of every BadRequest field violation in the status details."""
    found = []
    for detail in rpc_status.from_call(error).details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found += [(v.field, v.description) for v in bad.field_violations]
    return found


def service_setup(profile: Profile | None, **engine_options) -> Callable:
    async def setup(runtime: ServiceRuntime) -> None:
        settings: SegmentationSettings = runtime.settings  # type: ignore[assignment]
        store = await runtime.stack.enter_async_context(open_store(settings.store_url))
        bus = await runtime.stack.enter_async_context(Bus.connect(settings.nats_url, name="segmentation-api-test"))
        await bus.ensure_streams(profiles_stream(), segments_stream())
        engine = SegmentationEngine(
            store,
            bus.publisher,
            partitions=1,
            owned=[0],
            telemetry=runtime.telemetry,
            define_traits=profile.define if profile else None,
            traits_ready=profile.ready if profile else None,
            undefine_traits=profile.undefine if profile else None,
            snapshot_interval=3600,
            timer_resolution=3600,
            **engine_options,
        )
        await engine.start()
        runtime.stack.push_async_callback(engine.stop)
        runtime.parts["engine"] = engine
        runtime.grpc.add_service(
            segmentation_pb2_grpc.add_SegmentationServiceServicer_to_server,
            SegmentationApi(engine),
            pb.DESCRIPTOR.services_by_name["SegmentationService"],
            scopes=SCOPES,
        )

    return setup


@contextlib.asynccontextmanager
async def running(nats_url: str, profile: Profile | None, **engine_options) -> AsyncIterator[Service]:
    """The service on a gRPC port (with or without a profile service behind it), and a client of it.
    `engine_options` go to the engine (a clock, the percentile interval)."""
    settings = SegmentationSettings(
        nats_url=nats_url,
        grpc_host="127.0.0.1",
        grpc_port=0,
        auth_mode="none",
        partitions=1,
        shutdown_grace=1.0,
        store_url="memory://",
    )
    async with serving(settings, service_setup(profile, **engine_options)) as runtime:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
            yield Service(segmentation_pb2_grpc.SegmentationServiceStub(channel), runtime.parts["engine"])


@pytest.fixture
def profile() -> Profile:
    return Profile()


@pytest.fixture
async def service(nats_server, profile):
    async with running(nats_server.url, profile) as started:
        yield started


# --- create -------------------------------------------------------------------------------------


async def test_create_from_text_waits_until_live_and_answers_the_canonical_forms(service):
    await service.feed(
        change("p1", traits={"plan": "pro"}),
        change("p2", traits={"plan": "pro"}),
        change("p3", traits={"plan": "free"}),
    )
    segment = await service.create("pro", 'traits.plan="pro"', name="Pro plan", description="paying customers")
    assert segment.state == LIVE and segment.size == 2
    assert (segment.profiles_done, segment.profiles_total) == (3, 3)
    assert segment.text == 'traits.plan = "pro"'
    assert as_dict(segment.tree) == {"field": "traits.plan", "op": "=", "value": "pro"}
    assert (segment.id, segment.name, segment.description, segment.version) == (
        "pro",
        "Pro plan",
        "paying customers",
        1,
    )
    assert not segment.error and not segment.time_dependent and list(segment.computed_traits) == []
    assert to_seconds(segment.created_at) > 0 and to_seconds(segment.live_at) >= to_seconds(segment.created_at)


async def test_create_from_the_json_tree(service):
    await service.feed(
        change("p1", traits={"plan": "pro"}, scores={"churn": 0.9}),
        change("p2", scores={"churn": 0.8}),
        change("p3", scores={"churn": 0.1}),
    )
    await service.create("pro", 'traits.plan = "pro"')
    request = pb.CreateSegmentRequest(
        id="churny_free",
        definition=tree({"and": [{"field": "scores.churn", "op": ">=", "value": 0.5}, {"not": {"segment": "pro"}}]}),
        wait=True,
    )
    segment = await service.stub.CreateSegment(request)
    assert segment.state == LIVE and segment.size == 1
    assert segment.text == 'scores.churn >= 0.5 and not in_segment("pro")'
    assert as_dict(segment.tree) == {
        "and": [{"field": "scores.churn", "op": ">=", "value": 0.5}, {"not": {"segment": "pro"}}]
    }
    assert list(segment.depends_on) == ["pro"]
    members = await service.stub.ListMembers(pb.ListMembersRequest(segment_id="churny_free"))
    assert [m.person_id for m in members.members] == ["p2"]


async def test_a_percentile_and_a_field_comparison_travel_as_a_tree(service):
    await service.feed(*(change(f"p{i}", scores={"clv": float(i), "avg": 4.5}) for i in range(10)))
    definition = {
        "and": [
            {"field": "scores.clv", "op": ">=", "value": {"percentile": "scores.clv", "percent": 80}},
            {"field": "scores.clv", "op": ">", "value": {"field": "scores.avg"}},
        ]
    }
    segment = await service.stub.CreateSegment(
        pb.CreateSegmentRequest(id="top", definition=tree(definition), wait=True)
    )
    assert segment.state == LIVE and segment.size == 2  # 7.2 and above: p8, p9
    assert segment.text == "scores.clv >= percentile(scores.clv, 80) and scores.clv > scores.avg"
    assert as_dict(segment.tree) == definition


async def test_arithmetic_and_field_membership_travel_as_text_and_tree(service):
    await service.feed(*(change(f"p{i}", scores={"clv": float(i), "avg": 2.0}) for i in range(10)))
    definition = {
        "and": [
            {"field": "scores.clv", "op": ">", "value": {"*": [2, {"field": "scores.avg"}]}},
            {
                "left": {"-": [{"field": "scores.clv"}, {"percentile": "scores.clv", "percent": 50}]},
                "op": "<",
                "right": 4,
            },
        ]
    }
    segment = await service.stub.CreateSegment(
        pb.CreateSegmentRequest(id="calc", definition=tree(definition), wait=True)
    )
    # clv > 4 and clv - 4.5 < 4: p5 to p8
    assert segment.state == LIVE and segment.size == 4
    assert segment.text == "scores.clv > 2 * scores.avg and scores.clv - percentile(scores.clv, 50) < 4"
    assert as_dict(segment.tree) == definition
    assert from_json(whole_numbers(as_dict(segment.tree))) == parse(segment.text)
    estimate = await service.stub.Estimate(pb.EstimateRequest(definition=text("scores.clv / scores.avg >= 4")))
    assert estimate.size == 2  # p8, p9


async def test_a_segment_with_arithmetic_or_field_membership_follows_a_change_of_any_field_it_reads(service):
    # Two thresholds on scores.last make it threshold-indexed; the arithmetic on it is not a threshold.
    await service.create("big", "scores.last > 100")
    await service.create("huge", "scores.last > 1000")
    await service.create("above_twice_average", "scores.last > 2 * scores.avg")
    await service.create("margin", "scores.last - scores.avg / 2 >= 10")
    await service.create("allowed", "traits.country in traits.allowed_countries")
    await service.create("favourite", "traits.tags contains traits.favourite")

    def member_of(person: str) -> set[str]:
        return set(service.engine.membership(person))

    await service.feed(change("p1", scores={"last": 50.0, "avg": 80.0}))
    assert member_of("p1") == {"margin"}  # 50 - 40 >= 10
    await service.feed(change("p1", scores={"avg": 20.0}))
    assert member_of("p1") == {"above_twice_average", "margin"}
    await service.feed(change("p1", scores={"last": 30.0}))
    assert member_of("p1") == {"margin"}  # 30 - 10 >= 10, 30 > 40 no longer
    await service.feed(change("p1", scores={"avg": 50.0}))
    assert member_of("p1") == set()

    entry = change("p2", traits={"country": "DE", "favourite": "vip"})
    entry.traits["allowed_countries"].list_value.values.add().string_value = "AT"
    entry.traits["tags"].list_value.values.add().string_value = "vip"
    await service.feed(entry)
    assert member_of("p2") == {"favourite"}
    moved = change("p2", traits={"favourite": "new"})
    moved.traits["allowed_countries"].list_value.values.add().string_value = "DE"
    await service.feed(moved)
    assert member_of("p2") == {"allowed"}


async def test_a_percentile_inside_arithmetic_follows_the_population_for_every_person(nats_server, profile):
    # The test runs the round itself, so the engine's own loop must not run it first: one round per boundary,
    # and with the wall clock a 5 s boundary passing after the build went live (under load) let the loop take
    # it, the test's round then finding it ran (0 persons). The engine's clock stands still at a boundary of
    # an hour-long interval instead: the loop's first round is an hour of real time away.
    clock = Clock(T0 - T0 % HOUR)
    async with running(nats_server.url, profile, clock=clock, percentile_interval=HOUR) as service:
        await service.feed(*(change(f"p{i}", scores={"clv": float(i)}) for i in range(20)))
        await service.create("half_top", "scores.clv >= percentile(scores.clv, 90) / 2")
        engine = service.engine
        assert sorted(engine.members["half_top"]) == sorted(f"p{i}" for i in range(9, 20))  # at least 17.1 / 2
        await service.feed(change("p5", scores={"clv": 100.0}), change("p6", scores={"clv": 101.0}))
        assert {"p5", "p6"} <= set(engine.members["half_top"])
        # The round moves the percentile to 19 + 0.1 * 81 = 27.1: half of it is 13.55. The persons it passed
        # over are no one field's range of values, so every person is evaluated again.
        assert await engine.recompute_percentiles() == 20
        assert sorted(engine.members["half_top"]) == sorted(["p5", "p6", *(f"p{i}" for i in range(14, 20))])


async def test_a_tree_and_the_text_it_stands_for_make_the_same_segment(service, profile):
    """A Struct carries only doubles: the tree's 50 arrives as 50.0. The same definition written either
    way must read back the same and share one computed trait on the profile service."""
    from_text = await service.create("by_text", BUYERS)
    request = pb.CreateSegmentRequest(id="by_tree", definition=tree(as_dict(from_text.tree)), wait=True)
    from_tree = await service.stub.CreateSegment(request)
    assert from_tree.text == from_text.text == BUYERS
    assert list(from_tree.computed_traits) == list(from_text.computed_traits)
    assert len({d["name"] for d in profile.defined}) == 1


async def test_a_syntax_error_names_definition_text_with_line_column_and_what_was_expected(service):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.create("pro", 'traits.plan = "pro" and\n  scores.churn >> 0.5')
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [(field, description)] = violations(caught.value)
    assert field == "definition.text"
    assert description.startswith("line 2, column 17: expected a value"), description
    assert "found '>'" in description
    assert "line 2, column 17" in caught.value.details()
    assert list((await service.stub.ListSegments(pb.ListSegmentsRequest())).segments) == []


async def test_an_error_in_the_tree_names_its_json_path(service):
    definition = tree({"and": [{"field": "traits.plan", "op": "=", "value": "pro"}, {"field": "scores.x", "op": "~"}]})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.stub.CreateSegment(pb.CreateSegmentRequest(id="pro", definition=definition))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [(field, description)] = violations(caught.value)
    assert field == "definition.tree.and[1].op"
    assert "'~' is not an operator" in description


@pytest.mark.parametrize(
    ("definition", "field", "message"),
    [
        (text("scores.x > 1 and\n  scores.y * "), "definition.text", "line 2, column 14: expected a number, a field"),
        (text('scores.x + "1" > 1'), "definition.text", "line 1, column 12: expected a number, a field"),
        (text("1 + 2 > 3"), "definition.text", "line 1, column 1: expected a field on one side"),
        (
            tree(
                {
                    "and": [
                        {"field": "scores.x", "op": ">", "value": 1},
                        {"left": {"/": [{"field": "scores.y"}]}, "op": ">", "right": 0},
                    ]
                }
            ),
            "definition.tree.and[1].left./",
            "a list of two operands",
        ),
        (
            tree({"field": "scores.x", "op": "!=", "value": {"-": [{"percentile": "scores.x", "percent": 50}, 1]}}),
            "definition.tree.op",
            "cannot compare with a percentile",
        ),
    ],
)
async def test_bad_arithmetic_is_refused_naming_where_and_nothing_is_stored(service, definition, field, message):
    for call in (service.stub.CreateSegment, service.stub.Estimate):
        request = (
            pb.CreateSegmentRequest(id="calc", definition=definition)
            if call == service.stub.CreateSegment
            else pb.EstimateRequest(definition=definition)
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        [(named, description)] = violations(caught.value)
        assert named == field and message in description, (named, description)
    assert list((await service.stub.ListSegments(pb.ListSegmentsRequest())).segments) == []


@pytest.mark.parametrize(
    ("call", "request_", "code", "field"),
    [
        (
            "CreateSegment",
            pb.CreateSegmentRequest(id="Bad Id", definition=text("scores.x > 1")),
            "INVALID_ARGUMENT",
            "id",
        ),
        ("CreateSegment", pb.CreateSegmentRequest(id=""), "INVALID_ARGUMENT", "id"),
        ("CreateSegment", pb.CreateSegmentRequest(id="new"), "INVALID_ARGUMENT", "definition"),
        (
            "CreateSegment",
            pb.CreateSegmentRequest(id="new", definition=pb.Definition()),
            "INVALID_ARGUMENT",
            "definition",
        ),
        (
            "CreateSegment",
            pb.CreateSegmentRequest(id="new", definition=text("scores.x > 1 " + " " * MAX_TEXT)),
            "INVALID_ARGUMENT",
            "definition.text",
        ),
        (
            "CreateSegment",
            pb.CreateSegmentRequest(id="new", definition=text('in_segment("nope")')),
            "INVALID_ARGUMENT",
            "definition",
        ),
        ("CreateSegment", pb.CreateSegmentRequest(id="pro", definition=text("scores.x > 1")), "ALREADY_EXISTS", None),
        ("GetSegment", pb.GetSegmentRequest(id="nope"), "NOT_FOUND", None),
        ("UpdateSegment", pb.UpdateSegmentRequest(id="nope", name="x"), "NOT_FOUND", None),
        (
            "UpdateSegment",
            pb.UpdateSegmentRequest(id="pro", definition=text("scores.x >")),
            "INVALID_ARGUMENT",
            "definition.text",
        ),
        ("DeleteSegment", pb.DeleteSegmentRequest(id="nope"), "NOT_FOUND", None),
        ("ListMembers", pb.ListMembersRequest(segment_id="nope"), "NOT_FOUND", None),
        (
            "ListMembers",
            pb.ListMembersRequest(segment_id="pro", page_size=MAX_PAGE + 1),
            "INVALID_ARGUMENT",
            "page_size",
        ),
        ("ListMembers", pb.ListMembersRequest(segment_id="pro", page_size=-1), "INVALID_ARGUMENT", "page_size"),
        ("ListMembers", pb.ListMembersRequest(segment_id="pro", page_token="____"), "INVALID_ARGUMENT", "page_token"),
        ("GetMembership", pb.GetMembershipRequest(), "INVALID_ARGUMENT", "person_id"),
        ("Estimate", pb.EstimateRequest(), "INVALID_ARGUMENT", "definition"),
        ("Estimate", pb.EstimateRequest(definition=text("traits.plan = ")), "INVALID_ARGUMENT", "definition.text"),
    ],
)
async def test_bad_requests_get_a_clear_status_naming_the_field(service, call, request_, code, field):
    await service.create("pro", 'traits.plan = "pro"')
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(service.stub, call)(request_)
    assert caught.value.code() == getattr(grpc.StatusCode, code), caught.value.details()
    if field is not None:
        assert [f for f, _ in violations(caught.value)] == [field]


async def test_a_bad_segment_id_in_list_members_is_named_segment_id(service):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.stub.ListMembers(pb.ListMembersRequest(segment_id="Not An Id"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in violations(caught.value)] == ["segment_id"]


async def test_a_page_token_the_service_never_gave_is_refused_not_read_as_the_first_page(service):
    await service.feed(change("p1", traits={"plan": "pro"}))
    await service.create("pro", 'traits.plan = "pro"')
    for garbage in ("!!", "."):  # no base64 characters at all: they decode to nothing
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await service.stub.ListMembers(pb.ListMembersRequest(segment_id="pro", page_token=garbage))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in violations(caught.value)] == ["page_token"]


# --- lifecycle ----------------------------------------------------------------------------------


async def test_update_returns_the_membership_difference_with_samples(service):
    await service.feed(*[change(f"p{i}", scores={"churn": i / 10}) for i in range(10)])
    await service.create("churny", "scores.churn >= 0.7")
    response = await service.stub.UpdateSegment(
        pb.UpdateSegmentRequest(id="churny", definition=text("scores.churn >= 0.5 and scores.churn < 0.8"))
    )
    assert (response.entered, response.exited) == (2, 2)
    assert (list(response.sample_entered), list(response.sample_exited)) == (["p5", "p6"], ["p8", "p9"])
    segment = response.segment
    assert (segment.state, segment.version, segment.size) == (LIVE, 2, 3)
    assert segment.text == "scores.churn >= 0.5 and scores.churn < 0.8"
    members = await service.stub.ListMembers(pb.ListMembersRequest(segment_id="churny"))
    assert [m.person_id for m in members.members] == ["p5", "p6", "p7"]

    renamed = await service.stub.UpdateSegment(pb.UpdateSegmentRequest(id="churny", name="Churn risk"))
    assert (renamed.entered, renamed.exited, renamed.segment.version) == (0, 0, 2)
    assert renamed.segment.name == "Churn risk" and renamed.segment.text == segment.text


async def test_an_update_that_fails_to_build_reports_no_membership_difference(service, profile):
    await service.feed(*[change(f"p{i}", scores={"churn": i / 10}) for i in range(10)])
    created = await service.create("churny", "scores.churn >= 0.7")
    profile.refuse.add("Refused")
    request = pb.UpdateSegmentRequest(id="churny", definition=text('performed("Refused")'))
    try:
        response = await service.stub.UpdateSegment(request)
    except grpc.aio.AioRpcError as exc:  # refusing the update outright is as good
        assert "refuses" in exc.details(), exc
    else:
        # Nobody entered or exited because of this call: the answer must not say they did.
        assert "refuses" in response.segment.error
        assert (response.entered, response.exited) == (0, 0)
        assert (list(response.sample_entered), list(response.sample_exited)) == ([], [])
    segment = await service.stub.GetSegment(pb.GetSegmentRequest(id="churny"))
    assert (segment.text, segment.version, segment.size) == (created.text, 1, 3)


async def test_update_refuses_a_cycle_and_keeps_the_definition(service):
    await service.create("a", "scores.x > 1")
    await service.create("b", 'in_segment("a")')
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.stub.UpdateSegment(pb.UpdateSegmentRequest(id="a", definition=text('in_segment("b")')))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [(field, description)] = violations(caught.value)
    assert field == "definition" and "cycle" in description and "a → b → a" in description
    segment = await service.stub.GetSegment(pb.GetSegmentRequest(id="a"))
    assert (segment.text, segment.version, segment.state) == ("scores.x > 1", 1, LIVE)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.create("c", 'in_segment("c")')
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_delete_is_refused_while_referred_to_then_returns_the_members_that_exited(service):
    await service.feed(change("p1", traits={"plan": "pro"}), change("p2", traits={"plan": "pro"}))
    await service.create("pro", 'traits.plan = "pro"')
    await service.create("pro_de", 'in_segment("pro") and traits.country = "DE"')
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.stub.DeleteSegment(pb.DeleteSegmentRequest(id="pro"))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "pro_de" in caught.value.details()
    assert (await service.stub.DeleteSegment(pb.DeleteSegmentRequest(id="pro_de"))).exited == 0
    assert (await service.stub.DeleteSegment(pb.DeleteSegmentRequest(id="pro"))).exited == 2
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.stub.GetSegment(pb.GetSegmentRequest(id="pro"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert list((await service.stub.GetMembership(pb.GetMembershipRequest(person_id="p1"))).segments) == []


async def test_a_create_waiting_for_its_build_is_answered_when_an_update_replaces_the_build(service, profile):
    await service.feed(change("p1", traits={"plan": "pro"}))
    profile.gate = asyncio.Event()  # the first build waits for its backfill until the update replaces it
    request = pb.CreateSegmentRequest(id="buyers", definition=text(BUYERS), wait=True)
    creating = asyncio.ensure_future(service.stub.CreateSegment(request, timeout=3))
    for _ in range(500):
        if profile.defined:
            break
        await asyncio.sleep(0.01)
    assert profile.defined, "the build never asked for its computed trait"
    await service.stub.UpdateSegment(pb.UpdateSegmentRequest(id="buyers", definition=text('traits.plan = "pro"')))
    segment = await creating
    assert (segment.state, segment.version, segment.text, segment.size) == (LIVE, 2, 'traits.plan = "pro"', 1)


async def test_get_and_list_segments(service):
    await service.feed(change("p1", scores={"x": 2.0}))
    await service.create("zeta", "scores.x > 1")
    await service.create("alpha", "scores.x > 5", name="Alpha")
    listed = await service.stub.ListSegments(pb.ListSegmentsRequest())
    assert [(s.id, s.size) for s in listed.segments] == [("alpha", 0), ("zeta", 1)]
    alpha = await service.stub.GetSegment(pb.GetSegmentRequest(id="alpha"))
    assert alpha == listed.segments[0]
    assert (alpha.name, alpha.text, alpha.state) == ("Alpha", "scores.x > 5", LIVE)


# --- estimates ----------------------------------------------------------------------------------


async def test_estimate_counts_without_creating(service):
    await service.feed(*[change(f"p{i:02d}", scores={"clv": float(i)}) for i in range(30)])
    estimate = await service.stub.Estimate(pb.EstimateRequest(definition=text("scores.clv>=25")))
    assert (estimate.size, estimate.population) == (5, 30)
    assert list(estimate.sample) == [f"p{i}" for i in range(25, 30)]
    assert estimate.text == "scores.clv >= 25"
    assert as_dict(estimate.tree) == {"field": "scores.clv", "op": ">=", "value": 25.0}
    assert not estimate.time_dependent and estimate.evaluate_ms >= 0
    assert list((await service.stub.ListSegments(pb.ListSegmentsRequest())).segments) == []
    timed = await service.stub.Estimate(pb.EstimateRequest(definition=text("traits.trial_ends_at < now")))
    assert timed.time_dependent and timed.size == 0


async def test_estimate_of_an_event_condition_defines_its_computed_trait(service, profile):
    await service.feed(change("p1"), change("p2"))
    first = await service.stub.Estimate(pb.EstimateRequest(definition=text(BUYERS)))
    [definition] = profile.defined
    assert list(first.computed_traits) == [definition["name"]]
    assert (definition["op"], definition["window"], definition["where"]) == ("count", "30d", {"total": {"$gt": 50}})
    assert (first.size, first.population) == (0, 2)
    await service.feed(change("p2", computed={definition["name"]: 3}))
    second = await service.stub.Estimate(pb.EstimateRequest(definition=text(BUYERS)))
    assert (second.size, list(second.sample)) == (1, ["p2"])


async def test_event_conditions_need_the_profile_service(nats_server):
    async with running(nats_server.url, None) as service:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await service.stub.Estimate(pb.EstimateRequest(definition=text(BUYERS)))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "CDP_PROFILE_ADDRESS" in caught.value.details()


# --- members ------------------------------------------------------------------------------------


async def test_list_members_pages_in_person_order_with_page_tokens(service):
    await service.feed(*[change(f"p{i:03d}", scores={"clv": 1.0}) for i in range(25)])
    await service.create("all", "scores.clv > 0")
    pages, token = [], ""
    while True:
        page = await service.stub.ListMembers(pb.ListMembersRequest(segment_id="all", page_size=10, page_token=token))
        assert page.total == 25
        pages.append([m.person_id for m in page.members])
        assert all(to_seconds(m.since) > 0 for m in page.members)
        token = page.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [p for page in pages for p in page] == [f"p{i:03d}" for i in range(25)]
    whole = await service.stub.ListMembers(pb.ListMembersRequest(segment_id="all"))
    assert len(whole.members) == 25 and not whole.next_page_token
    exact = await service.stub.ListMembers(pb.ListMembersRequest(segment_id="all", page_size=25))
    assert len(exact.members) == 25 and not exact.next_page_token
    after_last = base64.urlsafe_b64encode(b"p024").decode()
    empty = await service.stub.ListMembers(pb.ListMembersRequest(segment_id="all", page_token=after_last))
    assert (list(empty.members), empty.next_page_token, empty.total) == ([], "", 25)


async def test_get_membership_lists_a_persons_segments(service):
    await service.feed(change("p1", traits={"plan": "pro"}, scores={"churn": 0.9}), change("p2"))
    await service.create("risky", "scores.churn > 0.5")
    await service.create("pro", 'traits.plan = "pro"')
    await service.create("free", 'not traits.plan = "pro"')
    membership = await service.stub.GetMembership(pb.GetMembershipRequest(person_id="p1"))
    assert membership.person_id == "p1"
    assert [m.segment_id for m in membership.segments] == ["pro", "risky"]
    assert all(to_seconds(m.since) > 0 for m in membership.segments)
    other = await service.stub.GetMembership(pb.GetMembershipRequest(person_id="p2"))
    assert [m.segment_id for m in other.segments] == ["free"]
    unknown = await service.stub.GetMembership(pb.GetMembershipRequest(person_id="ghost"))
    assert list(unknown.segments) == []


# --- hostile definitions: nesting, size, computed traits ----------------------------------------

# The deepest leaf the language has: an aggregate whose event predicate holds a list (most message levels
# in the Struct of Segment.tree).
DEEP_LEAF = 'count(event = "Order Completed" and properties.plan in ["pro", "team"], within 30d) >= 2'


def nested_text(levels: int) -> str:
    """`levels` of alternating and / or around DEEP_LEAF, the deepest tree that many levels allow."""
    text = DEEP_LEAF
    for level in range(levels):
        text = f"scores.x{level} > 1 {'and' if level % 2 else 'or'} ({text})"
    return text


def nested_tree(levels: int) -> dict:
    """The JSON tree of nested_text(levels), built without the parser (which refuses it past the limit)."""
    document = to_json(parse(DEEP_LEAF))
    for level in range(levels):
        sibling = {"field": f"scores.x{level}", "op": ">", "value": 1}
        document = {"and" if level % 2 else "or": [sibling, document]}
    return document


async def test_a_definition_nested_at_the_limit_travels_in_every_response_and_parses_back(service):
    await service.feed(change("p1", scores={f"x{level}": 2.0 for level in range(MAX_DEPTH)}))
    text_at_limit = nested_text(MAX_DEPTH)
    node = parse(text_at_limit)
    assert to_json(node) == nested_tree(MAX_DEPTH)
    tree_at_limit = tree(nested_tree(MAX_DEPTH))

    created = await service.stub.CreateSegment(pb.CreateSegmentRequest(id="deep", definition=tree_at_limit, wait=True))
    got = await service.stub.GetSegment(pb.GetSegmentRequest(id="deep"))
    [listed] = (await service.stub.ListSegments(pb.ListSegmentsRequest())).segments
    updated = await service.stub.UpdateSegment(
        pb.UpdateSegmentRequest(id="deep", definition=text(text_at_limit.replace("x0", "y0")))
    )
    estimate = await service.stub.Estimate(pb.EstimateRequest(definition=text(text_at_limit)))
    assert (created.state, created.size, estimate.size) == (LIVE, 1, 1)
    for carried in (created, got, listed, estimate):
        assert parse(carried.text) == node
        assert from_json(whole_numbers(as_dict(carried.tree))) == node
    assert parse(updated.segment.text) == parse(text_at_limit.replace("x0", "y0"))
    assert from_json(whole_numbers(as_dict(updated.segment.tree))) == parse(updated.segment.text)


def arithmetic_text(levels: int, within: int = 0) -> str:
    """`within` levels of alternating or / and around a sum with `levels` levels of arithmetic (+ then -)."""
    sum_ = " ".join(["scores.y", *(f"{'+' if i % 2 else '-'} scores.y{i}" for i in range(levels))])
    text = f"{sum_} < 1"
    for level in range(within):
        text = f"scores.x{level} > 1 {'and' if level % 2 else 'or'} ({text})"
    return text


def arithmetic_tree(levels: int) -> dict:
    """The JSON tree of arithmetic_text(levels), built without the parser."""
    operand: dict = {"field": "scores.y"}
    for i in range(levels):
        operand = {"+" if i % 2 else "-": [operand, {"field": f"scores.y{i}"}]}
    return {"left": operand, "op": "<", "right": 1}


async def test_arithmetic_nested_at_the_limit_travels_in_every_response_and_parses_back(service):
    scores = {"y": 0.0, **{f"y{i}": 0.0 for i in range(MAX_DEPTH)}, **{f"x{i}": 2.0 for i in range(6)}}
    await service.feed(change("p1", scores=scores))
    assert to_json(parse(arithmetic_text(MAX_DEPTH))) == arithmetic_tree(MAX_DEPTH)
    for segment_id, definition in (
        ("sum", tree(arithmetic_tree(MAX_DEPTH))),
        ("mixed", text(arithmetic_text(MAX_DEPTH - 6, within=6))),
    ):
        created = await service.stub.CreateSegment(
            pb.CreateSegmentRequest(id=segment_id, definition=definition, wait=True)
        )
        assert (created.state, created.size) == (LIVE, 1)
    listed = (await service.stub.ListSegments(pb.ListSegmentsRequest())).segments
    assert len(listed) == 2
    for carried in listed:
        assert from_json(whole_numbers(as_dict(carried.tree))) == parse(carried.text)


@pytest.mark.parametrize(
    "definition, field",
    [
        (text(arithmetic_text(MAX_DEPTH + 1)), "definition.text"),
        (text(arithmetic_text(MAX_DEPTH - 5, within=6)), "definition.text"),
        (tree(arithmetic_tree(MAX_DEPTH + 1)), "definition.tree"),
        (text(nested_text(MAX_DEPTH + 1)), "definition.text"),
        (tree(nested_tree(MAX_DEPTH + 1)), "definition.tree"),
        (text("not " * (MAX_DEPTH + 1) + "traits.x exists"), "definition.text"),
        (text("not " * 40 + "traits.x exists"), "definition.text"),  # 172 characters, once stored
        (text("(" * 300 + "traits.x exists" + ")" * 300), "definition.text"),
        (text("not " * 300 + "traits.x exists"), "definition.text"),
    ],
)
async def test_nesting_past_the_limit_is_refused_naming_it_and_nothing_is_stored(service, definition, field):
    request = pb.CreateSegmentRequest(id="deep", definition=definition, wait=True)
    for call in (service.stub.CreateSegment, service.stub.Estimate):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(request if call == service.stub.CreateSegment else pb.EstimateRequest(definition=definition))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        [(named, description)] = violations(caught.value)
        assert named.startswith(field) and f"at most {MAX_DEPTH}" in description
    assert list((await service.stub.ListSegments(pb.ListSegmentsRequest())).segments) == []
    assert service.engine.segments == {}


async def test_a_tree_larger_than_the_limit_is_refused_naming_it(service):
    huge = {"field": "traits.country", "op": "in", "value": [f"c{i:06d}" for i in range(MAX_TEXT // 8)]}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.stub.CreateSegment(pb.CreateSegmentRequest(id="huge", definition=tree(huge)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [(named, description)] = violations(caught.value)
    assert named == "definition.tree" and f"at most {MAX_TEXT}" in description


async def test_one_stored_segment_that_cannot_be_sent_never_breaks_the_listing(service, caplog):
    await service.create("fine", "scores.x > 1")
    # As stored before the limit: 40 nested `not`s, more than protobuf decodes as Segment.tree.
    deep: dict = {"field": "traits.x", "op": "exists"}
    for _ in range(40):
        deep = {"not": deep}
    record = await service.engine.store.get(SEGMENTS, "fine")
    await service.engine.store.put(SEGMENTS, "bad", {**record.doc, "tree": json_format.json.dumps(deep)})
    await service.engine.reload('{"segment": "bad"}')
    assert "bad" in service.engine.segments

    listed = await service.stub.ListSegments(pb.ListSegmentsRequest())
    assert [s.id for s in listed.segments] == ["fine"]
    assert any(getattr(r, "segment", None) == "bad" for r in caplog.records if r.levelname == "ERROR")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.stub.GetSegment(pb.GetSegmentRequest(id="bad"))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "delete it" in caught.value.details()
    await service.stub.DeleteSegment(pb.DeleteSegmentRequest(id="bad"))
    assert [s.id for s in (await service.stub.ListSegments(pb.ListSegmentsRequest())).segments] == ["fine"]
    assert await service.engine.store.get(SEGMENTS, "bad") is None


def performed_each(events: int) -> str:
    return " or ".join(f'performed("Event {i}", within 30d)' for i in range(events))


async def test_a_definition_needing_more_computed_traits_than_the_cap_is_refused_before_any_is_defined(
    service, profile
):
    limit = service.engine.max_computed_traits
    assert limit == 20
    for call, request in (
        (service.stub.CreateSegment, pb.CreateSegmentRequest(id="many", definition=text(performed_each(limit + 1)))),
        (service.stub.Estimate, pb.EstimateRequest(definition=text(performed_each(limit + 1)))),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        [(named, description)] = violations(caught.value)
        assert named == "definition"
        assert f"at most {limit}" in description and "CDP_SEGMENTATION_MAX_COMPUTED_TRAITS" in description
    assert profile.defined == []
    assert (await service.create("enough", performed_each(limit))).state == LIVE
    assert len(profile.held) == limit


async def test_no_computed_trait_is_left_on_profile_by_deletes_failed_creates_refusals_or_estimates(service, profile):
    await service.feed(change("p1"), change("p2"))
    await service.create("buyers", BUYERS)
    await service.create("buyers_pro", f'{BUYERS} and performed("Login", within 7d)')
    await service.stub.Estimate(pb.EstimateRequest(definition=text('performed("Signup") and ' + BUYERS)))
    shared = {d["name"] for d in profile.defined if d["event_names"] == ["Order Completed"]}
    assert set(profile.held) == shared | {d["name"] for d in profile.defined if d["event_names"] == ["Login"]}

    # A create the profile service refuses part-way (its capacity reached after the first new trait): it
    # fails, and the trait it did define goes again; so does a refused and then a failed estimate.
    profile.capacity = len(profile.held) + 1
    failed = await service.create("wide", performed_each(3))
    assert failed.state == pb.SEGMENT_STATE_FAILED and "no more computed traits" in failed.error
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.stub.Estimate(pb.EstimateRequest(definition=text(performed_each(4))))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.aio.AioRpcError):
        await service.create("too_many", performed_each(50))
    profile.refuse.add("Refused")
    refused = await service.create("refused", 'performed("Refused") or performed("Fine")')
    assert refused.state == pb.SEGMENT_STATE_FAILED
    assert len(profile.held) == 2  # only what buyers and buyers_pro read

    for segment_id in ("buyers_pro", "buyers", "wide", "refused"):
        await service.stub.DeleteSegment(pb.DeleteSegmentRequest(id=segment_id))
    assert profile.held == {}
    assert {d["name"] for d in profile.defined} >= {"seg_" + n[4:] for n in shared}  # they did exist


async def test_the_values_held_for_a_deleted_computed_trait_are_forgotten(service, profile):
    await service.feed(change("p1"), change("p2"))
    estimate = await service.stub.Estimate(pb.EstimateRequest(definition=text(BUYERS)))
    assert list(estimate.computed_traits) and profile.held == {}  # the estimate leaves nothing behind
    [name] = estimate.computed_traits
    await service.create("buyers", BUYERS)
    await service.feed(change("p2", computed={name: 3}))
    membership = await service.stub.GetMembership(pb.GetMembershipRequest(person_id="p2"))
    assert [m.segment_id for m in membership.segments] == ["buyers"]
    await service.stub.DeleteSegment(pb.DeleteSegmentRequest(id="buyers"))
    # The profile service publishes nothing when it deletes a trait: defined again later, it must not be
    # read with a count from before (a person it counts 0 for then would keep 3).
    assert profile.held == {}
    assert "computed." + name not in service.engine.persons["p2"].fields
    again = await service.stub.Estimate(pb.EstimateRequest(definition=text(BUYERS)))
    assert again.size == 0


@pytest.mark.parametrize("number", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("call", ["CreateSegment", "Estimate"])
async def test_a_tree_holding_a_number_json_cannot_write_names_the_tree(service, call, number):
    """What the fuzz found: a Struct may carry NaN or an infinity, which JSON cannot; the tree was refused
    as INTERNAL (the JSON conversion failed) instead of naming the field."""
    definition = pb.Definition()
    definition.tree.update({"field": "scores.churn", "op": ">=", "value": 0.5})
    definition.tree.fields["value"].number_value = number
    request = (
        pb.CreateSegmentRequest(id="odd", definition=definition)
        if call == "CreateSegment"
        else pb.EstimateRequest(definition=definition)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(service.stub, call)(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [(field, description)] = violations(caught.value)
    assert field == "definition.tree"
    assert "finite" in description
