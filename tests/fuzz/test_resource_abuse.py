"""Resource abuse on the whole running platform: slow bodies and headers, very large bodies, many
connections, and definitions built to be expensive. Each costs the platform a bounded amount, and other
callers are served meanwhile: asserted by their requests succeeding while the abuse is under way, never
by timing.

The platform's HTTP timeouts are SLOW seconds here (conftest), so a slow client is cut off quickly.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import socket
import threading
import time
import zlib

import grpc
import pytest

from cdp.orchestration.v1 import orchestration_pb2, orchestration_pb2_grpc
from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from cdp_testing.fuzz import bad_request_fields

from .conftest import SLOW

GIVE_UP = 20.0  # a trickle stops by itself after this: a test that fails does not hang


def http_address(platform) -> tuple[str, int]:
    host, _, port = platform.service("collector")["http"].removeprefix("http://").partition(":")
    return host, int(port)


def auth(platform) -> str:
    return "Basic " + base64.b64encode(f"{platform.write_key}:".encode()).decode()


def head(platform, length: int, extra: str = "") -> bytes:
    return (
        "POST /v1/batch HTTP/1.1\r\nHost: collector\r\nContent-Type: application/json\r\n"
        f"Authorization: {auth(platform)}\r\nContent-Length: {length}\r\n{extra}\r\n"
    ).encode()


async def answer_until_closed(reader: asyncio.StreamReader) -> bytes:
    received = b""
    try:
        while chunk := await reader.read(65536):
            received += chunk
    except ConnectionError:
        pass
    return received


async def trickle(writer: asyncio.StreamWriter, piece: bytes) -> None:
    """One piece every 0.2 s until the server closes the connection or GIVE_UP passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + GIVE_UP
    while loop.time() < deadline:
        try:
            writer.write(piece)
            await writer.drain()
        except (ConnectionError, OSError):
            return
        await asyncio.sleep(0.2)


async def send(platform, body: bytes, extra_headers: str = "") -> tuple[int, dict]:
    """One whole request over a fresh connection: (status, JSON answer)."""
    host, port = http_address(platform)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head(platform, len(body), extra_headers + "Connection: close\r\n") + body)
        await writer.drain()
        raw = await asyncio.wait_for(answer_until_closed(reader), 60)
    finally:
        writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(payload or b"{}")


def valid_batch(tag: str) -> bytes:
    return json.dumps(
        {"batch": [{"type": "track", "userId": f"abuse-{tag}", "event": "Viewed", "messageId": f"abuse-{tag}"}]}
    ).encode()


# --------------------------------------------------------------------------------------------- slow clients


@pytest.mark.timeout(120)
async def test_slow_clients_are_cut_off_while_another_caller_is_served(platform):
    host, port = http_address(platform)

    async def slow_body() -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(head(platform, 100_000) + b'{"batch": [')
        sending = asyncio.create_task(trickle(writer, b" "))
        received = await asyncio.wait_for(answer_until_closed(reader), GIVE_UP + 10)
        cut_off = not sending.done()  # the server closed the connection before the client gave up
        sending.cancel()
        writer.close()
        return received if cut_off else b"(the client gave up first)"

    async def slow_head() -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /v1/batch HTTP/1.1\r\nHost: collector\r\n")
        sending = asyncio.create_task(trickle(writer, b"X-Slow: 1\r\n"))
        received = await asyncio.wait_for(answer_until_closed(reader), GIVE_UP + 10)
        cut_off = not sending.done()
        sending.cancel()
        writer.close()
        return received if cut_off else b"(the client gave up first)"

    slow = [asyncio.create_task(slow_body()) for _ in range(20)] + [asyncio.create_task(slow_head()) for _ in range(20)]
    await asyncio.sleep(0.5)  # the slow ones are connected and trickling
    served = []
    for n in range(5):  # another caller, while they trickle
        served.append(await send(platform, valid_batch(f"slow-{n}")))
    assert all(status == 200 for status, _ in served), served
    assert not all(task.done() for task in slow), "the slow clients should still be trickling"
    answers = await asyncio.gather(*slow)
    for received in answers[:20]:
        assert received.startswith(b"HTTP/1.1 408"), received[:200]
        assert b"did not arrive within" in received
    for received in answers[20:]:
        assert received == b"", received[:200]  # no request ever arrived: closed without an answer


# --------------------------------------------------------------------------------------------- large bodies


