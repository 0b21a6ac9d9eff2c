"""The end-of-run checks of the whole-platform kill test (platform_counts.py) see what `cdpctl lag`,
`cdpctl dlq` and a look at the logs would show an on-call engineer: a consumer with work left, a dead
letter with its stream, consumer and reason, an ERROR record or a traceback - and nothing on a clean run."""

from __future__ import annotations

import asyncio
import json

from cdp_kit.bus import Bus, ConsumerSpec, dead_letter_stream, events_raw_stream, subjects

from .platform_counts import consumers_behind, dead_letters, error_lines


def test_a_consumer_with_work_left_and_a_dead_letter_are_seen(nats_server):
    async def set_up():
        async with Bus.connect(nats_server.url, name="platform-counts-test") as bus:
            await bus.ensure_streams(events_raw_stream(), dead_letter_stream())
            for n in range(3):
                await bus.js.publish(subjects.events_raw(0), b"{}", headers={"Nats-Msg-Id": f"m{n}"})
            caught_up = ConsumerSpec(subjects.EVENTS_RAW, "identity-p1", (subjects.events_raw(1),))
            behind = ConsumerSpec(subjects.EVENTS_RAW, "identity-p0", (subjects.events_raw(0),))
            await bus.js.add_consumer(subjects.EVENTS_RAW, caught_up.config())
            await bus.js.add_consumer(subjects.EVENTS_RAW, behind.config())
            pull = await bus.js.pull_subscribe_bind(durable="identity-p0", stream=subjects.EVENTS_RAW)
            (taken,) = await pull.fetch(1)  # delivered, never acknowledged
            clean = (consumers_behind, dead_letters)
            before = [await asyncio.to_thread(check, nats_server.url) for check in clean]
            await bus.consumer(behind, lambda batch: None).publish_dead_letter(
                data=taken.data, headers={}, subject=taken.subject, seq=1, deliveries=5, reason="invalid_event",
                detail="",
            )  # fmt: skip
            return before

    lag_before, dlq_before = asyncio.run(set_up())
    assert lag_before == {"EVENTS_RAW/identity-p0": (2, 1)}, "pending and acknowledgement pending, by consumer"
    assert dlq_before == {}
    assert dead_letters(nats_server.url) == {("EVENTS_RAW", "identity-p0", "invalid_event"): 1}


class _Workspace:
    def __init__(self, logs: dict) -> None:
        self.logs = logs

    def service_logs(self) -> dict:
        return self.logs


def test_error_records_and_tracebacks_in_service_logs_are_seen(tmp_path):
    clean = tmp_path / "identity.log"
    clean.write_text(
        json.dumps({"level": "INFO", "logger": "cdp.service", "msg": "identity serving"})
        + "\n"
        + json.dumps({"level": "WARNING", "logger": "cdp.bus", "msg": "nats disconnected; reconnecting"})
        + '\n{"level":"ERR'  # a line cut short by a SIGKILL
    )
    noisy = tmp_path / "profile.log"
    noisy.write_text(
        json.dumps({"level": "INFO", "logger": "cdp.service", "msg": "profile serving"})
        + "\n"
        + json.dumps({"level": "ERROR", "logger": "cdp.bus", "msg": "could not dead-letter"})
        + '\nTraceback (most recent call last):\n  File "x.py", line 1\nValueError\n'
    )
    assert error_lines(_Workspace({"identity": clean})) == []
    assert error_lines(_Workspace({"identity": clean, "profile": noisy, "scoring": tmp_path / "none.log"})) == [
        "profile.log:2: cdp.bus could not dead-letter",
        "profile.log:3: Traceback (most recent call last):",
    ]
