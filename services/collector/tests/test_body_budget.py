"""Very large bodies, many at once: the bytes of request bodies the collector receives at once are bounded
(each body counts its announced length, one of unannounced length the most one can be). A request that
would go over is answered 503 `busy` with Retry-After before its body is read, while smaller ones that fit
are served, and the budget is whole again once the bodies being received end. Without it, clients
trickling near-limit bodies held half a megabyte each for the body timeout: a thousand of them, the
collector's memory limit. Real sockets; nothing asserted on timing but "not hung"."""

from __future__ import annotations

import asyncio
import base64

from cdp_collector.__main__ import setup
from cdp_collector.connections import ConnectionLimits
from cdp_kit.service import serving
from cdp_testing.metrics import MetricsCapture

from .conftest import WRITE_KEY, collector_settings
from .test_connection_caps import GIVE_UP, batch_request, capped, connect, parse

BODY = 400_000  # announced by each trickling client: within the 500 KB limit


def head(length: int, *, chunked: bool = False) -> bytes:
    auth = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    size = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}"
    return (
        "POST /v1/batch HTTP/1.1\r\nHost: collector\r\nContent-Type: application/json\r\n"
        f"Authorization: Basic {auth}\r\n{size}\r\n\r\n"
    ).encode()


def large_body(n: int) -> bytes:
    """A valid batch of one event, padded with whitespace to exactly BODY bytes."""
    event = b'{"type":"track","event":"E","userId":"u","messageId":"large-%d"}' % n
    start, end = b'{"batch": [' + event, b"]}"
    return start + b" " * (BODY - len(start) - len(end)) + end


async def next_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], dict]:
    """The next answer on the connection: (status, headers, JSON body)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), GIVE_UP)
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    return parse(head + await asyncio.wait_for(reader.readexactly(length), GIVE_UP))


async def until(condition, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + GIVE_UP
    while not condition():
        assert loop.time() < deadline, what
        await asyncio.sleep(0.05)


async def test_bodies_past_the_budget_are_answered_busy_before_they_are_read(nats_server, tmp_path):
    async with capped(nats_server, tmp_path, ConnectionLimits(max_connections=50), body_budget=1_000_000) as c:

        def receiving() -> int:
            points = c.captured.collected().get("cdp.collector.http.body_reserved", ("", []))[1]
            return sum(p.value for p in points)

        def busy() -> int:
            points = c.captured.collected().get("cdp.collector.http.busy", ("", []))[1]
            return sum(p.value for p in points)

        # Two clients send all of a large body but its last bytes, and hold: 800,000 of 1,000,000 taken.
        tricklers = []
        for n in range(2):
            reader, writer = await connect(c.port)
            writer.write(head(BODY) + large_body(n)[:-2])
            tricklers.append((reader, writer, large_body(n)[-2:]))
        await until(lambda: receiving() == 2 * BODY, "the two bodies were never being received")
        # A third large body does not fit: refused before it is read, told when to come back.
        reader, writer = await connect(c.port)
        writer.write(head(BODY))
        status, headers, answer = await next_answer(reader)
        writer.close()
        assert status == 503 and headers["retry-after"] == "5" and answer["code"] == "busy"
        assert "CDP_COLLECTOR_HTTP_BODY_BUDGET_BYTES" in answer["message"]
        # So does one of unannounced length (chunked: it may be as long as the limit allows).
        reader, writer = await connect(c.port)
        writer.write(head(0, chunked=True))
        status, _, answer = await next_answer(reader)
        writer.close()
        assert status == 503 and answer["code"] == "busy"
        assert busy() == 2
        # A small request fits in what is left: served meanwhile.
        reader, writer = await connect(c.port)
        writer.write(batch_request("small"))
        status, _, answer = await next_answer(reader)
        writer.close()
        assert status == 200 and answer["accepted"] == 1
        # The tricklers finish: their events are stored and the budget is whole again.
        for reader, writer, rest in tricklers:
            writer.write(rest)
            status, _, answer = await next_answer(reader)
            assert status == 200 and answer["accepted"] == 1
            writer.close()
        await until(lambda: receiving() == 0, "the budget was not given back")
        reader, writer = await connect(c.port)
        writer.write(head(BODY) + large_body(9))
        status, _, _ = await next_answer(reader)
        writer.close()
        assert status == 200
        await c.collector.stored(expected=4)


async def test_the_budget_is_the_setting(nats_server, tmp_path):
    captured = MetricsCapture("collector")
    settings = collector_settings(nats_server.url, tmp_path, http_body_budget_bytes=600_000)
    async with serving(settings, setup, telemetry=captured.telemetry) as runtime:
        port = runtime.ports["http"]
        _, holder = await connect(port)
        holder.write(head(BODY) + large_body(0)[:1000])  # 400,000 of 600,000 taken

        def receiving() -> int:
            points = captured.collected().get("cdp.collector.http.body_reserved", ("", []))[1]
            return sum(p.value for p in points)

        await until(lambda: receiving() == BODY, "the body was never being received")
        reader, writer = await connect(port)
        writer.write(head(BODY))
        status, _, answer = await next_answer(reader)
        assert status == 503 and answer["code"] == "busy" and "(600000 bytes)" in answer["message"]
        holder.close()
        writer.close()
