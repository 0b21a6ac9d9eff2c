"""A provider's Retry-After pauses its destination for at most CDP_ORCHESTRATION_PAUSE_SECONDS (an hour by
default), then one probe asks again (`pauses.py`, `dispatch.py`).

A provider answering `Retry-After: 86400` by mistake, or a hostile webhook receiver, silenced the whole
destination (a webhook host, an SMS account) for a day: every action to it was handed back for as long as
it asked, bounded only by the action's wait (CDP_ORCHESTRATION_DEFER_SECONDS, a day).
"""

from __future__ import annotations

import asyncio
import time
from itertools import pairwise

import pytest
from aiohttp import web

from cdp_kit.bus import Bus
from cdp_kit.settings import SettingsError, load_settings
from cdp_kit.storage import open_store
from cdp_orchestration import streams
from cdp_orchestration.dispatch import MAX_ATTEMPTS, PENDING, SENDS, Dispatcher, dispatcher
from cdp_orchestration.pauses import PAUSE_AT_MOST
from cdp_orchestration.settings import OrchestrationSettings
from cdp_testing.waiting import until

from .test_dispatch import Counting, Receiver, _publish_actions, webhook_channel

A_DAY = 86_400
CAP = 1.0  # the test's pause cap, in place of the hour


class AskingForADay(Receiver):
    """A webhook receiver answering its first `throttles` requests `status` with `Retry-After: 86400`, the
    rest 200 after `delay` seconds; it records each request (action id, started, ended, status)."""

    def __init__(self, throttles: int, *, status: int = 429, delay: float = 0.3) -> None:
        self.throttles = throttles
        self.status = status
        self.delay = delay
        self.requests: list[tuple[str, float, float, int]] = []
        super().__init__()

    async def _receive(self, request: web.Request) -> web.Response:
        started = time.monotonic()
        action_id = request.headers["Idempotency-Key"]
        if self.throttles:
            self.throttles -= 1
            self.requests.append((action_id, started, time.monotonic(), self.status))
            return web.Response(status=self.status, headers={"Retry-After": str(A_DAY)})
        await asyncio.sleep(self.delay)
        self.requests.append((action_id, started, time.monotonic(), 200))
        return web.Response(status=200)


async def _run(nats_server, tmp_path, receiver: AskingForADay, actions: list[str], *, wait: float, **options) -> dict:
    """Dispatch `actions` (one person each, all to the receiver) with a pause cap of CAP: the first alone,
    the rest once the receiver has answered it. Their send records once each has an outcome."""
    url = await receiver.start()
    # One request per attempt in the channel: a Retry-After above its cap comes back to the dispatcher.
    channel = webhook_channel(CDP_WEBHOOK_BACKOFF_MAX="0.5", CDP_WEBHOOK_MAX_ATTEMPTS="1")
    try:
        async with (
            Bus.connect(nats_server.url, name="pause-test") as bus,
            open_store(f"sqlite:///{tmp_path}/d.db") as store,
        ):
            await streams.ensure_streams(bus.js)
            options = {"concurrency": 4, "pause_at_most": CAP, "probe_every": 0.5, **options}
            task = asyncio.create_task(dispatcher(bus, store, channel, **options).run())
            try:
                await _publish_actions(bus, url, [(actions[0], "person-0")])
                await until(lambda: receiver.requests, "the receiver's first answer")
                await _publish_actions(bus, url, [(a, f"person-{n}") for n, a in enumerate(actions[1:], 1)])

                async def recorded() -> dict | None:
                    records = {a: await store.get(SENDS, a) for a in actions}
                    if all(r is not None and r.doc["status"] != PENDING for r in records.values()):
                        return {a: r.doc for a, r in records.items()}
                    return None

                return await until(recorded, f"an outcome for every action; the receiver saw {receiver.requests}", wait)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    finally:
        await channel.close()
        await receiver.runner.cleanup()


async def test_a_day_long_retry_after_pauses_the_destination_for_the_cap_then_one_probe_goes_first(
    nats_server, tmp_path
):
    receiver = AskingForADay(throttles=1)
    actions = ["act-0", "act-1", "act-2", "act-3"]
    records = await _run(nats_server, tmp_path, receiver, actions, wait=20)
    assert {a: (r["status"], r["attempts"]) for a, r in records.items()} == {a: ("accepted", 1) for a in actions}
    [(_, _, asked_at, status), probe, *rest] = receiver.requests
    assert status == 429
    # Nothing went to the destination for the cap (not the day it asked), then one probe alone: the others,
    # four in flight at most, started only once it was answered.
    assert probe[1] >= asked_at + CAP - 0.1
    assert len(rest) == len(actions) - 1 and min(started for _, started, _, _ in rest) >= probe[2]
    assert sorted(a for a, *_ in [probe, *rest]) == actions  # each once


async def test_a_probe_asked_to_wait_again_pauses_the_destination_again_within_the_cap(nats_server, tmp_path):
    receiver = AskingForADay(throttles=2)  # the first send, and the probe after the cap
    actions = ["act-0", "act-1", "act-2"]
    records = await _run(nats_server, tmp_path, receiver, actions, wait=20)
    assert all(r["status"] == "accepted" and r["attempts"] == 1 for r in records.values())  # a 429 uses none
    [first, probe, second_probe, *rest] = receiver.requests
    assert (first[3], probe[3], second_probe[3]) == (429, 429, 200)
    assert probe[1] >= first[2] + CAP - 0.1 and second_probe[1] >= probe[2] + CAP - 0.1
    assert second_probe[1] < probe[2] + A_DAY / 2  # the cap again, not the day
    # The others went once the second probe was answered; each action once in the end.
    assert len(rest) == 2 and min(started for _, started, _, _ in rest) >= second_probe[2]
    assert sorted(a for a, _, _, status in receiver.requests if status == 200) == actions


async def test_a_5xx_with_a_day_long_retry_after_goes_through_its_attempts_a_cap_apart(nats_server, tmp_path):
    """A 503 asking for a day: each attempt waited the day (to CDP_ORCHESTRATION_DEFER_SECONDS), so a
    broken provider's action took five days to reach its dead letter. It waits the cap at most now."""
    receiver = AskingForADay(throttles=1_000, status=503)
    records = await _run(nats_server, tmp_path, receiver, ["act-0"], wait=30, backoff=(0.1,))
    assert (records["act-0"]["status"], records["act-0"]["reason"]) == ("failed", "http_503")
    assert records["act-0"]["attempts"] == MAX_ATTEMPTS
    started = [started for _, started, _, _ in receiver.requests]
    assert len(started) == MAX_ATTEMPTS
    assert all(later - earlier >= CAP - 0.1 for earlier, later in pairwise(started))


def test_the_cap_is_an_hour_by_default_and_a_setting():
    environ = {"CDP_NATS_URL": "nats://127.0.0.1:4222", "CDP_AUTH_MODE": "none"}
    assert load_settings(OrchestrationSettings, environ).pause_seconds == PAUSE_AT_MOST == 3600
    assert Dispatcher(Counting(), store=None).pauses.at_most == 3600  # type: ignore[arg-type]
    assert (
        load_settings(OrchestrationSettings, {**environ, "CDP_ORCHESTRATION_PAUSE_SECONDS": "60"}).pause_seconds == 60
    )
    with pytest.raises(SettingsError) as refused:
        load_settings(OrchestrationSettings, {**environ, "CDP_ORCHESTRATION_PAUSE_SECONDS": "0"})
    [problem] = [p for p in refused.value.problems if "PAUSE" in p]
    assert problem.startswith("CDP_ORCHESTRATION_PAUSE_SECONDS=0 is invalid")
