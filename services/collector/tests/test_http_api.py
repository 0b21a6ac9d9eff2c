"""The Segment HTTP tracking API against a real nats-server: bad input gets a clear error, nothing
valid is lost, and "200" means stored."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import json
import zlib

import aiohttp
import nats
import pytest
from nats.js.api import DiscardPolicy

from cdp.events.v1 import events_pb2
from cdp_collector import ingest
from cdp_collector.domain import MAX_DEPTH


def basic(key):
    return {"Authorization": aiohttp.encode_basic_auth(key, "")}


async def post(collector, path, body=None, *, data=None, headers=None, key=None, use_auth=True):
    async with aiohttp.ClientSession() as session:
        kwargs = {"headers": {**(basic(key or collector.write_key) if use_auth else {}), **(headers or {})}}
        if data is not None:
            kwargs["data"] = data
        else:
            kwargs["json"] = body
        async with session.post(collector.http_url + path, **kwargs) as response:
            return response.status, await response.json(), response.headers


def track(i=0, **extra):
    return {
        "type": "track",
        "messageId": f"m{i}",
        "userId": "u1",
        "event": "Order Completed",
        "properties": {"total": 10 + i},
        **extra,
    }


@pytest.mark.parametrize(
    ("path", "body", "type_"),
    [
        ("/v1/track", {"userId": "u1", "event": "Signed Up", "messageId": "t1"}, events_pb2.EVENT_TYPE_TRACK),
        (
            "/v1/identify",
            {"userId": "u1", "traits": {"email": "a@b.co"}, "messageId": "i1"},
            events_pb2.EVENT_TYPE_IDENTIFY,
        ),
        ("/v1/alias", {"userId": "u1", "previousId": "anon-1", "messageId": "a1"}, events_pb2.EVENT_TYPE_ALIAS),
        ("/v1/page", {"anonymousId": "anon-1", "name": "Pricing", "messageId": "p1"}, events_pb2.EVENT_TYPE_PAGE),
        ("/v1/screen", {"userId": "u1", "name": "Cart", "messageId": "s1"}, events_pb2.EVENT_TYPE_SCREEN),
        (
            "/v1/group",
            {"userId": "u1", "groupId": "acme", "traits": {"plan": "pro"}, "messageId": "g1"},
            events_pb2.EVENT_TYPE_GROUP,
        ),
    ],
)
async def test_every_single_call_endpoint_stores_its_event(collector, path, body, type_):
    status, reply, _ = await post(collector, path, body)
    assert status == 200 and reply == {"success": True, "accepted": 1, "duplicates": 0, "suppressed": 0}
    ((_, event),) = await collector.stored(expected=1)
    assert event.type == type_ and event.message_id == body["messageId"] and event.source_id == "web"


async def test_batch_with_gzip_body(collector):
    body = {"batch": [track(i) for i in range(100)], "sentAt": "2026-11-25T10:00:00Z"}
    status, reply, _ = await post(
        collector,
        "/v1/batch",
        data=gzip.compress(json.dumps(body).encode()),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert status == 200 and reply["accepted"] == 100
    await collector.stored(expected=100)


@pytest.mark.parametrize("framing", ["zlib", "raw"])
async def test_batch_with_deflate_body_zlib_framed_or_raw(collector, framing):
    """HTTP's deflate is zlib-framed; clients also send the bare deflate stream under that name."""
    data = json.dumps({"batch": [track(i) for i in range(20)]}).encode()
    if framing == "zlib":
        deflated = zlib.compress(data)
    else:
        packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        deflated = packer.compress(data) + packer.flush()
    status, reply, _ = await post(collector, "/v1/batch", data=deflated, headers={"Content-Encoding": "deflate"})
    assert status == 200 and reply["accepted"] == 20, reply
    await collector.stored(expected=20)


async def test_retried_batch_is_deduplicated(collector):
    body = {"batch": [track(i) for i in range(10)]}
    await post(collector, "/v1/batch", body)
    status, reply, _ = await post(collector, "/v1/batch", body)
    assert status == 200 and reply == {"success": True, "accepted": 0, "duplicates": 10, "suppressed": 0}
    await collector.stored(expected=10)