@pytest.mark.timeout(120)
async def test_very_large_bodies_get_413_naming_the_limit(platform):
    # Over the 500 KB limit, as sent.
    too_big = json.dumps({"batch": [{"type": "track", "userId": "u", "event": "x" * 1000}] * 600}).encode()
    status, answer = await send(platform, too_big)
    assert status == 413, answer
    assert "512000 bytes" in answer["message"] and "500 KB" in answer["message"], answer

    # Far over it: past what the server reads at all.
    status, answer = await send(platform, b" " * (12 * 1024 * 1024))
    assert status == 413, answer
    assert answer["code"] and answer["message"], answer

    # A gzip bomb: 50 MB of zeros in 50 KB, stopped at the limit.
    bomb = gzip.compress(b"0" * (50 * 1024 * 1024), compresslevel=9)
    status, answer = await send(platform, bomb, "Content-Encoding: gzip\r\n")
    assert status == 413, answer
    assert "after decompression" in answer["message"] and "500 KB" in answer["message"], answer

    # A deflate bomb without its gzip header.
    deflate = zlib.compress(b"{" * (50 * 1024 * 1024), 9)
    status, answer = await send(platform, deflate, "Content-Encoding: deflate\r\n")
    assert status == 413, answer

    # And the service is still there for everyone else.
    status, answer = await send(platform, valid_batch("after-large"))
    assert status == 200, answer


@pytest.mark.timeout(120)
async def test_a_huge_announced_length_is_refused_without_waiting_for_the_body(platform):
    host, port = http_address(platform)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(head(platform, 10**12))  # a terabyte announced, nothing sent
    await writer.drain()
    received = await asyncio.wait_for(answer_until_closed(reader), GIVE_UP)
    writer.close()
    assert received.split(b"\r\n", 1)[0].split()[1] in (b"413", b"408"), received[:300]


# --------------------------------------------------------------------------------------------- many connections


@pytest.mark.timeout(120)
async def test_many_idle_connections_do_not_keep_others_out_and_are_closed(platform):
    host, port = http_address(platform)
    idle = []
    for _ in range(300):
        connection = socket.create_connection((host, port), timeout=10)
        connection.setblocking(False)
        idle.append(connection)
    try:
        status, answer = await send(platform, valid_batch("many"))
        assert status == 200, answer
        channel = grpc.aio.insecure_channel(platform.grpc_address("segmentation"))
        stub = segmentation_pb2_grpc.SegmentationServiceStub(channel)
        await stub.ListSegments(segmentation_pb2.ListSegmentsRequest(), metadata=platform.admin_metadata, timeout=30)
        await channel.close()
        # The server closes connections that never send a request, so they cost nothing for long.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SLOW + GIVE_UP
        open_ = list(idle)
        while open_ and loop.time() < deadline:
            await asyncio.sleep(0.5)
            still = []
            for connection in open_:
                try:
                    if connection.recv(1) == b"":
                        continue  # closed by the server
                except BlockingIOError:
                    still.append(connection)
                except OSError:
                    continue
            open_ = still
        assert not open_, f"{len(open_)} of {len(idle)} idle connections were never closed"
    finally:
        for connection in idle:
            connection.close()


# --------------------------------------------------------------------------------------------- expensive definitions


def expensive_definitions() -> dict[str, str]:
    clauses = [f'traits.a{i % 7} = "{i}"' for i in range(2_500)]
    return {
        "deep not": "not " * 10_000 + "traits.x exists",
        "deep parentheses": "(" * 10_000 + "traits.x exists" + ")" * 10_000,
        "huge in list": "traits.a1 in [" + ", ".join(str(i) for i in range(10_000)) + "]",
        "in list over the limit": "traits.x in [" + ", ".join(str(i) for i in range(100_000)) + "]",
        "long or chain": " or ".join(clauses),
        "long and chain": " and ".join(clauses),
        "regex-like text": 'traits.x contains "(a+)+$" and traits.y starts_with "((((((((((((a*)*)*)*)*)*" '
        'and traits.z = "' + "a" * 30_000 + '!"',
        "many aggregates": " or ".join(
            f'count(event = "E{i}" and properties.p{i} > {i}, within 3650d) >= {i}' for i in range(300)
        ),
        "nested segments": " and ".join(f'in_segment("s{i}")' for i in range(2_000)),
    }


def deep_tree(levels: int) -> dict:
    tree: dict = {"field": "traits.x", "op": "exists"}
    for _ in range(levels):
        tree = {"not": tree}
    return tree


PEOPLE = 300


async def _population(platform) -> int:
    """People with traits.a0, sent through the HTTP API; returns once segmentation holds them all."""
    people = [
        {
            "type": "identify",
            "userId": f"abuse-p{i}",
            "messageId": f"abuse-p{i}",
            "traits": {f"a{k}": i for k in range(7)},
        }
        for i in range(PEOPLE)
    ]
    status, answer = await send(platform, json.dumps({"batch": people}).encode())
    assert status == 200, answer
    channel = grpc.aio.insecure_channel(platform.grpc_address("segmentation"))
    stub = segmentation_pb2_grpc.SegmentationServiceStub(channel)
    request = segmentation_pb2.EstimateRequest(definition=segmentation_pb2.Definition(text="traits.a0 exists"))
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            estimate = await stub.Estimate(request, metadata=platform.admin_metadata, timeout=30)
            if estimate.size >= PEOPLE:
                return estimate.size
            await asyncio.sleep(0.5)
        raise AssertionError(f"segmentation holds {estimate.size} of the {PEOPLE} people sent")
    finally:
        await channel.close()


