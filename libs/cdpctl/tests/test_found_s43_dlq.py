"""`cdpctl dlq` says when there are more dead letters than it listed or replayed, and refuses a --limit
that lists none.

Found by the on-call helper (stop 43): with more dead letters than --limit (1,000 by default; an outage's
worth is easily more), `dlq --replay` printed "replayed 1000 of 1000" and its --json nothing more, which
reads as the DLQ emptied; the rest waited unseen. `--limit 0` (or -5) listed none and printed an empty
table, exit 0: "no dead letters"."""

from __future__ import annotations

import json

from cdp_kit.bus import Bus, dead_letter_stream, events_raw_stream, subjects
from cdp_kit.bus.consumer import DLQ_CONSUMER, DLQ_REASON, DLQ_SEQ, DLQ_STREAM, DLQ_SUBJECT


async def _dead_letters(url: str, count: int) -> None:
    async with Bus.connect(url, name="test", connect_timeout=5) as bus:
        await bus.ensure_streams(events_raw_stream(), dead_letter_stream())
        for n in range(count):
            stored = await bus.js.publish("events.raw.0", b"e", headers={"Nats-Msg-Id": f"web:{n}"})
            headers = {
                DLQ_REASON: "invalid_event",
                DLQ_SUBJECT: "events.raw.0",
                DLQ_STREAM: "EVENTS_RAW",
                DLQ_CONSUMER: "identity-p0",
                DLQ_SEQ: str(stored.seq),
            }
            await bus.js.publish(subjects.dead_letter("EVENTS_RAW", "identity-p0"), b"e", headers=headers)


async def test_more_dead_letters_than_the_limit_are_said_to_remain(bus_cli):
    await _dead_letters(bus_cli.nats_url, 3)

    listed = json.loads((await bus_cli.run("dlq", "--limit", "2", "--json")).output)
    assert len(listed["dead_letters"]) == 2 and listed["more"] is True
    everything = json.loads((await bus_cli.run("dlq", "--limit", "3", "--json")).output)
    assert len(everything["dead_letters"]) == 3 and everything["more"] is False  # the control: exactly all

    result = await bus_cli.run("dlq", "EVENTS_RAW", "--replay", "--limit", "2")
    assert result.exit_code == 0 and "replayed 2 of 2" in result.output, result.output
    assert "more dead letters remain" in result.output, result.output
    left = json.loads((await bus_cli.run("dlq", "--json")).output)
    assert len(left["dead_letters"]) == 1 and left["more"] is False


async def test_a_limit_that_lists_nothing_is_refused_naming_the_option(bus_cli):
    await _dead_letters(bus_cli.nats_url, 1)
    for limit in ("0", "-5"):
        result = await bus_cli.run("dlq", "--limit", limit)
        assert result.exit_code == 2 and "--limit" in result.output, result.output
