"""`cdpctl up` makes every stream before any service starts, as its operator user (no service's NATS user
may create or change a stream), with the retention settings the services get; and at the next `up` it
puts back a stream someone gave a republish while the platform was down or running, saying what each
update changed (as it was and as it is now)."""

from __future__ import annotations

import asyncio

import pytest
from nats.js.api import RePublish

from cdp_kit.streamtable import STREAMS
from cdp_testing.platform_run import RunningPlatform

DAY = 86_400


async def _configs(platform: RunningPlatform) -> dict:
    nc = await platform.connect_nats()
    try:
        js = nc.jetstream()
        return {entry.name: (await js.stream_info(entry.name)).config for entry in STREAMS}
    finally:
        await nc.close()


async def _republish(platform: RunningPlatform, stream: str) -> None:
    nc = await platform.connect_nats()
    try:
        js = nc.jetstream()
        config = (await js.stream_info(stream)).config
        config.republish = RePublish(src=">", dest="_INBOX.collector.spy.>")
        await js.update_stream(config)
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def restarted(tmp_path_factory):
    """A platform started twice on one workspace: first with CDP_SCORING_SCORES_RETENTION_DAYS=3 and
    CDP_CRM_RETENTION_DAYS=2, and EVENTS_RAW given a republish before it stopped; then (running, yielded
    with the first start's stream configurations) without CDP_CRM_RETENTION_DAYS, as an upgrade run without
    a variable the last start had. Both tests use the second start: a platform start is ~6 s of CPU."""
    workdir = tmp_path_factory.mktemp("up-provisions")
    env = {"CDP_SCORING_SCORES_RETENTION_DAYS": "3", "CDP_CRM_RETENTION_DAYS": "2"}
    with RunningPlatform(workdir, env=env, companions=False) as platform:
        first = asyncio.run(_configs(platform))
        asyncio.run(_republish(platform, "EVENTS_RAW"))
    with RunningPlatform(workdir, env={"CDP_SCORING_SCORES_RETENTION_DAYS": "3"}, companions=False) as platform:
        yield first, platform


@pytest.mark.timeout(300)
def test_up_provisions_every_stream_with_the_services_settings_and_undoes_a_republish(restarted):
    configs, platform = restarted
    assert configs["SCORES"].max_age == 3 * DAY
    assert configs["CRM"].max_age == 2 * DAY
    assert configs["EVENTS_RAW"].max_age == 7 * DAY
    assert all(c.republish is None for c in configs.values())
    # The same workspace: its streams kept. Started without CDP_CRM_RETENTION_DAYS, CRM's retention grows
    # back to the default: said, with both.
    log = platform.log_path.read_text()
    assert "streams provisioned (0 created, 2 updated)" in log
    assert f"updated stream CRM (max_age {2 * DAY:.1f} -> {7 * DAY:.1f})" in log
    assert "updated stream EVENTS_RAW (republish" in log
    configs = asyncio.run(_configs(platform))
    assert configs["EVENTS_RAW"].republish is None
    assert configs["CRM"].max_age == 7 * DAY
    assert platform.service("collector")["pid"]  # it started, on the stream as specified


async def _shorten(platform: RunningPlatform, stream: str, max_age: float) -> None:
    nc = await platform.connect_nats()
    try:
        js = nc.jetstream()
        config = (await js.stream_info(stream)).config
        config.max_age = max_age
        await js.update_stream(config)
    finally:
        await nc.close()


@pytest.mark.timeout(300)
def test_a_service_that_crashed_beside_a_drifted_stream_comes_back_on_the_stream_put_back(restarted):
    """The upgrade trial's D3: a stream changed by hand while the platform runs stops every service that
    verifies it at its next start; the supervisor used to restart the collector into the same refusal until
    it gave up and stopped the platform. Now the streams are put back before a crashed service starts again."""
    _, platform = restarted
    asyncio.run(_shorten(platform, "EVENTS_RAW", 2 * DAY))
    platform.wait_restarted("collector", platform.kill("collector"))
    assert asyncio.run(_configs(platform))["EVENTS_RAW"].max_age == 7 * DAY
    assert f"updated stream EVENTS_RAW (max_age {2 * DAY:.1f} -> {7 * DAY:.1f})" in platform.log_path.read_text()
