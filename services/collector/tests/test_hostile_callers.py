"""The HTTP edge against callers who are not real SDKs: a body sent with a wrong write key is refused
before its events are looked at, a client that goes away mid-body is not an error, and a body or a header
that says two things at once (gzip with something after it, two Content-Encodings) is refused."""

from __future__ import annotations

import asyncio
import gzip
import logging
import socket
import struct
import zlib

import aiohttp
import orjson

from cdp_collector.__main__ import setup
from cdp_kit.service import serving
from cdp_testing.metrics import MetricsCapture

from .conftest import WRITE_KEY, collector_settings


async def post(collector, body: bytes, *, headers: dict | None = None) -> tuple[int, dict]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(collector.http_url + "/v1/batch", data=body, headers=headers or {}) as response,
    ):
        return response.status, await response.json()


def basic(key: str = WRITE_KEY) -> dict:
    return {"Authorization": aiohttp.encode_basic_auth(key, "")}


def bad_item(n: int) -> dict:
    return {"type": "track", "messageId": f"m{n}", "userId": {"not": "a string"}, "timestamp": "yesterday"}


# --- F2: the write key in the body is checked before the events are ---------------------------------------


async def test_a_wrong_write_key_in_the_body_is_401_even_when_the_batch_is_malformed(collector):
    status, reply = await post(collector, b'{"writeKey":"nope","batch":5}')
    assert status == 401 and reply["code"] == "unauthorized" and reply["message"].startswith("unknown write key")


async def test_a_wrong_write_key_in_the_body_is_401_not_a_list_of_the_invalid_events(collector):
    body = orjson.dumps({"writeKey": "nope", "batch": [bad_item(n) for n in range(50)]})
    status, reply = await post(collector, body)
    assert status == 401 and reply["code"] == "unauthorized" and "rejected" not in reply
    await collector.stored(expected=0)


async def test_a_body_without_any_write_key_is_401_before_its_events_are_read(collector):
    status, reply = await post(collector, b'{"batch":{"not":"an array"},"sentAt":"never"}')
    assert status == 401 and reply["message"].startswith("missing write key")


async def test_a_lone_surrogate_with_a_wrong_body_key_is_401_and_with_the_right_key_is_stored(collector):
    # orjson refuses a lone surrogate; the body is still read for its key before the slow, exact decode.
    item = b'{"type":"track","messageId":"s1","userId":"u","event":"half an emoji \\ud83d"}'
    status, _ = await post(collector, b'{"writeKey":"nope","batch":[' + item + b"]}")
    assert status == 401
    status, reply = await post(collector, b'{"writeKey":"' + WRITE_KEY.encode() + b'","batch":[' + item + b"]}")
    assert status == 200 and reply["accepted"] == 1
    ((_, event),) = await collector.stored(expected=1)
    assert event.event == "half an emoji \ufffd"


async def test_the_right_key_in_the_body_still_gets_each_invalid_event_named(collector):
    body = orjson.dumps({"writeKey": WRITE_KEY, "batch": [bad_item(0)]})
    status, reply = await post(collector, body)
    assert status == 400 and reply["code"] == "invalid_events"
    assert reply["rejected"][0]["field"] == "batch[0].userId"
    status, reply = await post(collector, b'{"writeKey":"' + WRITE_KEY.encode() + b'","batch":5}')
    assert status == 400 and reply["error"]["field"] == "batch"


async def test_a_large_integer_is_refused_by_name_whichever_way_the_key_came(collector):
    item = b'{"type":"track","messageId":"b1","userId":"u","event":"E","properties":{"n":12345678901234567890}}'
    for body, headers in (
        (b'{"writeKey":"' + WRITE_KEY.encode() + b'","batch":[' + item + b"]}", {}),
        (b'{"batch":[' + item + b"]}", basic()),
    ):
        status, reply = await post(collector, body, headers=headers)
        assert status == 400 and reply["rejected"][0]["code"] == "integer_out_of_range"


# --- F4: a client that goes away mid-body -------------------------------------------------------------


