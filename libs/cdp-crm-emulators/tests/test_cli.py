"""`python -m cdp_crm_emulators <crm> --port N` serves that CRM until SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import aiohttp
import pytest

from cdp_crm_emulators import EMULATORS


@pytest.mark.parametrize("crm", sorted(EMULATORS))
async def test_command_line_serves_the_crm_and_stops_on_sigterm(crm, tmp_path):
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cdp_crm_emulators",
        crm,
        "--port",
        "0",
        "--snapshot",
        str(tmp_path / "state.json"),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        line = json.loads(await asyncio.wait_for(process.stdout.readline(), 20))
        assert line["msg"] == f"{crm} listening on {line['url']}"
        assert line["url"].startswith("http://127.0.0.1:")
        url = line["url"]
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/_emulator/budget") as response:
                assert response.status == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
    assert (tmp_path / "state.json").exists()


async def test_command_line_options_reach_the_emulator():
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cdp_crm_emulators",
        "hubspot",
        "--set",
        "burst_limit=7",
        "--set",
        "webhook_url=http://127.0.0.1:9/hooks",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        url = json.loads(await asyncio.wait_for(process.stdout.readline(), 20))["url"]
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/_emulator/budget") as response:
                assert (await response.json())["burst_limit"] == 7
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