async def test_write_key_in_the_body_is_accepted_without_basic_auth(collector):
    status, reply, _ = await post(
        collector, "/v1/batch", {"batch": [track()], "writeKey": collector.write_key}, use_auth=False
    )
    assert status == 200 and reply["accepted"] == 1


async def test_unknown_or_missing_write_key_is_401(collector):
    status, reply, headers = await post(collector, "/v1/batch", {"batch": [track()]}, key="wk_nobody_000000")
    assert (
        status == 401 and reply["error"]["code"] == "unauthorized" and "unknown write key" in reply["error"]["message"]
    )
    assert headers["WWW-Authenticate"].startswith("Basic")
    status, reply, _ = await post(collector, "/v1/batch", {"batch": [track()]}, use_auth=False)
    assert status == 401 and "write key" in reply["error"]["message"]
    await collector.stored(expected=0)


async def test_malformed_json_is_400_with_position(collector):
    status, reply, _ = await post(
        collector, "/v1/batch", data=b'{"batch": [ {"type": "track",, }]}', headers={"Content-Type": "application/json"}
    )
    assert status == 400 and reply["error"]["code"] == "invalid_json"
    assert "column" in reply["error"]["message"] or "position" in reply["error"]["message"]


async def test_bad_gzip_is_400(collector):
    status, reply, _ = await post(
        collector, "/v1/batch", data=b"\x1f\x8b\x08not really gzip", headers={"Content-Encoding": "gzip"}
    )
    assert status == 400 and reply["error"]["code"] == "invalid_gzip"


async def test_unsupported_encoding_is_415(collector):
    status, reply, _ = await post(collector, "/v1/batch", data=b"xx", headers={"Content-Encoding": "br"})
    assert status == 415 and "Content-Encoding" in reply["error"]["message"]


async def test_wrong_types_name_the_field_and_valid_events_are_still_stored(collector):
    batch = [track(0), {"type": "track", "messageId": "bad", "userId": {"id": 1}, "event": "X"}, track(2)]
    status, reply, _ = await post(collector, "/v1/batch", {"batch": batch})
    assert status == 400 and reply["error"]["code"] == "invalid_events"
    assert reply["accepted"] == 2
    (rejected,) = reply["rejected"]
    assert rejected["index"] == 1 and rejected["field"] == "batch[1].userId" and rejected["messageId"] == "bad"
    stored = await collector.stored(expected=2)
    assert [e.message_id for _, e in stored] == ["m0", "m2"]


async def test_what_no_downstream_store_can_hold_is_refused_per_event_and_the_rest_stored(collector):
    # One NUL in an identifier or a key would make identity's store refuse the whole batch downstream,
    # after this answer said "stored": it is refused here, alone, naming the field.
    batch = [track(i) for i in range(101)]
    batch[3]["userId"] = "u\x001"
    batch[40]["properties"] = {"a\x00": 1}
    batch[77]["properties"] = {"note": "NUL in a value is fine: \x00"}
    status, reply, _ = await post(collector, "/v1/batch", {"batch": batch})
    assert status == 400 and reply["error"]["code"] == "invalid_events" and reply["accepted"] == 99
    assert [(r["index"], r["code"], r["field"]) for r in reply["rejected"]] == [
        (3, "invalid_character", "batch[3].userId"),
        (40, "invalid_character", "batch[40].properties.a\\u0000"),
    ]
    stored = await collector.stored(expected=99)
    assert {e.message_id for _, e in stored} == {f"m{i}" for i in range(101)} - {"m3", "m40"}


