"""Many connections: the HTTP API holds at most so many at once, in all and (when set) per client address.
A connection past a cap is answered at once, unread, with 503 or 429 and Retry-After, counted, and closed,
while the connections within the cap, and callers from other addresses, are served. Real sockets against a
real collector and nats-server; no timing is asserted beyond "not hung" (GIVE_UP)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from dataclasses import dataclass

import aiohttp
import orjson
import pytest

from cdp_collector.__main__ import setup
from cdp_collector.connections import ConnectionLimits, default_max_connections
from cdp_collector.domain import Limits
from cdp_collector.http import HttpApi, start_http
from cdp_collector.settings import CollectorSettings
from cdp_kit.service import open_file_limit, serving
from cdp_kit.settings import SettingsError, load_settings
from cdp_testing.metrics import MetricsCapture

from .conftest import WRITE_KEY, RunningCollector, collector_settings

GIVE_UP = 10.0  # seconds: a test that fails does not hang
ATTACKER = "127.0.0.2"  # another address on the loopback network: one client, the tests' callers another


@dataclass
class Capped:
    port: int
    collector: RunningCollector
    captured: MetricsCapture

    def gauge(self) -> int:
        points = self.captured.collected().get("cdp.collector.http.connections", ("", []))[1]
        return sum(p.value for p in points)

    def refused(self) -> dict[str, int]:
        points = self.captured.collected().get("cdp.collector.http.refused", ("", []))[1]
        return {p.attributes["reason"]: p.value for p in points}

    async def until_open(self, n: int) -> None:
        """Wait (up to GIVE_UP) until the collector has accepted and holds `n` connections."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + GIVE_UP
        while self.gauge() != n:
            assert loop.time() < deadline, f"the collector holds {self.gauge()} connections, not {n}"
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def capped(nats_server, tmp_path, limits: ConnectionLimits, *, header_timeout: float = 60.0, **api_options):
    """A collector (bus, write keys, suppression: the real ones) whose HTTP API has these caps. Its header
    timeout is long unless said: a connection the test holds is not closed under it by that timeout."""
    captured = MetricsCapture("collector")
    settings = collector_settings(nats_server.url, tmp_path, http_header_timeout=header_timeout)
    async with serving(settings, setup, telemetry=captured.telemetry) as runtime:
        parts = runtime.parts
        api = HttpApi(
            parts["sources"],
            parts["ingestor"],
            Limits(
                max_event_bytes=settings.max_event_bytes,
                max_batch_bytes=settings.max_batch_bytes,
                max_batch_events=settings.max_batch_events,
            ),
            parts["suppression"],
            telemetry=runtime.telemetry,
            **api_options,
        )
        api.ready = True
        runner, port = await start_http(
            api, "127.0.0.1", 0, shutdown_grace=1.0, header_timeout=header_timeout, connections=limits
        )
        try:
            yield Capped(port, RunningCollector(runtime, nats_server.url), captured)
        finally:
            await runner.cleanup()
            api.abandoned.close()


def batch_request(message_id: str) -> bytes:
    body = orjson.dumps({"batch": [{"type": "track", "event": "E", "userId": "u", "messageId": message_id}]})
    auth = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    return (
        "POST /v1/batch HTTP/1.1\r\nHost: collector\r\nContent-Type: application/json\r\n"
        f"Authorization: Basic {auth}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def connect(port: int, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends before it closes the connection."""
    received = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(65536):
            received += chunk
    return received


async def one_request(port: int, message_id: str, source: str = "127.0.0.1") -> bytes:
    """A request on a new connection, and all that comes back before the server closes it."""
    reader, writer = await connect(port, source)
    writer.write(batch_request(message_id))
    try:
        return await asyncio.wait_for(until_closed(reader), GIVE_UP)
    finally:
        writer.close()


def parse(answer: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *fields = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (f.partition(":") for f in fields)}
    return int(status_line.split()[1]), headers, orjson.loads(body)


async def post(port: int, message_id: str) -> int:
    """An SDK's request, from the tests' own address, over aiohttp's client."""
    body = {"batch": [{"type": "track", "event": "E", "userId": "u", "messageId": message_id}]}
    headers = {"Authorization": aiohttp.encode_basic_auth(WRITE_KEY, "")}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{port}/v1/batch", json=body, headers=headers) as response,
    ):
        return response.status


