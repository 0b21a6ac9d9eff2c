"""The paths Segment's own SDKs post to, with bodies shaped as those SDKs build them. A Segment-migration
trial found analytics.js, analytics-kotlin/-swift and analytics-ruby answered 404 here, and each of them
drops an event answered 4xx: every event of those SDKs was lost.

- analytics.js (analytics-next, plugins/segmentio/index.ts): each call to `https://<apiHost>/<first letter
  of its type>` (apiHost `api.segment.io/v1`), `Content-Type: text/plain`, the write key in the body
  (normalize.ts sets `writeKey`, `sentAt`, `_metadata`, `context.library`); its batching dispatcher
  (batched-dispatcher.ts) posts `{writeKey, batch, sentAt}` to `https://<apiHost>/b`, the items without
  their own sentAt.
- analytics-kotlin (HTTPClient.kt, EventsFileManager.kt) and analytics-swift: `https://<apiHost>/b`, text/plain,
  gzip, chunked, the body `{"batch": [...], "sentAt": ..., "writeKey": ...}`.
- analytics-ruby (defaults.rb, transport.rb): `/v1/import`, application/json, Basic auth with the write key,
  `{sentAt, batch}`.
- analytics.js and the mobile SDKs read their settings from `<cdn>/v1/projects/<writeKey>/settings`; the
  Segment destination sends to `integrations["Segment.io"].apiHost` when the settings give one.
"""

from __future__ import annotations

import gzip
import json
import logging

import aiohttp
import pytest

from cdp.events.v1 import events_pb2
from cdp_collector.__main__ import setup
from cdp_kit.service import serving
from cdp_testing.metrics import MetricsCapture

from .conftest import WRITE_KEY, collector_settings

T = events_pb2
SENT = "2026-12-01T10:00:05.000Z"


def ajs(type_: str, n: int, **fields) -> dict:
    """One call as analytics.js's standard dispatcher sends it (normalize.ts)."""
    return {
        "type": type_,
        "messageId": f"ajs-next-{type_}-{n}",
        "anonymousId": "2d1b5a60-1f0c-4b53-9a8f-0c7f1c3e2a11",
        "userId": None,
        "timestamp": "2026-12-01T10:00:04.120Z",
        "integrations": {},
        "context": {
            "page": {"path": "/pricing", "url": "https://shop.example.com/pricing", "title": "Pricing"},
            "userAgent": "Mozilla/5.0 (X11; Linux x86_64)",
            "locale": "en-GB",
            "library": {"name": "analytics.js", "version": "next-1.81.0"},
        },
        "writeKey": WRITE_KEY,
        "sentAt": SENT,
        "_metadata": {"bundled": ["Segment.io"], "unbundled": [], "bundledIds": []},
        **fields,
    }


ANALYTICS_JS = [
    ("t", ajs("track", 1, event="Plan Viewed", properties={"plan": "pro"}), T.EVENT_TYPE_TRACK),
    ("i", ajs("identify", 2, userId="u-42", traits={"email": "ada@example.com"}), T.EVENT_TYPE_IDENTIFY),
    ("p", ajs("page", 3, name="Pricing", properties={"path": "/pricing"}), T.EVENT_TYPE_PAGE),
    ("s", ajs("screen", 4, name="Cart"), T.EVENT_TYPE_SCREEN),
    ("g", ajs("group", 5, groupId="acme", traits={"plan": "pro"}), T.EVENT_TYPE_GROUP),
    ("a", ajs("alias", 6, userId="u-42", previousId="2d1b5a60-1f0c-4b53-9a8f-0c7f1c3e2a11"), T.EVENT_TYPE_ALIAS),
]


async def send(url: str, path: str, data: bytes, headers: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url + path, data=data, headers=headers) as response:
            return response.status, await response.json()


@pytest.mark.parametrize(("letter", "body", "type_"), ANALYTICS_JS, ids=[c[0] for c in ANALYTICS_JS])
async def test_analytics_js_posts_each_call_to_its_letter(collector, letter, body, type_):
    status, reply = await send(
        collector.http_url, f"/v1/{letter}", json.dumps(body).encode(), {"Content-Type": "text/plain"}
    )
    assert status == 200 and reply == {"success": True, "accepted": 1, "duplicates": 0, "suppressed": 0}
    ((_, event),) = await collector.stored(expected=1)
    assert event.type == type_ and event.message_id == body["messageId"] and event.source_id == "web"


async def test_a_letter_path_refuses_a_call_of_another_type(collector):
    status, reply = await send(
        collector.http_url, "/v1/t", json.dumps(ajs("identify", 9, userId="u")).encode(), {"Content-Type": "text/plain"}
    )
    assert status == 400 and reply["rejected"][0]["code"] == "invalid_event_type"
    await collector.stored(expected=0)


async def test_analytics_js_batching_dispatcher_posts_to_b(collector):
    items = [{k: v for k, v in body.items() if k != "sentAt"} for _, body, _ in ANALYTICS_JS]
    body = {"writeKey": WRITE_KEY, "batch": items, "sentAt": SENT}
    status, reply = await send(collector.http_url, "/v1/b", json.dumps(body).encode(), {"Content-Type": "text/plain"})
    assert status == 200 and reply["accepted"] == 6, reply
    stored = await collector.stored(expected=6)
    # Stream order is per partition (one message per partition a request touches): compare by id.
    assert {e.message_id: e.type for _, e in stored} == {body["messageId"]: t for _, body, t in ANALYTICS_JS}