async def test_nesting_beyond_the_limit_is_refused_naming_the_path_and_the_limit(collector):
    deep: object = 1
    for _ in range(MAX_DEPTH):
        deep = {"a": deep}
    status, reply, _ = await post(collector, "/v1/batch", {"batch": [track(0, properties=deep), track(1)]})
    assert status == 400 and reply["accepted"] == 1
    (rejected,) = reply["rejected"]
    assert rejected["code"] == "nesting_too_deep"
    assert rejected["field"] == "batch[0].properties" + ".a" * (MAX_DEPTH - 1)
    assert f"deeper than {MAX_DEPTH} levels" in rejected["message"]
    await collector.stored(expected=1)


async def test_an_event_over_32kb_is_rejected_naming_the_limit(collector):
    big = track(1, properties={"blob": "x" * 33_000})
    status, reply, _ = await post(collector, "/v1/batch", {"batch": [track(0), big]})
    assert status == 400
    (rejected,) = reply["rejected"]
    assert rejected["code"] == "event_too_large" and "32768 bytes (32 KB)" in rejected["message"]
    await collector.stored(expected=1)


async def test_a_body_over_500kb_is_413_naming_the_limit(collector):
    batch = [track(i, properties={"pad": "y" * 20_000}) for i in range(30)]
    status, reply, _ = await post(collector, "/v1/batch", {"batch": batch})
    assert status == 413 and reply["error"]["code"] == "request_too_large"
    assert "512000 bytes (500 KB)" in reply["error"]["message"]
    await collector.stored(expected=0)


async def test_a_gzip_bomb_is_stopped_at_the_limit(collector):
    bomb = gzip.compress(b'{"batch": [' + b" " * 50_000_000 + b"]}")
    assert len(bomb) < 100_000
    status, reply, _ = await post(collector, "/v1/batch", data=bomb, headers={"Content-Encoding": "gzip"})
    assert status == 413 and reply["error"]["code"] == "request_too_large"


async def test_more_than_2500_events_is_refused_naming_the_limit(collector):
    batch = [{"type": "track", "userId": "u", "event": "e", "messageId": str(i)} for i in range(2501)]
    status, reply, _ = await post(collector, "/v1/batch", {"batch": batch})
    assert status == 400 and reply["error"]["code"] == "too_many_events" and "2500" in reply["error"]["message"]
    await collector.stored(expected=0)


async def test_unknown_path_and_method_are_json_errors(collector):
    async with aiohttp.ClientSession() as session:
        async with session.post(collector.http_url + "/v1/nope", json={}) as response:
            assert response.status == 404 and (await response.json())["success"] is False
        async with session.get(collector.http_url + "/v1/track") as response:
            assert response.status == 405 and (await response.json())["success"] is False


async def test_health_and_readiness(collector, nats_server):
    async with aiohttp.ClientSession() as session:
        async with session.get(collector.http_url + "/healthz") as response:
            assert response.status == 200
        async with session.get(collector.http_url + "/readyz") as response:
            assert response.status == 200 and (await response.json())["bus"] == "connected"


async def test_bus_down_is_503_with_retry_after(collector, nats_server):
    nats_server.stop()
    status, reply, headers = await post(collector, "/v1/batch", {"batch": [track()]})
    assert status == 503 and reply["error"]["code"] == "unavailable"
    assert int(headers["Retry-After"]) >= 1


async def test_saturated_bus_is_429_with_retry_after(collector):
    # Fill the bound on unacknowledged messages, as a burst of concurrent requests would.
    publisher = collector.runtime.parts["bus"].publisher
    publisher.queue_wait = 0.1
    publisher._budget.used = publisher._budget.capacity
    try:
        status, reply, headers = await post(collector, "/v1/batch", {"batch": [track()]})
    finally:
        publisher._budget.used = 0
    assert status == 429 and reply["error"]["code"] == "rate_limited" and int(headers["Retry-After"]) >= 1
    await collector.stored(expected=0)


def test_every_setting_is_documented_in_the_service_readme():
    from pathlib import Path

    from cdp_collector.settings import CollectorSettings
    from cdp_kit.settings import describe

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [var for var, _default, _help in describe(CollectorSettings) if f"`{var}`" not in readme]
    assert missing == []


