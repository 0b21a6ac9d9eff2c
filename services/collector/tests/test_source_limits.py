"""Each source's own limits, from the sources file: a source sending faster than its events_per_second is
answered 429 (HTTP, with Retry-After) or RESOURCE_EXHAUSTED (gRPC, with RetryInfo) naming the limit, nothing
of the refused request is stored, its retry is, and the other sources are served meanwhile. A request over
the source's max_batch is refused whole. The file is re-read when it changes: limits set, changed and lifted
without a restart.

A real collector and nats-server, real HTTP and gRPC. The buckets run on the test's clock (the limiter's
`clock`), so no assertion depends on how fast the machine is."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from cdp.collector.v1 import collector_pb2, collector_pb2_grpc
from cdp.events.v1 import events_pb2
from cdp_collector.__main__ import setup
from cdp_kit.service import serving
from cdp_testing.metrics import MetricsCapture

from .conftest import WRITE_KEY, RunningCollector, collector_settings
from .test_sdks import item, sdk_consumer

APP_KEY = "wk_app_public_7f3c1b9e"  # the limited source's key: a browser/mobile key, public by nature
GIVE_UP = 10.0  # seconds: a test that fails does not hang


class Clock:
    """The limiter's clock, moved by the test. Times are sums of powers of two, so refills are exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def write_sources(path: Path, app_limits: dict | None) -> None:
    """Sources `web` (no limits) and `app` (with `app_limits`, if any), written so the collector sees the
    file changed however coarse the file system's clock."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    app = {"id": "app", "name": "Mobile app", "write_key": APP_KEY}
    if app_limits is not None:
        app["limits"] = app_limits
    path.write_text(json.dumps({"sources": [{"id": "web", "name": "Website", "write_key": WRITE_KEY}, app]}))
    if path.stat().st_mtime_ns <= before:
        os.utime(path, ns=(before + 1_000_000, before + 1_000_000))


@dataclass
class Limited:
    collector: RunningCollector
    captured: MetricsCapture
    clock: Clock
    sources: Path

    def limited(self) -> dict[tuple[str, str, str], int]:
        """cdp.collector.source.limited as (source, limit, transport) -> requests refused."""
        points = self.captured.collected().get("cdp.collector.source.limited", ("", []))[1]
        return {(p.attributes["source"], p.attributes["limit"], p.attributes["transport"]): p.value for p in points}

    def limit(self, app_limits: dict | None) -> None:
        write_sources(self.sources, app_limits)

    async def stored_ids(self) -> list[str]:
        return sorted(e.message_id for _, e in await self.collector.stored())


@contextlib.asynccontextmanager
async def limited_collector(nats_server, tmp_path, app_limits: dict | None):
    sources = tmp_path / "limited-sources.json"
    write_sources(sources, app_limits)
    captured = MetricsCapture("collector")
    settings = collector_settings(nats_server.url, tmp_path, sources_file=sources)
    async with serving(settings, setup, telemetry=captured.telemetry) as runtime:
        clock = Clock()
        runtime.parts["limiter"].clock = clock
        yield Limited(RunningCollector(runtime, nats_server.url), captured, clock, sources)


def batch(prefix: str, n: int) -> dict:
    return {
        "batch": [{"type": "track", "event": "E", "userId": f"u{i}", "messageId": f"{prefix}{i}"} for i in range(n)]
    }


async def post(collector, body: dict, key: str | None, path: str = "/v1/batch") -> tuple[int, dict, dict]:
    headers = {"Authorization": aiohttp.encode_basic_auth(key, "")} if key else {}
    async with (
        aiohttp.ClientSession() as session,
        session.post(collector.http_url + path, json=body, headers=headers) as response,
    ):
        return response.status, await response.json(), dict(response.headers)


async def collect(collector, key: str, prefix: str, n: int) -> collector_pb2.CollectResponse:
    events = [
        events_pb2.Event(message_id=f"{prefix}{i}", type=events_pb2.EVENT_TYPE_TRACK, user_id=f"u{i}", event="E")
        for i in range(n)
    ]
    async with grpc.aio.insecure_channel(collector.grpc_address) as channel:
        request = collector_pb2.CollectRequest(write_key=key, events=events)
        return await collector_pb2_grpc.CollectorServiceStub(channel).Collect(request, timeout=GIVE_UP)


async def test_a_source_over_its_rate_gets_429_naming_the_limit_its_retry_is_stored_and_others_are_served(
    nats_server, tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    async with limited_collector(nats_server, tmp_path, {"events_per_second": 8, "burst": 16}) as run:
        collector = run.collector
        status, reply, _ = await post(collector, batch("a", 16), APP_KEY)
        assert (status, reply["accepted"]) == (200, 16)  # the whole burst

        status, reply, headers = await post(collector, batch("b", 4), APP_KEY)
        assert status == 429 and reply["code"] == "source_rate_limited"
        assert headers["Retry-After"] == "1"  # 4 events at 8 a second: half a second, said in whole seconds
        assert reply["limit"] == {"events_per_second": 8, "burst": 16}
        assert "'app'" in reply["message"] and "8 events per second (burst 16)" in reply["message"]
        assert APP_KEY not in json.dumps(reply)
        # The key in the body (Segment's other way to send it) is limited alike.
        status, reply, _ = await post(collector, {**batch("b", 4), "writeKey": APP_KEY}, None)
        assert status == 429 and reply["code"] == "source_rate_limited"

        # Another source is not held up by it.
        status, reply, _ = await post(collector, batch("w", 100), WRITE_KEY)
        assert (status, reply["accepted"]) == (200, 100)
        assert len(await run.stored_ids()) == 116  # nothing of the refused requests

        run.clock.advance(0.5)  # four events' worth
        status, reply, _ = await post(collector, batch("b", 4), APP_KEY)
        assert (status, reply["accepted"]) == (200, 4)
        stored = await run.stored_ids()
        assert len(stored) == 120 and [i for i in stored if i.startswith("b")] == ["b0", "b1", "b2", "b3"]

    assert run.limited() == {("app", "events_per_second", "http"): 2}
    said = [r for r in caplog.records if r.name == "cdp.collector.limits"]
    assert said and said[0].levelno == logging.WARNING and said[0].source == "app"
    assert all(APP_KEY not in r.getMessage() and APP_KEY not in json.dumps(r.__dict__, default=str) for r in said)


async def test_one_bucket_a_source_for_both_front_doors_grpc_gets_resource_exhausted_with_retry_info(
    nats_server, tmp_path
):
    async with limited_collector(nats_server, tmp_path, {"events_per_second": 2, "burst": 3}) as run:
        collector = run.collector
        assert (await post(collector, batch("h", 3), APP_KEY))[0] == 200  # the burst, spent over HTTP
        try:
            await collect(collector, APP_KEY, "g", 1)
            raise AssertionError("a source over its rate was served over gRPC")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "source 'app' is over its limit of 2 events per second (burst 3)" in exc.details()
            assert APP_KEY not in exc.details()
            (retry,) = [d for d in rpc_status.from_call(exc).details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
            info = error_details_pb2.RetryInfo()
            retry.Unpack(info)
            assert info.retry_delay.seconds == 1  # one event at 2 a second, in whole seconds
        assert (await collect(collector, WRITE_KEY, "w", 5)).accepted == 5  # another source meanwhile

        run.clock.advance(0.5)
        assert (await collect(collector, APP_KEY, "g", 1)).accepted == 1
        assert await run.stored_ids() == ["g0", "h0", "h1", "h2", "w0", "w1", "w2", "w3", "w4"]
    assert run.limited() == {("app", "events_per_second", "grpc"): 1}


async def test_a_request_over_its_sources_max_batch_is_refused_whole_naming_the_limit(nats_server, tmp_path):
    async with limited_collector(nats_server, tmp_path, {"max_batch": 3}) as run:
        collector = run.collector
        status, reply, _ = await post(collector, batch("x", 4), APP_KEY)
        assert status == 400 and reply["code"] == "too_many_events" and reply["error"]["field"] == "batch"
        assert "source 'app' may send at most 3 events per request" in reply["message"]
        try:
            await collect(collector, APP_KEY, "y", 4)
            raise AssertionError("a request over the source's max_batch was served over gRPC")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 3 events" in exc.details()
        assert (await post(collector, batch("z", 3), APP_KEY))[1]["accepted"] == 3
        assert (await post(collector, batch("w", 4), WRITE_KEY))[1]["accepted"] == 4  # not another source's limit
        assert await run.stored_ids() == ["w0", "w1", "w2", "w3", "z0", "z1", "z2"]
    assert run.limited() == {("app", "max_batch", "http"): 1, ("app", "max_batch", "grpc"): 1}


async def test_requests_over_max_batch_cost_their_events_so_a_flood_of_them_is_refused_before_being_read(
    nats_server, tmp_path
):
    """What the second security trial found: a 400 for max_batch took no tokens, so a flood of oversized
    requests was read and decoded one after another and never met the cheap refusal before the body."""
    limits = {"events_per_second": 1, "burst": 4, "max_batch": 3}
    async with limited_collector(nats_server, tmp_path, limits) as run:
        collector = run.collector
        status, reply, _ = await post(collector, batch("x", 4), APP_KEY)
        assert status == 400 and reply["code"] == "too_many_events"
        # The 4 events it carried were charged: the bucket is empty, the next request is refused unread.
        status, reply, headers = await post(collector, batch("y", 1), APP_KEY)
        assert status == 429 and reply["code"] == "source_rate_limited", reply
        assert headers["Retry-After"] == "1"  # 1 token short at 1 a second
        for _ in range(5):  # more oversized requests: the debt stops at one burst below empty
            await post(collector, batch("x", 4), APP_KEY)
        run.clock.advance(8.0)  # 4 tokens of debt and 4 to fill again, at 1 a second
        assert (await post(collector, batch("z", 3), APP_KEY))[1]["accepted"] == 3
        assert (await post(collector, batch("w", 4), WRITE_KEY))[1]["accepted"] == 4  # others never held
        assert await run.stored_ids() == ["w0", "w1", "w2", "w3", "z0", "z1", "z2"]


async def test_limits_are_set_changed_and_lifted_by_editing_the_sources_file_without_a_restart(nats_server, tmp_path):
    async with limited_collector(nats_server, tmp_path, None) as run:
        collector = run.collector
        assert (await post(collector, batch("a", 50), APP_KEY))[1]["accepted"] == 50  # no limit: as before

        run.limit({"events_per_second": 1, "burst": 2})
        assert (await post(collector, batch("b", 2), APP_KEY))[0] == 200  # a limit set starts with its burst
        assert (await post(collector, batch("c", 1), APP_KEY))[0] == 429

        # A misspelt limit is refused and the last good file stays in force: the source is not unlimited.
        run.sources.write_text(
            json.dumps({"sources": [{"id": "app", "write_key": APP_KEY, "limits": {"event_per_second": 1000}}]})
        )
        os.utime(run.sources, ns=(1, run.sources.stat().st_mtime_ns + 1_000_000))
        assert (await post(collector, batch("c", 1), APP_KEY))[0] == 429

        run.limit({"events_per_second": 4, "burst": 8})  # raised: what the bucket held is kept, it refills faster
        assert (await post(collector, batch("c", 1), APP_KEY))[0] == 429
        run.clock.advance(2.0)
        assert (await post(collector, batch("d", 8), APP_KEY))[0] == 200

        run.limit(None)  # lifted
        assert (await post(collector, batch("e", 500), APP_KEY))[1]["accepted"] == 500
        assert len(await run.stored_ids()) == 560


async def test_a_batch_larger_than_the_burst_passes_a_full_bucket_and_is_paid_back_before_the_next(
    nats_server, tmp_path
):
    async with limited_collector(nats_server, tmp_path, {"events_per_second": 8, "burst": 4}) as run:
        collector = run.collector
        # 20 events never fit a bucket of 4: from a full bucket they pass, and leave it 16 in debt.
        assert (await post(collector, batch("a", 20), APP_KEY))[1]["accepted"] == 20
        status, _, headers = await post(collector, batch("b", 1), APP_KEY)
        assert status == 429 and headers["Retry-After"] == "3"  # 17 events' worth at 8 a second: 2.125 s
        run.clock.advance(2.0)
        assert (await post(collector, batch("b", 1), APP_KEY))[0] == 429  # the debt paid, no token yet
        run.clock.advance(0.125)
        assert (await post(collector, batch("b", 1), APP_KEY))[0] == 200
        assert len(await run.stored_ids()) == 21


async def test_a_source_over_its_rate_is_answered_before_its_body_is_read(nats_server, tmp_path):
    """A leaked key flooding the collector costs it a header check per request, not a body read and decode."""
    async with limited_collector(nats_server, tmp_path, {"events_per_second": 1, "burst": 1}) as run:
        collector = run.collector
        assert (await post(collector, batch("a", 1), APP_KEY))[0] == 200
        port = collector.runtime.ports["http"]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            auth = base64.b64encode(f"{APP_KEY}:".encode()).decode()
            writer.write(
                (
                    "POST /v1/batch HTTP/1.1\r\nHost: collector\r\nContent-Type: application/json\r\n"
                    f"Authorization: Basic {auth}\r\nContent-Length: 400000\r\n\r\n"
                ).encode()
            )  # and not a byte of the body
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), GIVE_UP)
        finally:
            writer.close()
        assert head.startswith(b"HTTP/1.1 429") and b"Retry-After: 1" in head


async def test_tokens_of_a_request_the_bus_could_not_take_are_given_back(nats_server, tmp_path):
    async with limited_collector(nats_server, tmp_path, {"events_per_second": 1, "burst": 2}) as run:
        collector = run.collector
        publisher = collector.runtime.parts["bus"].publisher
        publisher.queue_wait = 0.1
        publisher._budget.used = publisher._budget.capacity  # the bus saturated: nothing can be stored
        try:
            status, reply, _ = await post(collector, batch("a", 2), APP_KEY)
        finally:
            publisher._budget.used = 0
        assert (status, reply["code"]) == (429, "rate_limited")  # the bus's answer, not the source's
        status, reply, _ = await post(collector, batch("a", 2), APP_KEY)  # the retry, at the same moment
        assert (status, reply["accepted"]) == (200, 2)


async def test_the_sdks_retry_a_source_rate_limit_until_their_batch_is_stored(nats_server, tmp_path, monkeypatch):
    async with limited_collector(nats_server, tmp_path, {"events_per_second": 1, "burst": 1}) as run:
        collector = run.collector
        assert (await post(collector, batch("a", 1), APP_KEY))[0] == 200  # the bucket is empty now
        for sdk in ("segment", "rudderstack"):
            consumer, queue, session, _ = sdk_consumer(sdk, monkeypatch, collector, write_key=APP_KEY, retries=6)
            queue.put(item(0, messageId=f"{sdk}-0"))
            refused_before = sum(run.limited().values())

            def deliver(consumer=consumer) -> bool:
                # Segment hands a rate-limited batch back to its queue for the next upload; RudderStack
                # retries inside.
                return any(consumer.upload() for _ in range(6))

            delivering = asyncio.create_task(asyncio.to_thread(deliver))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + GIVE_UP
            while sum(run.limited().values()) == refused_before:  # until the SDK has been refused once
                assert loop.time() < deadline and not delivering.done(), f"{sdk} was never refused"
                await asyncio.sleep(0.05)
            run.clock.advance(1.0)  # a token again
            assert await asyncio.wait_for(delivering, 30)
            assert session.posts >= 2
        assert await run.stored_ids() == ["a0", "rudderstack-0", "segment-0"]


def test_the_readme_sources_example_is_a_valid_sources_file(tmp_path):
    from cdp_collector.sources import SourceRegistry

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = readme.split("## Sources", 1)[1].split("```json\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "sources.json"
    path.write_text(example)
    registry = SourceRegistry(path)
    entries = json.loads(example)["sources"]
    sources = [registry.authenticate(e["write_key"]) for e in entries if e.get("enabled", True)]
    assert any(s.limits is not None and s.limits.events_per_second for s in sources)
    assert any(s.limits is None for s in sources)
