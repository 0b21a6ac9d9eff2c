"""A flood of forged webhook requests does not flood the log: the first refusal is one WARNING line, the
rest are counted and said in one line a minute (by connection and reason), and every one is counted in
the metric `cdp.crm.webhooks.refused`."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import aiohttp
from aiohttp import web

from cdp_crm.domain.mapping import parse_connections
from cdp_crm.inbound import HubSpotWebhooks, Poller
from cdp_crm.state import prepare_store
from cdp_kit.storage import open_store
from cdp_testing.crm import hubspot_document
from cdp_testing.metrics import MetricsCapture

FORGED = 40


async def test_forged_webhooks_are_logged_once_then_counted_a_minute_at_a_time(caplog):
    (connection,) = parse_connections(hubspot_document("http://127.0.0.1:9"))
    captured = MetricsCapture("crm")
    async with open_store("memory://") as store:
        await prepare_store(store)
        poller = Poller(store, connection, SimpleNamespace(objects=("contacts",)), None, objects=("contacts",))
        hooks = HubSpotWebhooks({"hs": (poller, "app-secret")}, meter=captured.telemetry.meter)
        refusals = hooks.refusals  # its minute is the default's: the flood is inside it however slow the machine
        runner = web.AppRunner(hooks.app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/webhooks/hubspot/hs"
        caplog.set_level(logging.WARNING, logger="cdp.crm.inbound")
        try:
            async with aiohttp.ClientSession() as session:
                for n in range(FORGED):
                    headers = {
                        "X-HubSpot-Signature-v3": "forged",
                        "X-HubSpot-Request-Timestamp": str(int(time.time() * 1000)),
                    }
                    if n % 4 == 0:
                        headers["X-HubSpot-Request-Timestamp"] = "1"  # stale
                    async with session.post(url, data=b"[]", headers=headers) as response:
                        assert response.status == 401
            lines = [r for r in caplog.records if r.name == "cdp.crm.inbound"]
            assert [r.getMessage() for r in lines] == ["crm webhook refused"]  # one line, not forty
            assert (lines[0].connection, lines[0].reason) == ("hs", "stale")
            # The minute ends: what its timer does then, done now. (A minute shortened to 0.5 s raced the
            # flood: on a loaded machine the forty requests took up to 0.46 s, and one past the end of the
            # minute would have its line said in the middle of them.)
            assert refusals.window is not None
            refusals.window.cancel()
            refusals._flush()
            lines = [r for r in caplog.records if r.name == "cdp.crm.inbound"]
            assert [r.getMessage() for r in lines] == ["crm webhook refused", "crm webhooks refused in the last minute"]
            summary = lines[1]
            assert summary.refused == FORGED - 1
            assert {(b["reason"], b["refused"]) for b in summary.by} == {("stale", 9), ("signature", 30)}
            assert not poller.woken.is_set()
        finally:
            await runner.cleanup()
    _, points = captured.collected()["cdp.crm.webhooks.refused"]
    counted = {p.attributes["reason"]: p.value for p in points}
    assert counted == {"stale": 10, "signature": 30}
    assert all(p.attributes["connection"] == "hs" for p in points)
