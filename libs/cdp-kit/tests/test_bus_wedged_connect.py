"""`Bus.connect` against a nats-server that accepts connections and never answers (stopped with SIGSTOP: the
kernel still accepts on its port). It used to wait forever whatever its `connect_timeout` (an on-call trial
gave it 3 s and was still waiting at 120 s), so a service started beside a wedged nats-server never failed
its start; now it ends at `connect_timeout` with an error naming the server (without its password) and why.
A server that is down (connection refused) ends the same way: nats.py retried that forever too."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from cdp_kit.bus import Bus
from cdp_kit.errors import Unavailable
from cdp_kit.natsserver import free_port

INFO = (
    b'INFO {"server_id":"wedged","version":"2.10.0","proto":1,"host":"127.0.0.1","port":4222,'
    b'"max_payload":1048576,"headers":true}\r\n'
)


@pytest.fixture(params=["silent", "after INFO"])
async def wedged(request) -> AsyncIterator[str]:
    """A port that accepts TCP connections and then says nothing ("silent": what a SIGSTOPped nats-server
    looks like), or sends its INFO line and never answers CONNECT and PING ("after INFO")."""
    async with _never_answering(request.param == "after INFO") as url:
        yield url


@contextlib.asynccontextmanager
async def _never_answering(info: bool = False) -> AsyncIterator[str]:
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        if info:
            writer.write(INFO)
            await writer.drain()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield f"nats://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for writer in held:
            writer.close()
        await asyncio.gather(*(writer.wait_closed() for writer in held), return_exceptions=True)


async def test_a_nats_server_that_never_answers_ends_the_connect_at_its_timeout_naming_the_server(wedged):
    address = wedged.removeprefix("nats://")
    url = f"nats://collector:s3cret-word@{address}"
    with pytest.raises(Unavailable) as raised:
        # A hang guard only (the bound under test is connect_timeout), not a speed goal.
        await asyncio.wait_for(_connect(url, connect_timeout=3), timeout=60)
    message = str(raised.value)
    assert f"cannot connect to NATS at nats://{address} (CDP_NATS_URL)" in message
    assert "s3cret-word" not in message
    # Why, even when nats.py's exception has no text (asyncio's TimeoutError): never "...(CDP_NATS_URL): ".
    assert not message.rstrip().endswith(":")
    assert "TimeoutError" in message or "not answering" in message


async def test_the_timeout_is_overall_with_several_servers_in_the_url(wedged):
    async with _never_answering() as second:
        with pytest.raises(Unavailable) as raised:
            await asyncio.wait_for(_connect(f"{wedged},{second}", connect_timeout=3), timeout=60)
        assert wedged in str(raised.value) and second in str(raised.value)


async def test_a_nats_server_that_is_down_ends_the_connect_at_its_timeout_too():
    # Connection refused: nats.py retries it forever as well, so this waited forever too.
    url = f"nats://127.0.0.1:{free_port()}"
    with pytest.raises(Unavailable) as raised:
        await asyncio.wait_for(_connect(url, connect_timeout=2), timeout=60)
    assert f"cannot connect to NATS at {url} (CDP_NATS_URL): " in str(raised.value)
    assert "Connect call failed" in str(raised.value) or "refused" in str(raised.value).lower()


async def _connect(url: str, connect_timeout: float) -> None:
    async with Bus.connect(url, name="test", connect_timeout=connect_timeout):
        raise AssertionError("connected to a server that never answers")
