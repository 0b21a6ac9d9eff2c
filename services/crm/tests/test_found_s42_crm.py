"""Defects found in session 42 (CRM connector), each a test that failed before its fix."""

from __future__ import annotations

import copy
import dataclasses
import time
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from cdp_crm.budgets import SharedBudget
from cdp_crm.domain.budget import Budget
from cdp_crm.domain.mapping import MappingInvalid, parse_connections
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_kit.storage import open_store
from cdp_testing.crm import hubspot_document

from .conftest import TOKEN, WRITE_KEY
from .test_stop_while_crm_fails import settings_for, stops_within_the_grace_then_writes_each_once

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

        async def until_stop() -> None:
            # Started: from now every request waits 30 s for a 504 (nothing done).
            emulator.faults.timeout_next(100_000, seconds=30.0)
            await world.profiles({p: {"traits.email": f"{p}@example.com"} for p in PERSONS})
            await world.eventually(lambda: any(r.faulted and waiting in r.path for r in emulator.requests))

        await stops_within_the_grace_then_writes_each_once(world, settings, emulator, until_stop, caplog, PERSONS)


async def test_a_start_under_other_limits_adopts_them_and_keeps_the_days_count(tmp_path):
    """`limits` were read only when the account's budget document was first written: an operator raising them
    (HubSpot Starter to Professional: 100 to 150 a window, 250,000 to 500,000 a day) or lowering them (the
    quota now shared with another integration) changed nothing - GetBudget showed, and the connector kept
    to, the first contract for ever. A start under other limits adopts them, keeping the day's count; what
    the CRM's headers lowered stays lowered while the configured limits are the same."""

    def connection(**limits):
        (only,) = parse_connections(hubspot_document("http://127.0.0.1:1", **limits))
        return only

    async with open_store(f"sqlite:///{tmp_path / 'crm.db'}") as store:
        first = SharedBudget(store, connection(burst=100, window_seconds=10, daily=250_000))
        await first.acquire(1, time.time)
        raised = SharedBudget(store, connection(burst=150, window_seconds=10, daily=500_000))  # a restart
        status = await raised.status(time.time())
        assert (status["burst_limit"], status["daily_limit"], status["daily_used"]) == (150, 500_000, 1)
        await raised.acquire(1, time.time)
        lowered = SharedBudget(store, connection(burst=150, window_seconds=10, daily=1_000))
        assert (await lowered.status(time.time()))["daily_limit"] == 1_000

        # The CRM says the app's allowance is lower than configured: kept across a start with the same limits.
        await lowered.observe({"X-HubSpot-RateLimit-Max": "90", "X-HubSpot-RateLimit-Remaining": "90"}, time.time())
        again = SharedBudget(store, connection(burst=150, window_seconds=10, daily=1_000))
        assert (await again.status(time.time()))["burst_limit"] == 90


def test_two_connections_sharing_an_accounts_budget_under_different_limits_are_refused():
    document = hubspot_document("http://127.0.0.1:1", daily=1_000)
    other = copy.deepcopy(document["connections"][0])
    other.update(id="hs-2", limits={"daily": 2_000})
    document["connections"].append(other)
    with pytest.raises(MappingInvalid) as refused:
        parse_connections(document)
    assert [p.path for p in refused.value.problems] == ["hs-2.limits"]
    other["limits"] = {"daily": 1_000}
    assert len(parse_connections(document)) == 2


LA = ZoneInfo("America/Los_Angeles")


def _la(day: int, hour: int) -> float:
    return datetime(2026, 12, day, hour, tzinfo=LA).timestamp()


def test_a_hubspot_portal_whose_day_ends_at_its_own_midnight_is_counted_in_its_zone():
    """HubSpot resets a portal's daily limit at midnight in the portal's time zone setting (its API usage
    guidelines). Counted in UTC days, a Los Angeles portal refused at 10:00 (DAILY) was held until UTC
    midnight - 16:00 there, before HubSpot's reset: refused again and held until 16:00 the next day (30 h
    for the 14 to HubSpot's reset) - and its count started again at 16:00, with HubSpot's still full.
    `limits.day_zone` names the zone: the wait ends, and the day's count starts, at the portal's midnight."""
    budget = Budget.for_kind("hubspot", account="62515", day_zone="America/Los_Angeles")
    budget.throttled(_la(7, 10), daily=True)
    refused = budget.reserve(1, _la(7, 17))  # 01:00 UTC on the 8th: a UTC day counted it a new day
    assert not refused.granted and refused.wait_until == _la(8, 0)
    assert budget.reserve(1, _la(8, 0)).granted

    counted = Budget.for_kind("hubspot", account="62515", daily=2, day_zone="America/Los_Angeles")
    assert counted.reserve(2, _la(7, 15)).granted
    assert not counted.reserve(1, _la(7, 17)).granted  # the same day there, though another UTC day
    assert counted.reserve(1, _la(8, 0)).granted
    restored = Budget.from_state(counted.to_state())  # a restart keeps the zone
    assert restored.day_zone == "America/Los_Angeles" and restored.status(_la(8, 1))["daily_used"] == 1


async def test_day_zone_is_a_limit_of_the_connection_and_a_start_under_another_adopts_it(tmp_path):
    def connection(**limits):
        (only,) = parse_connections(hubspot_document("http://127.0.0.1:1", **limits))
        return only

    assert connection(day_zone="America/Los_Angeles").limits.day_zone == "America/Los_Angeles"
    for bad in ("Mars/Olympus_Mons", "Europe", "../../etc/passwd", 5):
        with pytest.raises(MappingInvalid) as refused:
            connection(day_zone=bad)
        assert [p.path for p in refused.value.problems] == ["hs.limits.day_zone"]

    async with open_store(f"sqlite:///{tmp_path / 'crm.db'}") as store:
        utc = SharedBudget(store, connection(daily=1_000))
        await utc.throttled(_la(7, 10), retry_after=None, daily=True)
        # Held until UTC midnight: 16:00 in Los Angeles, eight hours before HubSpot's reset.
        assert (await utc.status(_la(7, 11)))["blocked_until"] == datetime(2026, 12, 8, tzinfo=UTC).timestamp()
        zoned = SharedBudget(store, connection(daily=1_000, day_zone="America/Los_Angeles"))  # a restart
        await zoned.throttled(_la(7, 17), retry_after=None, daily=True)  # HubSpot refuses again
        assert (await zoned.status(_la(7, 17)))["blocked_until"] == _la(8, 0)
