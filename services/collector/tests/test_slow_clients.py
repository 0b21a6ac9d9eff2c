"""Slow HTTP clients are cut off: a connection trickling its headers is closed, one trickling its body
is answered 408 and closed, with short timeouts set for the test. Raw sockets, as a slowloris would."""

from __future__ import annotations

import asyncio
import base64

import aiohttp
import pytest

from cdp_collector.__main__ import setup
from cdp_kit.service import serving

from .conftest import WRITE_KEY, collector_settings

TIMEOUT = 1.0
GIVE_UP = 10.0  # the trickle stops by itself after this: a test that fails does not hang


@pytest.fixture
async def impatient(nats_server, tmp_path):
    settings = collector_settings(nats_server.url, tmp_path, http_header_timeout=TIMEOUT, http_body_timeout=TIMEOUT)
    async with serving(settings, setup) as runtime:
        yield runtime.ports["http"]


async def trickle(writer: asyncio.StreamWriter, pieces) -> None:
    """Send one piece every 0.2 s until the server closes the connection or GIVE_UP passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + GIVE_UP
    for piece in pieces:
        if loop.time() > deadline:
            return
        try:
            writer.write(piece)
            await writer.drain()
        except (ConnectionError, OSError):
            return
        await asyncio.sleep(0.2)


async def answer_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends before it closes the connection ("" if it closes without a word)."""
    received = b""
    try:
        while chunk := await reader.read(4096):
            received += chunk
    except ConnectionError:
        pass
    return received


def endless(piece: bytes):
    while True:
        yield piece


async def test_a_client_trickling_its_headers_is_disconnected(impatient):
    reader, writer = await asyncio.open_connection("127.0.0.1", impatient)
    writer.write(b"POST /v1/batch HTTP/1.1\r\nHost: collector\r\n")
    sending = asyncio.create_task(trickle(writer, (f"X-Slow-{n}: 1\r\n".encode() for n in range(10_000))))
    received = await asyncio.wait_for(answer_until_closed(reader), GIVE_UP + 5)
    assert not sending.done(), "the client stopped trickling before the server closed the connection"
    assert received == b""  # closed without an answer: no request ever arrived
    sending.cancel()
    writer.close()


async def test_clients_trickling_their_bodies_get_408_and_are_disconnected(impatient):
    auth = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    head = (
        "POST /v1/batch HTTP/1.1\r\nHost: collector\r\nContent-Type: application/json\r\n"
        f"Authorization: Basic {auth}\r\nContent-Length: 100000\r\n\r\n"
    ).encode()

    async def slow_client() -> tuple[bytes, bool]:
        reader, writer = await asyncio.open_connection("127.0.0.1", impatient)
        writer.write(head + b'{"batch": [')
        sending = asyncio.create_task(trickle(writer, endless(b" ")))
        received = await asyncio.wait_for(answer_until_closed(reader), GIVE_UP + 5)
        still_sending = not sending.done()
        sending.cancel()
        writer.close()
        return received, still_sending

    # Eight at once, as in the report that found connections held open for 30 s and more.
    results = await asyncio.gather(*(slow_client() for _ in range(8)))
    for received, still_sending in results:
        assert still_sending, "the client stopped trickling before the server closed the connection"
        status, _, rest = received.partition(b"\r\n")
        assert status == b"HTTP/1.1 408 Request Timeout"
        assert b'"code":"request_timeout"' in rest and b"1 seconds" in rest


async def test_a_prompt_client_on_a_kept_alive_connection_is_served(impatient):
    # The header timeout starts again after every answer: a client that keeps its connection and sends
    # its next request promptly is not cut off, however long the connection has lived in total.
    async with aiohttp.ClientSession(headers={"Authorization": aiohttp.encode_basic_auth(WRITE_KEY, "")}) as session:
        for n in range(4):
            body = {"batch": [{"type": "track", "event": "E", "userId": "u", "messageId": f"k{n}"}]}
            async with session.post(f"http://127.0.0.1:{impatient}/v1/batch", json=body) as response:
                assert response.status == 200
            await asyncio.sleep(TIMEOUT / 2)


@pytest.fixture
async def patient(nats_server, tmp_path):
    """Body timeout far beyond the test's patience: an answer that comes did not come from a timeout."""
    settings = collector_settings(nats_server.url, tmp_path, http_body_timeout=120.0)
    async with serving(settings, setup) as runtime:
        yield runtime.ports["http"]


async def one_answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """(status line, body) of the next answer on the connection, whether or not it is closed after."""
    head = await reader.readuntil(b"\r\n\r\n")
    status, _, fields = head.partition(b"\r\n")
    length = next(
        int(line.split(b":")[1]) for line in fields.split(b"\r\n") if line.lower().startswith(b"content-length:")
    )
    return status, await reader.readexactly(length)


def head_announcing(length: int) -> bytes:
    auth = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    return (
        "POST /v1/batch HTTP/1.1\r\nHost: collector\r\nContent-Type: application/json\r\n"
        f"Authorization: Basic {auth}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


async def test_a_body_that_cannot_fit_the_limit_is_refused_once_the_limit_is_read(patient):
    """A body can be no longer than the 500 KB it may decompress to (gzip never makes JSON longer but by a
    few bytes), so the collector stops reading one as soon as it has read past that, and answers 413 naming
    the limit: each request on the internet-facing port costs it that much memory at most, not many times
    more. A client that goes on sending still reads the answer (the large-bodies fuzz test sends 12 MB)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", patient)
    writer.write(head_announcing(4 * 1024 * 1024) + b'{"batch": [' + b" " * (600 * 1024))  # 4 MB announced
    await writer.drain()
    status, rest = await asyncio.wait_for(one_answer(reader), GIVE_UP)  # the rest is never sent
    writer.close()
    assert status == b"HTTP/1.1 413 Request Entity Too Large"
    assert b'"code":"request_too_large"' in rest and b"512000 bytes (500 KB)" in rest


async def test_an_announced_length_over_the_limit_is_refused_before_the_body_is_read(patient):
    reader, writer = await asyncio.open_connection("127.0.0.1", patient)
    writer.write(head_announcing(2 * 1024 * 1024))  # nothing of the body sent
    await writer.drain()
    status, rest = await asyncio.wait_for(one_answer(reader), GIVE_UP)
    writer.close()
    assert status == b"HTTP/1.1 413 Request Entity Too Large"
    assert b'"code":"request_too_large"' in rest and b"512000 bytes (500 KB)" in rest
