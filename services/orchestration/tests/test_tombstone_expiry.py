"""A deleted person's tombstone ages out: kept while something for them can still reach orchestration (the
longest stream retention, a dead letter's replay), swept after CDP_ORCHESTRATION_TOMBSTONE_DAYS, counted."""

from __future__ import annotations

import pytest

from cdp_kit.settings import SettingsError, load_settings
from cdp_kit.storage import Put
from cdp_kit.storage.memory import MemoryStore
from cdp_orchestration.privacy import TombstoneSweeper
from cdp_orchestration.settings import OrchestrationSettings
from cdp_orchestration.state import TOMBSTONES
from cdp_testing.metrics import MetricsCapture

DAY = 86_400.0
NOW = 1_900_000_000.0
ENV = {"CDP_NATS_URL": "nats://127.0.0.1:4222", "CDP_AUTH_MODE": "none"}


async def test_a_tombstone_is_kept_until_its_days_are_past_then_swept_and_counted():
    store = MemoryStore()
    await store.bulk_write(
        [
            Put(TOMBSTONES, "deleted-long-ago", {"at": NOW - 36 * DAY, "request_id": "r1"}),
            Put(TOMBSTONES, "deleted-last-month", {"at": NOW - 34 * DAY, "request_id": "r2"}),
            Put(TOMBSTONES, "deleted-today", {"at": NOW - 60, "request_id": "r3"}),
        ]
    )
    captured = MetricsCapture("orchestration")
    sweeper = TombstoneSweeper(store, days=35, meter=captured.telemetry.meter, clock=lambda: NOW)
    assert await sweeper.sweep() == 1
    left = {record.key async for record in store.scan_all(TOMBSTONES)}
    assert left == {"deleted-last-month", "deleted-today"}
    # A day later the next one has aged out too; sweeping again deletes nothing twice.
    sweeper.clock = lambda: NOW + DAY + 1
    assert await sweeper.sweep() == 1
    assert await sweeper.sweep() == 0
    assert {record.key async for record in store.scan_all(TOMBSTONES)} == {"deleted-today"}
    unit, points = captured.collected()["cdp.orchestration.tombstones.swept"]
    assert unit == "{tombstone}" and sum(point.value for point in points) == 2


def test_the_default_keeps_tombstones_longer_than_any_stream_keeps_a_message():
    settings = load_settings(OrchestrationSettings, ENV)
    assert settings.tombstone_days == 35 and settings.tombstone_days > settings.retention_days


@pytest.mark.parametrize(
    ("environ", "floor"),
    [
        ({"CDP_ORCHESTRATION_TOMBSTONE_DAYS": "7"}, "30"),  # below the dead-letter stream's 30 days
        ({"CDP_ORCHESTRATION_TOMBSTONE_DAYS": "35", "CDP_ORCHESTRATION_RETENTION_DAYS": "40"}, "40"),
    ],
)
def test_a_tombstone_period_below_what_can_still_arrive_is_refused_at_start_naming_the_setting(environ, floor):
    with pytest.raises(SettingsError) as refused:
        load_settings(OrchestrationSettings, {**ENV, **environ})
    [problem] = [p for p in refused.value.problems if "TOMBSTONE" in p]
    assert problem.startswith("CDP_ORCHESTRATION_TOMBSTONE_DAYS=") and f"at least {floor}" in problem