def head(length: int) -> bytes:
    return (
        "POST /v1/track HTTP/1.1\r\nHost: collector\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def reset_mid_body(port: int) -> None:
    """What a crashed client or a reset flood does: half a body, then a TCP reset (SO_LINGER 0)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head(1000) + b'{"userId": "u"')
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def close_mid_body(port: int) -> None:
    """Half a body, then an orderly close (FIN): the client gave up."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head(1000) + b'{"userId": "u"')
        sock.shutdown(socket.SHUT_WR)


async def test_clients_that_go_away_mid_body_are_counted_not_logged_as_errors(nats_server, tmp_path, caplog):
    captured = MetricsCapture("collector")
    caplog.set_level(logging.DEBUG)
    settings = collector_settings(nats_server.url, tmp_path)
    async with serving(settings, setup, telemetry=captured.telemetry) as runtime:
        port = runtime.ports["http"]
        for _ in range(20):
            reset_mid_body(port)
        for _ in range(5):
            close_mid_body(port)

        def gone() -> dict:
            if captured.reader.get_metrics_data() is None:  # nothing recorded yet
                return {}
            points = captured.collected().get("cdp.collector.http.abandoned", ("", []))[1]
            return {p.attributes["reason"]: p.value for p in points}

        for _ in range(100):
            if sum(gone().values()) >= 25:
                break
            await asyncio.sleep(0.05)
        assert gone() == {"reset": 20, "closed": 5}
        # The collector still serves the next caller.
        async with aiohttp.ClientSession() as session:
            body = {"userId": "u", "event": "E", "messageId": "after"}
            async with session.post(f"http://127.0.0.1:{port}/v1/track", json=body, headers=basic()) as response:
                assert response.status == 200
    serious = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert serious == [], [(r.name, r.getMessage()) for r in serious]
    lines = [r for r in caplog.records if r.name == "cdp.collector.http" and r.levelno == logging.INFO]
    said = [r for r in lines if "went away" in r.getMessage()]
    assert len(said) == 1, "one line, then at most one a minute"  # 25 clients within the minute
    assert said[0].reason in ("reset", "closed")


# --- F10: gzip and Content-Encoding that say two things at once ---------------------------------------


def track_body(n: int = 0) -> bytes:
    return orjson.dumps({"batch": [{"type": "track", "messageId": f"g{n}", "userId": "u", "event": "E"}]})


async def test_data_after_the_gzip_member_is_refused_naming_content_encoding(collector):
    for trailing in (b"garbage", gzip.compress(track_body(1)), b"\x00" * 8):
        status, reply = await post(
            collector, gzip.compress(track_body()) + trailing, headers={**basic(), "Content-Encoding": "gzip"}
        )
        assert status == 400 and reply["code"] == "invalid_gzip" and reply["error"]["field"] == "Content-Encoding"
        assert "after the end" in reply["message"]
    deflated = zlib.compress(track_body())
    status, reply = await post(collector, deflated + b"more", headers={**basic(), "Content-Encoding": "deflate"})
    assert status == 400 and reply["error"]["field"] == "Content-Encoding"
    await collector.stored(expected=0)


async def test_one_gzip_member_is_still_accepted(collector):
    status, reply = await post(collector, gzip.compress(track_body()), headers={**basic(), "Content-Encoding": "gzip"})
    assert status == 200 and reply["accepted"] == 1


async def test_more_than_one_content_encoding_is_refused(collector):
    twice = gzip.compress(gzip.compress(track_body()))
    for headers in (
        [("Content-Encoding", "gzip"), ("Content-Encoding", "gzip")],
        [("Content-Encoding", "gzip"), ("Content-Encoding", "identity")],
        [("Content-Encoding", "gzip, gzip")],
    ):
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                collector.http_url + "/v1/batch", data=twice, headers=[*basic().items(), *headers]
            ) as response,
        ):
            reply = await response.json()
        assert response.status == 415, headers
        assert reply["error"]["field"] == "Content-Encoding" and "one Content-Encoding" in reply["message"]
    await collector.stored(expected=0)


async def test_refused_requests_are_timed_by_status_and_said_once_a_minute(nats_server, tmp_path, caplog):
    """An on-call trial sent a wrong write key (401) and a bad event (400), and saw the 503s of a bus
    outage: no log line said any of them and no metric counted requests by status, so a 5xx rate or a
    misconfigured key could not be alerted on. The line names the status and the error's code, never the
    key or the value."""
    captured = MetricsCapture("collector")
    caplog.set_level(logging.INFO, logger="cdp.collector.http")
    settings = collector_settings(nats_server.url, tmp_path)
    async with serving(settings, setup, telemetry=captured.telemetry) as runtime:
        url = f"http://127.0.0.1:{runtime.ports['http']}"
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                wrong = {"Authorization": aiohttp.encode_basic_auth("wk_not_a_key_1234", "")}
                async with session.post(f"{url}/v1/track", json={"userId": "u"}, headers=wrong) as response:
                    assert response.status == 401
            body = {"userId": "u", "event": "E", "messageId": "ok"}
            async with session.post(f"{url}/v1/track", json=body, headers=basic()) as response:
                assert response.status == 200

        def by_status() -> dict:
            points = captured.collected().get("cdp.collector.http.duration", ("", []))[1]
            return {(p.attributes["route"], p.attributes["status"]): p.count for p in points}

        assert by_status() == {("/v1/track", "401"): 3, ("/v1/track", "200"): 1}
    said = [r for r in caplog.records if r.getMessage() == "http request refused"]
    assert len(said) == 1 and said[0].reason.startswith("401 ") and said[0].route == "/v1/track"
    assert "wk_not_a_key_1234" not in str([r.__dict__ for r in caplog.records])
