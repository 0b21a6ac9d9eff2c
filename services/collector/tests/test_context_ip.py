"""context.ip filled from the request for client-side events, as Segment does: its browser and mobile
SDKs never send the device's address (they cannot know it), and Segment's servers fill it in from the
request when the call has none. The trial found every event from analytics.js without an address here."""

from __future__ import annotations

import contextlib
import json
import logging

import aiohttp
from multidict import CIMultiDict

from cdp_collector.__main__ import setup
from cdp_kit.service import serving

from .conftest import WRITE_KEY, RunningCollector, collector_settings


def ajs_track(n: int, **context) -> dict:
    return {
        "type": "track",
        "event": "Plan Viewed",
        "messageId": f"ajs-next-{n}",
        "anonymousId": "a-1",
        "writeKey": WRITE_KEY,
        "context": {"library": {"name": "analytics.js", "version": "next-1.81.0"}, **context},
    }


async def send(url: str, path: str, body: dict, headers: dict | None = None) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            url + path, data=json.dumps(body), headers={"Content-Type": "text/plain", **(headers or {})}
        ) as response:
            return response.status


@contextlib.asynccontextmanager
async def running(nats_server, tmp_path, **overrides):
    async with serving(collector_settings(nats_server.url, tmp_path, **overrides), setup) as runtime:
        yield RunningCollector(runtime, nats_server.url)


async def test_a_client_side_call_without_an_address_gets_the_requests(collector):
    assert await send(collector.http_url, "/v1/t", ajs_track(1)) == 200
    batch = {"writeKey": WRITE_KEY, "batch": [ajs_track(2), ajs_track(3, ip="198.51.100.4")]}
    assert await send(collector.http_url, "/v1/b", batch) == 200
    stored = [event for _, event in await collector.stored(expected=3)]
    assert [e.context.ip for e in stored] == ["127.0.0.1", "127.0.0.1", "198.51.100.4"]  # a sent one is kept


async def test_a_server_side_call_is_left_as_sent(collector):
    """Server libraries post to /v1/batch, /v1/track … and /v1/import: the request's address is the server's."""
    headers = {"Authorization": aiohttp.encode_basic_auth(WRITE_KEY, "")}
    assert await send(collector.http_url, "/v1/track", ajs_track(1), headers) == 200
    assert await send(collector.http_url, "/v1/import", {"batch": [ajs_track(2)]}, headers) == 200
    stored = [event for _, event in await collector.stored(expected=2)]
    assert [e.context.ip for e in stored] == ["", ""]


async def test_forwarded_for_is_read_only_from_a_trusted_proxy(nats_server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    forwarded = {"X-Forwarded-For": "203.0.113.7, 10.0.0.3"}  # the client, then a proxy of ours
    async with running(nats_server, tmp_path) as collector:
        assert await send(collector.http_url, "/v1/t", ajs_track(1), forwarded) == 200
        ((_, event),) = await collector.stored(expected=1)
        assert event.context.ip == "127.0.0.1"  # anyone can send the header: not believed
    async with running(nats_server, tmp_path, trusted_proxies=("10.0.0.0/8", "127.0.0.1")) as collector:
        assert await send(collector.http_url, "/v1/t", ajs_track(2), forwarded) == 200
        assert await send(collector.http_url, "/v1/t", ajs_track(3), {"X-Forwarded-For": "not an address"}) == 200
        stored = [event for _, event in await collector.stored(expected=3)]
        assert [e.context.ip for e in stored[1:]] == ["203.0.113.7", "127.0.0.1"]
    assert "203.0.113.7" not in str([r.__dict__ for r in caplog.records])  # personal data: never logged


async def test_an_address_the_client_wrote_before_the_proxys_is_not_taken(nats_server, tmp_path):
    """A proxy appends the address it was connected from to the X-Forwarded-For it received (nginx's
    $proxy_add_x_forwarded_for, every cloud load balancer), so the header's first address is whatever the
    client sent. Before, that was stored as the device's address: any browser could give its events any
    context.ip. The client is the last address no trusted proxy wrote, read from the right."""
    async with running(nats_server, tmp_path, trusted_proxies=("10.0.0.0/8", "127.0.0.1")) as collector:
        sent = [
            {"X-Forwarded-For": "198.51.100.66, 203.0.113.7"},  # one proxy: the client wrote the first
            {"X-Forwarded-For": "198.51.100.66, 203.0.113.8, 10.2.0.5"},  # two: a load balancer, an ingress
        ]
        for n, headers in enumerate(sent):
            assert await send(collector.http_url, "/v1/t", ajs_track(n), headers) == 200
        # The header twice (HTTP joins the lines with commas, in order): the client's line comes first.
        twice = CIMultiDict([("X-Forwarded-For", "198.51.100.66"), ("X-Forwarded-For", "203.0.113.9")])
        twice["Content-Type"] = "text/plain"
        async with aiohttp.ClientSession() as session:
            async with session.post(collector.http_url + "/v1/t", data=json.dumps(ajs_track(2)), headers=twice) as r:
                assert r.status == 200
        # Every hop a trusted proxy: the first of them is the nearest to the client there is.
        assert await send(collector.http_url, "/v1/t", ajs_track(3), {"X-Forwarded-For": "10.9.9.9, 10.2.0.5"}) == 200
        stored = [event.context.ip for _, event in await collector.stored(expected=4)]
        assert stored == ["203.0.113.7", "203.0.113.8", "203.0.113.9", "10.9.9.9"]


async def test_the_address_is_not_filled_when_turned_off(nats_server, tmp_path):
    async with running(nats_server, tmp_path, fill_context_ip=False) as collector:
        assert await send(collector.http_url, "/v1/t", ajs_track(1)) == 200
        ((_, event),) = await collector.stored(expected=1)
        assert event.context.ip == ""


async def test_the_sdk_settings_say_https_behind_a_trusted_tls_proxy(nats_server, tmp_path):
    """The settings' protocol is what analytics.js's standard dispatcher posts with: behind a proxy that
    ends TLS the collector sees http; X-Forwarded-Proto says otherwise, believed from a trusted proxy only."""
    url = f"/v1/projects/{WRITE_KEY}/settings"
    for trusted, expected in (((), "http"), (("127.0.0.0/8",), "https")):
        async with running(nats_server, tmp_path, trusted_proxies=trusted) as collector:
            async with aiohttp.ClientSession() as session:
                async with session.get(collector.http_url + url, headers={"X-Forwarded-Proto": "https"}) as response:
                    settings = await response.json()
            assert settings["integrations"]["Segment.io"]["protocol"] == expected
