"""An Estimate (a preview, scope segmentation:read) never holds up the live service. A security trial found
that one Estimate of 64 KiB of field-to-field `contains` clauses blocked the event loop for seconds (health
checks and other callers waited, a second Estimate failed), and that concurrent Estimates with event
conditions each defined computed traits on the profile service without any limit.

Now the evaluation runs in a worker thread (other calls are answered meanwhile), at most
`max_estimates` run at once (more: RESOURCE_EXHAUSTED with a retry hint), the temporary computed traits
of those under way count against `estimate_traits`, and one past `estimate_seconds` is stopped with
RESOURCE_EXHAUSTED naming the budget, leaving nothing on the profile service.

In-process on a real nats-server and the memory store; the profile service is a fake whose `ready` can
be held (`gate`), which holds an Estimate with event conditions where the test wants it. No timing is
asserted: what is asserted is what was answered while an Estimate was held."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from cdp.profile.v1 import profile_pb2
from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from cdp_kit.bus import Bus, profiles_stream, segments_stream, subjects
from cdp_kit.service import ServiceRuntime, serving
from cdp_kit.storage import open_store
from cdp_lang.compiler import CompiledSegment
from cdp_segmentation.api import SCOPES, SegmentationApi
from cdp_segmentation.engine import SegmentationEngine
from cdp_segmentation.settings import SegmentationSettings
from cdp_testing.fakes import Delivery

pb = segmentation_pb2


class Profile:
    """The profile service as the engine sees it: what is held now; `ready` waits for `gate` when set, and
    says which calls wait there (`waiting`)."""

    def __init__(self) -> None:
        self.held: dict[str, dict] = {}
        self.gate: asyncio.Event | None = None
        self.waiting = 0
        self.arrived = asyncio.Event()

    async def define(self, definitions) -> None:
        for definition in definitions:
            self.held[definition["name"]] = dict(definition)

    async def undefine(self, names) -> None:
        for name in names:
            self.held.pop(name, None)

    async def ready(self, names) -> None:
        if self.gate is not None:
            self.waiting += 1
            self.arrived.set()
            try:
                await self.gate.wait()
            finally:
                self.waiting -= 1


class Service:
    def __init__(self, stub, engine: SegmentationEngine) -> None:
        self.stub = stub
        self.engine = engine
        self.seq = 0

    async def feed(self, *persons: tuple[str, dict]) -> None:
        batch = profile_pb2.ProfileChangedBatch()
        for person, traits in persons:
            change = batch.changes.add(person_id=person, cause="event")
            change.at.GetCurrentTime()
            for name, value in traits.items():
                change.traits[name].string_value = value
        self.seq += 1
        await self.engine.handle([Delivery(batch, subjects.profiles_changed(0), self.seq)])


@contextlib.asynccontextmanager
async def running(nats_url: str, profile: Profile, **limits) -> AsyncIterator[Service]:
    settings = SegmentationSettings(
        nats_url=nats_url,
        grpc_host="127.0.0.1",
        grpc_port=0,
        auth_mode="none",
        partitions=1,
        shutdown_grace=1.0,
        store_url="memory://",
    )

    async def setup(runtime: ServiceRuntime) -> None:
        store = await runtime.stack.enter_async_context(open_store(settings.store_url))
        bus = await runtime.stack.enter_async_context(Bus.connect(settings.nats_url, name="estimate-limits-test"))
        await bus.ensure_streams(profiles_stream(), segments_stream())
        engine = SegmentationEngine(
            store,
            bus.publisher,
            partitions=1,
            owned=[0],
            telemetry=runtime.telemetry,
            define_traits=profile.define,
            traits_ready=profile.ready,
            undefine_traits=profile.undefine,
            snapshot_interval=3600,
            timer_resolution=3600,
            **limits,
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

    async with serving(settings, setup) as runtime:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
            yield Service(segmentation_pb2_grpc.SegmentationServiceStub(channel), runtime.parts["engine"])


def performed(*events: str) -> pb.EstimateRequest:
    text = " or ".join(f'performed("{event}", within 30d)' for event in events)
    return pb.EstimateRequest(definition=pb.Definition(text=text))


def retry_after(error: grpc.aio.AioRpcError) -> float | None:
    for detail in rpc_status.from_call(error).details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


async def held_in_ready(profile: Profile, count: int) -> None:
    while profile.waiting < count:
        profile.arrived.clear()
        await profile.arrived.wait()


async def test_other_calls_are_answered_while_an_estimate_evaluates(nats_server, monkeypatch):
    """The evaluation is held (in whichever thread runs it) until the test has had a ListSegments answered.
    Run on the event loop, it would hold the loop: ListSegments could only be answered after the hold gave
    up, which the order of events records."""
    profile = Profile()
    events: list[str] = []
    evaluating = asyncio.Event()
    released = threading.Event()
    loop = asyncio.get_running_loop()
    evaluate = CompiledSegment.evaluate_columns

    def held(self, columns, members=None, now=None):
        events.append("evaluating")
        loop.call_soon_threadsafe(evaluating.set)
        if not released.wait(timeout=15):
            events.append("the hold gave up: nothing was answered meanwhile")
        return evaluate(self, columns, members or {}, now)

    async with running(nats_server.url, profile) as service:
        await service.feed(
            *[(f"p{i:03}", {"bio": f"writes to p{i}@example.com", "email": f"p{i}@example.com"}) for i in range(50)]
        )
        monkeypatch.setattr(CompiledSegment, "evaluate_columns", held)
        text = " or ".join(["traits.bio contains traits.email"] * 200)
        estimate = asyncio.ensure_future(service.stub.Estimate(pb.EstimateRequest(definition=pb.Definition(text=text))))
        await evaluating.wait()
        await service.stub.ListSegments(pb.ListSegmentsRequest())
        events.append("ListSegments answered")
        released.set()
        answer = await estimate
    assert events[:2] == ["evaluating", "ListSegments answered"]
    assert answer.size == 50 and answer.population == 50


async def test_an_estimate_past_the_most_at_once_is_refused_with_a_retry_hint(nats_server):
    profile = Profile()
    profile.gate = asyncio.Event()
    async with running(nats_server.url, profile, max_estimates=2) as service:
        first = asyncio.ensure_future(service.stub.Estimate(performed("A")))
        second = asyncio.ensure_future(service.stub.Estimate(performed("B")))
        await held_in_ready(profile, 2)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await service.stub.Estimate(performed("C"))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "CDP_SEGMENTATION_MAX_ESTIMATES=2" in refused.value.details()
        assert retry_after(refused.value) and retry_after(refused.value) > 0
        # Reads that are not estimates are answered meanwhile.
        await service.stub.ListSegments(pb.ListSegmentsRequest())
        profile.gate.set()
        assert [a.population for a in await asyncio.gather(first, second)] == [0, 0]
        # Once they are done, the next one runs.
        assert (await service.stub.Estimate(performed("C"))).population == 0
        assert profile.held == {}


async def test_temporary_computed_traits_of_estimates_under_way_share_a_budget(nats_server):
    profile = Profile()
    profile.gate = asyncio.Event()
    async with running(nats_server.url, profile, max_estimates=3, estimate_traits=3) as service:
        first = asyncio.ensure_future(service.stub.Estimate(performed("A", "B")))
        await held_in_ready(profile, 1)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await service.stub.Estimate(performed("C", "D"))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "CDP_SEGMENTATION_ESTIMATE_TRAITS" in refused.value.details()
        assert len(profile.held) == 2  # the refused one defined nothing
        # Traits already under way count once: the same conditions and one more fit.
        second = asyncio.ensure_future(service.stub.Estimate(performed("A", "B", "C")))
        await held_in_ready(profile, 2)
        profile.gate.set()
        await asyncio.gather(first, second)
        assert profile.held == {}


async def test_an_estimate_past_its_time_budget_is_stopped_naming_it_and_leaves_nothing_behind(nats_server):
    profile = Profile()
    profile.gate = asyncio.Event()  # never opened: the backfill never ends
    async with running(nats_server.url, profile, estimate_seconds=0.5) as service:
        with pytest.raises(grpc.aio.AioRpcError) as stopped:
            await service.stub.Estimate(performed("A", "B"))
        assert stopped.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "CDP_SEGMENTATION_ESTIMATE_SECONDS=0.5" in stopped.value.details()
        assert profile.held == {}
        assert service.engine._estimating == [] and service.engine._estimates_running == 0
        # The slot is free again.
        profile.gate.set()
        assert (await service.stub.Estimate(performed("A"))).population == 0
