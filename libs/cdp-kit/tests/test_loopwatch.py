"""A held event loop is said while it is held, with where, and again when it answers (loopwatch.py): the
evidence an on-call engineer has when a service stops answering everything at once."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time

import pytest

from cdp_kit.loopwatch import LoopWatch
from cdp_kit.settings import ServiceSettings
from cdp_testing.metrics import MetricsCapture
from cdp_testing.waiting import until

THRESHOLD = 0.3


def _hold_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # what a blocking call in a handler does to every caller of the service


@pytest.fixture
async def watched(caplog):
    caplog.set_level(logging.INFO, logger="cdp.service")
    captured = MetricsCapture("kit-test")
    watch = LoopWatch(asyncio.get_running_loop(), threading.get_ident(), THRESHOLD, captured.telemetry.meter)
    watch.start()
    try:
        yield caplog, captured
    finally:
        watch.stop()


def _said(caplog, message: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith(message)]


async def test_a_held_loop_is_said_while_held_with_where_and_how_long_once_it_answers(watched):
    caplog, captured = watched
    await asyncio.sleep(0.1)  # a beat or two answered: nothing to say
    _hold_the_loop(1.0)
    await until(lambda: _said(caplog, "event loop answered again"), "the loop said to answer again", timeout=5)

    (held,) = _said(caplog, "event loop held")
    assert held.levelno == logging.WARNING
    assert held.held_seconds >= THRESHOLD
    # Where the loop's thread was: this module's blocking call, by file, line and function - no values.
    assert any(line.endswith(" _hold_the_loop") and "test_loopwatch.py:" in line for line in held.stack)
    (again,) = _said(caplog, "event loop answered again")
    assert again.held_seconds >= 0.9
    unit, points = captured.collected()["cdp.service.loop.stalls"]
    assert unit == "{stall}"
    assert [p.value for p in points] == [1]


async def test_a_loop_that_keeps_answering_says_nothing(watched):
    caplog, captured = watched
    began = time.monotonic()
    while time.monotonic() - began < 4 * THRESHOLD:
        _hold_the_loop(THRESHOLD / 10)  # busy, but it answers between each
        await asyncio.sleep(0)
    assert not _said(caplog, "event loop")
    assert "cdp.service.loop.stalls" not in captured.collected()


def test_the_threshold_is_a_setting_and_a_negative_one_is_refused_by_name():
    settings = ServiceSettings(nats_url="nats://x", auth_mode="none")
    assert settings.loop_stall_seconds == 5.0
    assert settings.validate() == []
    problems = dataclasses.replace(settings, loop_stall_seconds=-1.0).validate()
    assert any(p.startswith("CDP_LOOP_STALL_SECONDS=-1.0 is invalid") for p in problems)
