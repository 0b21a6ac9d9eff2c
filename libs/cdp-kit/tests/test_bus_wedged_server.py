"""A connected service whose nats-server stops answering (SIGSTOP: its port still accepts, nothing replies).
An on-call trial saw services log `nats disconnected` only 4-6 minutes later (nats.py's default: a ping
every 120 s, two unanswered allowed), then `nats: ` with no error text every 2.5 s until the server came
back. Now the silent server is noticed within `ping_interval` x (`max_outstanding_pings` + 1), each error
line names its type, and a line that repeats is logged once, then at most once a minute with a count."""

from __future__ import annotations

import logging

from cdp_kit.bus import Bus, _Repeats
from cdp_testing.waiting import eventually


def _lines(caplog, start: str) -> list[str]:
    """What cdp.bus logged at INFO and above, starting with `start`."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "cdp.bus" and r.levelno >= logging.INFO and r.getMessage().startswith(start)
    ]


async def test_a_stopped_nats_server_is_noticed_named_and_left_when_it_answers_again(nats_server, caplog):
    caplog.set_level(logging.DEBUG, logger="cdp.bus")
    # A short ping interval keeps the test short; services use the default (10 s, 2 outstanding: 30 s).
    async with Bus.connect(
        nats_server.url, name="test", connect_timeout=5, ping_interval=1, max_outstanding_pings=2
    ) as bus:
        # Stopped for certain: os.kill returns before every thread of the server has stopped.
        with nats_server.paused():
            # Noticed within 3 ping intervals (3 s here; the timeout leaves room for a busy machine).
            await eventually(lambda: _lines(caplog, "nats disconnected"), timeout=15)
            # Reconnecting to the stopped server: the TCP connection is accepted and INFO never comes.
            await eventually(lambda: _lines(caplog, "nats: TimeoutError"), timeout=30)
            # Two more failed attempts (one each 2.5 s) while it stays stopped: at DEBUG only.
            await eventually(lambda: len(_repeats(caplog)) >= 2, timeout=30)
            failed = _lines(caplog, "nats:")
        await eventually(lambda: _lines(caplog, "nats reconnected"), timeout=30)
        await bus.nc.flush(timeout=5)
        assert bus.connected
    # One line per error, each naming it; the repeats were not logged again within the minute.
    assert failed.count("nats: TimeoutError") == 1, failed
    assert all(line.removeprefix("nats:").strip() for line in _lines(caplog, "nats:")), failed


def _repeats(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "cdp.bus" and r.levelno == logging.DEBUG and r.getMessage().startswith("nats: TimeoutError")
    ]


def test_a_repeated_line_is_logged_once_then_once_a_minute_with_how_many_were_left_out():
    now = [0.0]
    repeats = _Repeats(every=60.0, clock=lambda: now[0])
    assert repeats.admit("nats: TimeoutError") == 0
    left_out = 0
    for _ in range(23):  # every 2.5 s, as nats.py retries a silent server
        now[0] += 2.5
        left_out += repeats.admit("nats: TimeoutError") is None
    assert left_out == 23
    assert repeats.admit("nats: Connect call failed") == 0  # another line is news at once
    now[0] += 2.5  # 60 s after the first
    assert repeats.admit("nats: TimeoutError") == 23
    now[0] += 2.5
    assert repeats.admit("nats: TimeoutError") is None
    repeats.clear()  # reconnected: the next failure is news again
    assert repeats.admit("nats: TimeoutError") == 0