async def test_connections_past_the_cap_are_answered_503_at_once_and_counted(nats_server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cdp.collector.http")
    async with capped(nats_server, tmp_path, ConnectionLimits(max_connections=20)) as c:
        held = [await connect(c.port) for _ in range(20)]  # idle: the cap is full
        await c.until_open(20)
        answers = await asyncio.gather(*(one_request(c.port, f"over-{n}") for n in range(30)))
        for answer in answers:
            status, headers, body = parse(answer)
            assert status == 503 and headers["retry-after"] == "5" and headers["connection"] == "close"
            assert body["code"] == "too_many_connections" and "CDP_COLLECTOR_HTTP_MAX_CONNECTIONS" in body["message"]
        assert c.refused() == {"max_connections": 30}
        assert c.gauge() == 20  # the refused ones never took a place
        # A place frees: the next caller is served, and only its event was stored.
        held.pop()[1].close()
        await c.until_open(19)
        assert await post(c.port, "served") == 200
        stored = await c.collector.stored(expected=1)
        assert stored[0][1].message_id == "served"
        for _, writer in held:
            writer.close()
    said = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING, "one line, then at most one a minute"
    assert said[0].reason == "max_connections" and said[0].limit == 20


async def test_one_address_past_its_cap_is_refused_429_while_others_are_served(nats_server, tmp_path):
    async with capped(nats_server, tmp_path, ConnectionLimits(max_connections=50, per_client=5)) as c:
        held = [await connect(c.port, ATTACKER) for _ in range(5)]
        await c.until_open(5)
        answers = await asyncio.gather(*(one_request(c.port, f"flood-{n}", ATTACKER) for n in range(10)))
        for answer in answers:
            status, headers, body = parse(answer)
            assert status == 429 and headers["retry-after"] == "5"
            assert "CDP_COLLECTOR_HTTP_MAX_CONNECTIONS_PER_CLIENT" in body["message"]
        # Meanwhile a caller at another address is served, on several connections at once.
        assert await asyncio.gather(*(post(c.port, f"sdk-{n}") for n in range(5))) == [200] * 5
        assert c.refused() == {"max_connections_per_client": 10}
        await c.collector.stored(expected=5)
        # The flooding address's own connections within its cap are still served.
        reader, writer = held[0]
        writer.write(batch_request("attacker-within-cap"))
        status, _, _ = parse(await asyncio.wait_for(reader.readuntil(b"}"), GIVE_UP))
        assert status == 200
        for _, writer in held:
            writer.close()


async def test_a_refused_connection_that_sends_nothing_is_closed_soon(nats_server, tmp_path):
    # The header timeout is a minute: a close within GIVE_UP comes from the refusal. More refusals at once
    # than are answered (64 for this cap): every one of them is closed all the same.
    async with capped(nats_server, tmp_path, ConnectionLimits(max_connections=1)) as c:
        _, holder = await connect(c.port)
        await c.until_open(1)
        refused = [await connect(c.port) for _ in range(100)]
        received = await asyncio.wait_for(asyncio.gather(*(until_closed(r) for r, _ in refused)), GIVE_UP)
        assert received == [b""] * 100  # closed without an answer: no request ever came
        assert c.refused() == {"max_connections": 100}
        holder.close()
        for _, writer in refused:
            writer.close()


async def test_an_idle_kept_alive_connection_is_closed_after_the_header_timeout(nats_server, tmp_path):
    async with capped(nats_server, tmp_path, ConnectionLimits(max_connections=10), header_timeout=1.0) as c:
        reader, writer = await connect(c.port)
        for n in range(2):  # kept alive between the two
            writer.write(batch_request(f"kept-{n}"))
            status, _, _ = parse(await asyncio.wait_for(reader.readuntil(b"}"), GIVE_UP))
            assert status == 200
        # Then idle: closed by the server, without a word, and its place is free again.
        assert await asyncio.wait_for(until_closed(reader), GIVE_UP) == b""
        await c.until_open(0)
        writer.close()


async def test_the_segment_sdk_waits_out_a_full_collector_and_loses_nothing(nats_server, tmp_path):
    from segment.analytics import Client

    async with capped(nats_server, tmp_path, ConnectionLimits(max_connections=3)) as c:
        held = [await connect(c.port) for _ in range(3)]
        await c.until_open(3)
        errors: list = []
        client = Client(WRITE_KEY, host=f"http://127.0.0.1:{c.port}", on_error=lambda e, _batch: errors.append(e))
        client.track("u-1", "Order Completed", message_id="while-full")
        client.flush_at = 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + GIVE_UP
        while not c.refused():
            assert loop.time() < deadline, "the SDK never tried"
            await asyncio.sleep(0.05)
        for _, writer in held:  # the flood ends
            writer.close()
        await asyncio.wait_for(asyncio.to_thread(client.shutdown), GIVE_UP + 5)
        assert errors == []
        stored = await c.collector.stored(expected=1)
        assert stored[0][1].message_id == "while-full"


def test_the_caps_are_checked_at_start(tmp_path):
    sources = tmp_path / "sources.json"
    sources.write_text('{"sources": []}')
    base = {"CDP_COLLECTOR_SOURCES_FILE": str(sources), "CDP_AUTH_MODE": "none", "CDP_NATS_URL": "nats://nats:4222"}
    files = open_file_limit()
    with pytest.raises(SettingsError) as failed:
        load_settings(CollectorSettings, {**base, "CDP_COLLECTOR_HTTP_MAX_CONNECTIONS": str(files)})
    assert f"CDP_COLLECTOR_HTTP_MAX_CONNECTIONS={files} is invalid" in str(failed.value)
    assert "ulimit -n" in str(failed.value)
    with pytest.raises(SettingsError) as failed:
        load_settings(CollectorSettings, {**base, "CDP_COLLECTOR_HTTP_MAX_CONNECTIONS_PER_CLIENT": "-1"})
    assert "CDP_COLLECTOR_HTTP_MAX_CONNECTIONS_PER_CLIENT=-1 is invalid" in str(failed.value)
    with pytest.raises(SettingsError) as failed:
        load_settings(CollectorSettings, {**base, "CDP_COLLECTOR_HTTP_BODY_BUDGET_BYTES": "100000"})
    assert "CDP_COLLECTOR_HTTP_BODY_BUDGET_BYTES=100000 is invalid: must be at least 521216" in str(failed.value)
    settings = load_settings(CollectorSettings, base)
    assert settings.http_connection_cap() == default_max_connections() == min(files // 2, 10_000)
    assert settings.http_max_connections_per_client == 0


async def test_the_caps_are_the_settings(nats_server, tmp_path):
    captured = MetricsCapture("collector")
    settings = collector_settings(nats_server.url, tmp_path, http_max_connections=2, http_max_connections_per_client=1)
    async with serving(settings, setup, telemetry=captured.telemetry) as runtime:
        c = Capped(runtime.ports["http"], RunningCollector(runtime, nats_server.url), captured)
        _, mine = await connect(c.port)
        await c.until_open(1)
        assert parse(await one_request(c.port, "same-address"))[0] == 429  # one per address
        _, theirs = await connect(c.port, ATTACKER)
        await c.until_open(2)
        assert parse(await one_request(c.port, "third-address", "127.0.0.3"))[0] == 503  # two in all
        assert c.refused() == {"max_connections_per_client": 1, "max_connections": 1}
        mine.close()
        theirs.close()