@pytest.fixture(scope="module")
def population(platform) -> int:
    return asyncio.run(_population(platform))


@pytest.mark.timeout(300)
def test_expensive_definitions_are_refused_or_evaluated_within_limits_while_others_are_served(platform, population):
    address = platform.grpc_address("segmentation")
    metadata = platform.admin_metadata
    stop = threading.Event()
    served: list[int] = []
    probe_errors: list[str] = []

    def other_caller() -> None:
        with grpc.insecure_channel(address) as channel:
            stub = segmentation_pb2_grpc.SegmentationServiceStub(channel)
            while not stop.is_set():
                try:
                    stub.ListSegments(segmentation_pb2.ListSegmentsRequest(), metadata=metadata, timeout=60)
                    served.append(1)
                except grpc.RpcError as exc:
                    probe_errors.append(exc.code().name)
                time.sleep(0.05)

    prober = threading.Thread(target=other_caller, daemon=True)
    prober.start()
    outcomes: dict[str, str] = {}
    try:
        with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]) as channel:
            stub = segmentation_pb2_grpc.SegmentationServiceStub(channel)
            requests = []
            for name, text in expensive_definitions().items():
                requests.append(
                    (name, segmentation_pb2.EstimateRequest(definition=segmentation_pb2.Definition(text=text)))
                )
            for name, levels in (("deep tree", 30), ("tree past the decoder", 200)):
                request = segmentation_pb2.EstimateRequest()
                request.definition.tree.update(deep_tree(levels))  # built in place: copying it would parse it
                requests.append((name, request))
            for name, request in requests:
                before = len(served)
                try:
                    estimate = stub.Estimate(request, metadata=metadata, timeout=120)
                    outcomes[name] = f"estimated: {estimate.size} of {estimate.population}"
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (
                        f"{name}: {exc.code().name} {exc.details()[:300]}"
                    )
                    fields = bad_request_fields(exc)
                    # "request": a body nested past what the protobuf decoder reads at all
                    assert fields and all(f.startswith(("definition", "request")) for f in fields), f"{name}: {fields}"
                    outcomes[name] = f"refused: {exc.details()[:120]}"
                # another caller was answered meanwhile (or at once after: the call may be quick)
                deadline = time.monotonic() + 30
                while len(served) <= before and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert len(served) > before, f"nobody else was served around {name!r}"
    finally:
        stop.set()
        prober.join(70)
    assert not probe_errors, probe_errors
    # The expensive ones that are allowed were evaluated over everyone; nesting past the limit is refused.
    for name in ("long or chain", "huge in list", "regex-like text"):
        assert outcomes[name].startswith("estimated"), outcomes
        assert int(outcomes[name].rpartition(" of ")[2]) >= population, outcomes
    for name in ("deep not", "deep parentheses", "deep tree", "tree past the decoder", "in list over the limit"):
        assert outcomes[name].startswith("refused"), outcomes


@pytest.mark.timeout(120)
def test_a_yaml_bomb_journey_is_answered_at_once_and_others_are_served(platform):
    """A billion laughs: anchors that would expand to 10^9 strings if anything walked the aliases out."""
    parts = ['&a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    parts += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    bomb = "[" + ", ".join(parts) + "]"
    documents = {
        "as the name": f"id: bomb\nversion: 1\nname: {bomb}\nentry: {{api: true}}\nnodes: [{{id: done, type: exit}}]\n",
        "in a template": (
            "id: bomb\nversion: 1\nname: bomb\nentry: {api: true}\nnodes:\n"
            f"  - {{id: send, type: action, channel: email, purpose: Marketing, template: {{subject: {bomb}, body: b}}}}\n"
        ),
        "as the entry": f"id: bomb\nversion: 1\nname: bomb\nentry: {bomb}\nnodes: [{{id: done, type: exit}}]\n",
    }
    with grpc.insecure_channel(platform.grpc_address("orchestration")) as channel:
        stub = orchestration_pb2_grpc.OrchestrationServiceStub(channel)
        for name, text in documents.items():
            definition = orchestration_pb2.JourneyDefinition(yaml=text)
            reply = stub.ValidateJourney(
                orchestration_pb2.ValidateJourneyRequest(definition=definition),
                metadata=platform.admin_metadata,
                timeout=60,
            )
            assert reply.problems, name
            with pytest.raises(grpc.RpcError) as caught:
                stub.CreateJourney(
                    orchestration_pb2.CreateJourneyRequest(definition=definition),
                    metadata=platform.admin_metadata,
                    timeout=60,
                )
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert bad_request_fields(caught.value), name
        stub.ListJourneys(orchestration_pb2.ListJourneysRequest(), metadata=platform.admin_metadata, timeout=30)
