"""`make up` (the whole platform, `cdpctl up`): the connector points the local HubSpot app's webhooks at
itself at start, so a ticket a support agent opens in HubSpot is reported to the connector at once - the
webhook accepted with a valid signature - and comes back as an event on the ticket's profile."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import aiohttp
import pytest

from cdp_testing.platform_run import CDPCTL, RunningPlatform


async def eventually(check, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answer := await check():
            return answer
        await asyncio.sleep(0.5)
    raise AssertionError(f"not within {timeout}s")


@pytest.mark.timeout(240)
async def test_a_ticket_opened_in_hubspot_comes_back_through_its_webhook(tmp_path):
    platform = RunningPlatform(tmp_path)
    await asyncio.to_thread(platform.start)
    try:
        hubspot = platform.companion("crm-hubspot")["urls"]["api"]
        target = f"{platform.service('crm')['http']}/webhooks/hubspot/hubspot"
        async with aiohttp.ClientSession() as session:

            async def registered():
                settings = f"{hubspot}/webhooks/v3/1/settings?hapikey=local-developer-key"
                async with session.get(settings) as response:
                    return response.status == 200 and (await response.json())["targetUrl"] == target

            assert await eventually(registered), "the connector did not point HubSpot's webhooks at itself"

            ticket = {"properties": {"subject": "Cannot log in", "hs_pipeline_stage": "1"}}
            async with session.post(f"{hubspot}/_emulator/user/tickets", json=ticket) as response:
                assert response.status == 201
                ticket_id = (await response.json())["id"]

            async def accepted():
                async with session.get(f"{hubspot}/_emulator/webhooks") as response:
                    return 204 in (await response.json())["statuses"]

            assert await eventually(accepted), "the connector refused or never got the webhook"

        def profile() -> dict | None:
            done = subprocess.run(
                [CDPCTL, "profile", "anonymous_id", f"hubspot:62515:{ticket_id}", "--wait", "5"],
                env=platform.env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            return json.loads(done.stdout) if done.returncode == 0 else None

        async def arrived():
            return await asyncio.to_thread(profile)

        found = await eventually(arrived)
        assert f"anonymous_id:hubspot:62515:{ticket_id}" in found["identifiers"]
    finally:
        await asyncio.to_thread(platform.stop)
