"""`python -m cdp_crm_emulators <crm> --port N` serves that CRM until SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import aiohttp
import pytest

from cdp_crm_emulators import EMULATORS
from cdp_testing.waiting import eventually


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


async def _serve(crm: str, snapshot) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cdp_crm_emulators", crm, "--snapshot", str(snapshot), stdout=asyncio.subprocess.PIPE
    )
    return process, json.loads(await asyncio.wait_for(process.stdout.readline(), 20))["url"]


async def _kept(snapshot, email: str) -> bool:
    return snapshot.exists() and email.encode() in snapshot.read_bytes()


async def test_a_record_written_is_kept_when_the_emulator_is_killed(tmp_path):
    # The snapshot was written only on SIGTERM: `kill -9` of a local CRM under `make up` lost every record,
    # while the README says records are kept in .cdp/crm/ (CRM-admin trial, D13).
    snapshot = tmp_path / "hubspot.json"
    process, url = await _serve("hubspot", snapshot)
    headers = {"Authorization": "Bearer pat-local-hubspot"}
    try:
        async with aiohttp.ClientSession() as session:
            body = {"properties": {"email": "ada@example.com", "firstname": "Ada"}}
            async with session.post(url + "/crm/v3/objects/contacts", json=body, headers=headers) as answer:
                assert answer.status == 201
            await eventually(lambda: _kept(snapshot, "ada@example.com"), timeout=20)
    finally:
        process.kill()  # SIGKILL: no handler runs
        await process.wait()
    assert not list(tmp_path.glob("*.tmp"))  # written whole, then renamed

    process, url = await _serve("hubspot", snapshot)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/_emulator/records/contacts") as answer:
                records = await answer.json()
        assert [r["properties"]["email"] for r in records] == ["ada@example.com"]
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
