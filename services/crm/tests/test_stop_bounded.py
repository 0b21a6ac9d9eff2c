"""A stop of the connector ends within its grace even when one of its tasks does not: the task is named in
the log and left, instead of the stop waiting for it for ever (the process would never exit)."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest

import cdp_crm.__main__ as crm_main
from cdp_crm.runs import Runs
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_kit.service import serving

from .conftest import TOKEN
from .test_stop_while_crm_fails import settings_for

GRACE = 0.5


class Stubborn:
    """A loop that ignores its cancellation until `release` is set (a task that does not end)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.running = asyncio.Event()

    async def run(self) -> None:
        self.running.set()
        while not self.release.is_set():
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                continue


async def test_a_task_that_does_not_end_does_not_hold_the_connectors_stop(nats_server, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HUBSPOT_TOKEN", TOKEN)
    stubborn = Stubborn()
    monkeypatch.setattr(crm_main.TombstoneSweeper, "run", lambda self: stubborn.run())
    async with HubSpotEmulator() as emulator:
        settings = settings_for(nats_server.url, tmp_path, emulator, grace=GRACE)

        async def run() -> None:
            async with serving(settings, crm_main.setup):
                await stubborn.running.wait()

        life = asyncio.create_task(run())
        try:
            with caplog.at_level(logging.ERROR):
                done, _ = await asyncio.wait({life}, timeout=20.0)
            assert done, "the stop waited for a task that does not end"
            life.result()
            stuck = [r for r in caplog.records if r.name == "cdp.crm" and "did not stop" in r.getMessage()]
            assert stuck and "sweep aged-out tombstones" in stuck[0].getMessage()
        finally:
            stubborn.release.set()
            if not life.done():
                life.cancel()
                await asyncio.gather(life, return_exceptions=True)


async def test_closing_runs_leaves_a_backfill_that_does_not_end_after_the_grace(caplog):
    runs = Runs(SimpleNamespace(store=None), partitions=1, people=SimpleNamespace(name="test"))
    stubborn = Stubborn()
    runs.tasks["backfill-0123"] = asyncio.create_task(stubborn.run(), name="crm backfill backfill-0123")
    await stubborn.running.wait()
    try:
        with caplog.at_level(logging.ERROR):
            await asyncio.wait_for(runs.close(grace=GRACE), 10)
        assert "crm backfill backfill-0123" in caplog.text
    except TimeoutError:
        pytest.fail("closing runs waited for a backfill that does not end")
    finally:
        stubborn.release.set()
        await runs.tasks.pop("backfill-0123")
