"""Defects found in session 42 (CRM connector), each a test that failed before its fix."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import pytest

import cdp_crm.__main__ as crm_main
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_kit.service import serving

from .conftest import TOKEN, WRITE_KEY
from .test_stop_while_crm_fails import settings_for

GRACE = 1.0
PERSONS = [f"held-person-{i}" for i in range(4)]


@pytest.mark.parametrize("held", ["write", "read first"])
async def test_a_stop_while_a_crm_holds_a_request_unanswered_ends_within_the_grace_and_loses_nothing(
    nats_server, tmp_path, monkeypatch, caplog, world_factory, collector, held
):
    """A CRM request on its way when the stop comes (the CRM holds it unanswered: CDP_CRM_REQUEST_TIMEOUT is
    30 s, the chart's grace 10 s) is cut short as a lost answer and its batch queued for the next owner -
    the batch's upsert itself, or the read of the CRM's news before it (`read_first`, with a collector).
    Before, the partition's drain waited for the request's timeout and the stop gave up on the engine task
    ('task apply crm.in did not stop'), left running while the store and the bus closed: SIGKILLed in a pod."""
    monkeypatch.setenv("HUBSPOT_TOKEN", TOKEN)
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        settings = settings_for(nats_server.url, tmp_path, emulator)
        if held == "read first":
            settings = dataclasses.replace(settings, collector_url=collector.url, collector_write_key=WRITE_KEY)
        waiting = "/batch/upsert" if held == "write" else "/search"
        on_its_way = asyncio.Event()

        async def run() -> float:
            async with serving(settings, crm_main.setup):
                # Started: from now every request waits 30 s for a 504 (nothing done).
                emulator.faults.timeout_next(100_000, seconds=30.0)
                await world.profiles({p: {"traits.email": f"{p}@example.com"} for p in PERSONS})
                await world.eventually(lambda: any(r.faulted and waiting in r.path for r in emulator.requests))
                on_its_way.set()
                started = time.monotonic()  # the stop: from here the context unwinds
            return time.monotonic() - started

        life = asyncio.create_task(run())
        try:
            with caplog.at_level(logging.ERROR):
                await asyncio.wait_for(on_its_way.wait(), 20)
                took = await asyncio.wait_for(asyncio.shield(life), 3 * GRACE + 2.0)
        finally:
            if not life.done():
                life.cancel()
                await asyncio.gather(life, return_exceptions=True)
        stuck = [r.getMessage() for r in caplog.records if "did not stop" in r.getMessage()]
        assert not stuck, f"the stop gave up on a task after {took:.1f}s: {stuck}"
        assert emulator.records("contacts") == []  # the CRM took nothing

        # The next start, the CRM answering again: every person written, each to one contact.
        emulator.faults.clear()
        async with serving(settings, crm_main.setup):

            def written() -> bool:
                return sorted(r["properties"].get("cdp_id") for r in emulator.records("contacts")) == PERSONS

            await world.eventually(written)
        contacts = emulator.records("contacts")
        assert {c["properties"]["cdp_id"]: c["properties"]["email"] for c in contacts} == {
            p: f"{p}@example.com" for p in PERSONS
        }
