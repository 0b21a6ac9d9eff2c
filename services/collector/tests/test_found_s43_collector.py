"""The collector's /readyz says not ready while nats-server has no stream to store its events in.

Found by the on-call helper (stop 43). With EVENTS_RAW gone (deleted by hand, or nats-server restarted on an
empty JetStream store: a lost volume) the collector stays connected and every request is answered 503
("no stream accepts this subject"), but /readyz answered 200 {"bus": "connected"}: JetStream's no-responders
answer was not taken as a refusal to store, as a full disk's or a full stream's is (test_http_api's
test_readiness_follows_a_bus_that_refuses_to_store), so a load balancer kept every replica in service and
nothing told the operator's probe that no event could be stored. It now reads "refusing writes", and ready
again once the stream is back (the provisioner made it again) and the window has passed."""

from __future__ import annotations

import asyncio

import aiohttp
import nats

from cdp_collector import ingest


async def post(collector, path, body):
    headers = {"Authorization": aiohttp.encode_basic_auth(collector.write_key, "")}
    async with aiohttp.ClientSession() as session:
        async with session.post(collector.http_url + path, json=body, headers=headers) as response:
            return response.status, await response.json(), response.headers


def track(i: int) -> dict:
    return {"type": "track", "messageId": f"m{i}", "userId": "u1", "event": "Order Completed"}


async def _readyz(collector) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.get(collector.http_url + "/readyz") as response:
            return response.status, await response.json()


async def test_readiness_follows_a_bus_with_no_stream_for_the_events(collector, nats_server, monkeypatch):
    monkeypatch.setattr(ingest, "REFUSALS_KEEP_UNREADY", 60.0)  # long while the test looks, short after
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        config = (await js.stream_info("EVENTS_RAW")).config
        assert (await post(collector, "/v1/batch", {"batch": [track(1)]}))[0] == 200
        assert await _readyz(collector) == (200, {"ready": True, "bus": "connected"})  # the control

        await js.delete_stream("EVENTS_RAW")
        status, reply, _ = await post(collector, "/v1/batch", {"batch": [track(2)]})
        assert status == 503 and reply["error"]["code"] == "unavailable"
        assert await _readyz(collector) == (503, {"ready": False, "bus": "refusing writes"})

        await js.add_stream(config)  # made again (the provisioner)
        monkeypatch.setattr(ingest, "REFUSALS_KEEP_UNREADY", 0.5)
        await asyncio.sleep(0.6)  # the window has passed since the refusal, without another
        assert await _readyz(collector) == (200, {"ready": True, "bus": "connected"})
        assert (await post(collector, "/v1/batch", {"batch": [track(2)]}))[0] == 200
    finally:
        await nc.close()