async def test_write_keys_rotate_without_a_restart(collector):
    settings = collector.runtime.settings
    assert (await post(collector, "/v1/track", {"userId": "u1", "event": "E", "messageId": "r1"}))[0] == 200
    settings.sources_file.write_text(json.dumps({"sources": [{"id": "web", "write_key": "wk_rotated_00000000"}]}))
    status, _, _ = await post(collector, "/v1/track", {"userId": "u1", "event": "E", "messageId": "r2"})
    assert status == 401
    status, _, _ = await post(
        collector, "/v1/track", {"userId": "u1", "event": "E", "messageId": "r3"}, key="wk_rotated_00000000"
    )
    assert status == 200


async def test_a_browser_on_another_origin_is_let_post_events_and_read_the_answer(collector):
    """Browser SDKs post from the site's origin. RudderStack's JavaScript SDK sends an Authorization header,
    so the browser asks first (OPTIONS, a preflight): answered 405, it never sent the event; and without
    Access-Control-Allow-Origin on the answer, no browser SDK could read it (a security trial's finding)."""
    site = "https://shop.example.com"
    async with aiohttp.ClientSession() as session:
        preflight = {
            "Origin": site,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        }
        async with session.options(collector.http_url + "/v1/batch", headers=preflight) as response:
            assert response.status == 204
            assert response.headers["Access-Control-Allow-Origin"] == site
            assert "POST" in response.headers["Access-Control-Allow-Methods"]
            assert response.headers["Access-Control-Allow-Headers"] == "authorization,content-type"
        async with session.options(collector.http_url + "/v1/nothing", headers=preflight) as response:
            assert response.status == 403  # not an endpoint
    status, reply, headers = await post(collector, "/v1/track", track(), headers={"Origin": site})
    assert status == 200 and reply["accepted"] == 1
    assert headers["Access-Control-Allow-Origin"] == site and headers["Vary"] == "Origin"
    status, _, headers = await post(collector, "/v1/track", track(1), headers={"Origin": site}, key="wk_wrong")
    assert status == 401 and headers["Access-Control-Allow-Origin"] == site  # the SDK can read why
    status, _, headers = await post(collector, "/v1/track", track(2))
    assert status == 200 and "Access-Control-Allow-Origin" not in headers  # no Origin: not a browser


async def test_readiness_follows_a_bus_that_refuses_to_store(collector, nats_server, monkeypatch):
    """A full disk leaves the collector connected while every store is refused: /readyz said ready and
    the load balancer kept sending traffic to a replica that could only answer 503. It now reports not
    ready ("refusing writes") after a refusal, and ready again once the window has passed without one
    (a replica that is not ready gets no traffic, so time is what lets it try again)."""
    # The window is long while the test looks for 'refusing writes' (at 0.5 s, the /readyz after the refusal
    # had half a second to be answered, and a loaded machine can take that), then short for 'ready again'.
    monkeypatch.setattr(ingest, "REFUSALS_KEEP_UNREADY", 60.0)
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        config = (await js.stream_info("EVENTS_RAW")).config
        full = dataclasses.replace(config, max_msgs=1, discard=DiscardPolicy.NEW)
        await js.update_stream(full)
        assert (await post(collector, "/v1/batch", {"batch": [track(1)]}))[0] == 200
        status, reply, _ = await post(collector, "/v1/batch", {"batch": [track(2)]})
        assert status == 503 and reply["error"]["code"] == "unavailable"
        async with aiohttp.ClientSession() as session:
            async with session.get(collector.http_url + "/readyz") as response:
                assert response.status == 503 and (await response.json()) == {"ready": False, "bus": "refusing writes"}
            await js.update_stream(config)  # space again
            monkeypatch.setattr(ingest, "REFUSALS_KEEP_UNREADY", 0.5)
            await asyncio.sleep(0.6)  # the window has passed since the refusal, without another
            async with session.get(collector.http_url + "/readyz") as response:
                assert response.status == 200 and (await response.json())["bus"] == "connected"
        assert (await post(collector, "/v1/batch", {"batch": [track(2)]}))[0] == 200
    finally:
        await nc.close()
