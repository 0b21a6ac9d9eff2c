"""A stop of the connector ends within its shutdown grace while a CRM answers 503 or 429 to everything:
the batch being written ends its retries between attempts (delivery.py `Deliverer.stop`), and the engine's
drain with it - instead of the batch retrying for up to CDP_CRM_RETRY_FOR (the connection held only after
`PATIENCE` of failures, a 429's wait for HubSpot's ten-second window sat out whole) while the stop gave up
on the engine task, left running as the store and the bus closed under it.

What was not written is not lost: it is queued (`crm_pending`, committed with the checkpoint) or not
acknowledged, and the next start, the CRM healthy, writes each person's record once."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

import cdp_crm.__main__ as crm_main
from cdp_crm.settings import CrmSettings
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_kit.service import serving
from cdp_testing.crm import hubspot_document

from .conftest import TOKEN

GRACE = 1.0
PERSONS = [f"stop-person-{i}" for i in range(6)]


def settings_for(nats_url: str, tmp_path, emulator: HubSpotEmulator, grace: float = GRACE) -> CrmSettings:
    connections = tmp_path / "connections.json"
    connections.write_text(json.dumps(hubspot_document(emulator.base_url)))
    return CrmSettings(
        nats_url=nats_url,
        grpc_host="127.0.0.1",
        grpc_port=0,
        auth_mode="none",
        partitions=2,
        shutdown_grace=grace,
        store_url=f"sqlite:///{tmp_path / 'crm.db'}",
        connections_file=connections,
    )


async def stops_within_the_grace_then_writes_each_once(world, settings, emulator, until_stop, caplog, persons):
    """Start the connector, run `until_stop` (the CRM failing or holding requests as the test set it up),
    then stop it: the stop must end within the grace with no task given up on, and the CRM must have taken
    nothing. A restart with the CRM answering again writes every person, each to one contact."""
    ready = asyncio.Event()

    async def run() -> float:
        async with serving(settings, crm_main.setup):
            await until_stop()
            ready.set()
            started = time.monotonic()  # the stop: from here the context unwinds
        return time.monotonic() - started

    life = asyncio.create_task(run())
    try:
        with caplog.at_level(logging.ERROR):
            await asyncio.wait_for(ready.wait(), 20)
            took = await asyncio.wait_for(asyncio.shield(life), 3 * settings.shutdown_grace + 2.0)
    finally:
        if not life.done():
            life.cancel()
            await asyncio.gather(life, return_exceptions=True)
    stuck = [r.getMessage() for r in caplog.records if "did not stop" in r.getMessage()]
    assert not stuck, f"the stop gave up on a task after {took:.1f}s: {stuck}"
    assert emulator.records("contacts") == []  # nothing was written: the CRM took nothing

    # The next start, the CRM answering again: every person written, each to one contact.
    emulator.faults.clear()
    async with serving(settings, crm_main.setup):

        def written() -> bool:
            return sorted(r["properties"].get("cdp_id") for r in emulator.records("contacts")) == sorted(persons)

        await world.eventually(written)
    contacts = emulator.records("contacts")
    assert len(contacts) == len(persons)
    assert {c["properties"]["cdp_id"]: c["properties"]["email"] for c in contacts} == {
        p: f"{p}@example.com" for p in persons
    }


@pytest.mark.parametrize("status", [503, 429])
async def test_a_stop_while_the_crm_fails_every_write_ends_within_the_grace_and_loses_nothing(
    nats_server, tmp_path, monkeypatch, caplog, world_factory, status
):
    monkeypatch.setenv("HUBSPOT_TOKEN", TOKEN)
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)  # publishes what profile would; the service does the rest
        settings = settings_for(nats_server.url, tmp_path, emulator)
        emulator.faults.fail_next(100_000, status=status)

        async def until_stop() -> None:
            await world.profiles({p: {"traits.email": f"{p}@example.com"} for p in PERSONS})
            # A write failed: the batch is in its retries when the stop comes.
            await world.eventually(lambda: any(r.faulted and "/batch/upsert" in r.path for r in emulator.requests))

        await stops_within_the_grace_then_writes_each_once(world, settings, emulator, until_stop, caplog, PERSONS)