async def test_the_mobile_sdks_post_a_gzip_file_batch_to_b(collector):
    """analytics-kotlin's batch file, as EventsFileManager writes it, sent gzipped and chunked."""
    events = [
        {
            "type": "track",
            "event": "Cart Viewed",
            "messageId": f"0b3f1c1e-8a3c-4f5e-9e0a-{i:012d}",
            "anonymousId": "c4b1f3c2-6e0a-4d7e-8a36-51b2b8a4f001",
            "timestamp": "2026-12-01T10:00:01.000Z",
            "integrations": {},
            "properties": {"items": i},
            "context": {"library": {"name": "analytics-kotlin", "version": "1.19.1"}, "os": {"name": "Android"}},
        }
        for i in range(3)
    ]
    file = '{"batch":[' + ",".join(json.dumps(e) for e in events) + f'],"sentAt":"{SENT}","writeKey":"{WRITE_KEY}"}}'

    async def chunks():
        data = gzip.compress(file.encode())
        for start in range(0, len(data), 64):
            yield data[start : start + 64]

    async with aiohttp.ClientSession() as session:
        headers = {"Content-Type": "text/plain", "Content-Encoding": "gzip", "User-Agent": "analytics-kotlin/1.19.1"}
        async with session.post(collector.http_url + "/v1/b", data=chunks(), headers=headers) as response:
            assert response.status == 200 and (await response.json())["accepted"] == 3
    await collector.stored(expected=3)


async def test_analytics_ruby_posts_to_import(collector):
    body = {
        "sentAt": SENT,
        "batch": [
            {
                "type": "identify",
                "userId": "u-7",
                "traits": {"plan": "pro"},
                "messageId": "8c5d0c0e-ruby-0001",
                "timestamp": "2026-12-01T10:00:00.000+00:00",
                "context": {"library": {"name": "analytics-ruby", "version": "2.5.0"}},
                "integrations": {},
            }
        ],
    }
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "Authorization": aiohttp.encode_basic_auth(WRITE_KEY, ""),
    }
    status, reply = await send(collector.http_url, "/v1/import", json.dumps(body).encode(), headers)
    assert status == 200 and reply["accepted"] == 1
    ((_, event),) = await collector.stored(expected=1)
    assert event.type == T.EVENT_TYPE_IDENTIFY


async def test_an_alias_path_is_held_by_the_same_limits_and_key(collector):
    status, reply = await send(
        collector.http_url,
        "/v1/t",
        json.dumps({**ajs("track", 1, event="E"), "writeKey": "wk_nobody_0000"}).encode(),
        {"Content-Type": "text/plain"},
    )
    assert status == 401
    big = {"writeKey": WRITE_KEY, "batch": [ajs("track", i, event="E") for i in range(2501)]}
    status, reply = await send(collector.http_url, "/v1/b", json.dumps(big).encode(), {"Content-Type": "text/plain"})
    assert status in (400, 413) and reply["code"] in ("too_many_events", "request_too_large")
    await collector.stored(expected=0)


async def test_each_path_is_timed_under_its_own_route(nats_server, tmp_path, caplog):
    captured = MetricsCapture("collector")
    caplog.set_level(logging.INFO, logger="cdp.collector.http")
    async with serving(collector_settings(nats_server.url, tmp_path), setup, telemetry=captured.telemetry) as runtime:
        url = f"http://127.0.0.1:{runtime.ports['http']}"
        for letter, body, _ in ANALYTICS_JS[:2]:
            status, _ = await send(url, f"/v1/{letter}", json.dumps(body).encode(), {"Content-Type": "text/plain"})
            assert status == 200
        status, _ = await send(url, "/v1/import", b"{}", {"Content-Type": "application/json"})
        assert status == 401
        points = captured.collected()["cdp.collector.http.duration"][1]
        routes = {(p.attributes["route"], p.attributes["status"]): p.count for p in points}
    assert routes == {("/v1/t", "200"): 1, ("/v1/i", "200"): 1, ("/v1/import", "401"): 1}


async def test_the_sdks_settings_send_them_here(collector):
    """GET /v1/projects/<writeKey>/settings: analytics.js (fetchCDNSettings: `${cdnURL}/v1/projects/<key>/settings`)
    and analytics-kotlin (`https://$cdnHost/projects/$writeKey/settings`, cdnHost `cdn-settings.segment.com/v1`)
    read `integrations["Segment.io"]` (`apiKey`, `apiHost`) and send there; an unknown key is 404."""
    host = collector.http_url.removeprefix("http://")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{collector.http_url}/v1/projects/{WRITE_KEY}/settings") as response:
            assert response.status == 200
            settings = await response.json()
        async with session.get(f"{collector.http_url}/v1/projects/wk_nobody_0000/settings") as response:
            assert response.status == 404
        async with session.get(
            f"{collector.http_url}/v1/projects/{WRITE_KEY}/settings",
            headers={"Origin": "https://shop.example.com"},
        ) as response:
            assert response.headers["Access-Control-Allow-Origin"] == "https://shop.example.com"
    segment = settings["integrations"]["Segment.io"]
    assert segment["apiKey"] == WRITE_KEY and segment["apiHost"] == f"{host}/v1" and segment["protocol"] == "http"
    # Where analytics.js then posts a track call, and analytics-kotlin its batch:
    for path in (f"{segment['protocol']}://{segment['apiHost']}/t", f"http://{segment['apiHost']}/b"):
        body = (
            ajs("track", 1, event="E")
            if path.endswith("/t")
            else {"writeKey": WRITE_KEY, "batch": [ajs("track", 2, event="E")]}
        )
        async with aiohttp.ClientSession() as session:
            async with session.post(path, data=json.dumps(body), headers={"Content-Type": "text/plain"}) as response:
                assert response.status == 200
    await collector.stored(expected=2)
