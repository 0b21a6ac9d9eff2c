"""`cdpctl send` reports what the collector did with every event: events of a person who asked to be
deleted and suppressed are answered 200 and counted `suppressed`, not stored. cdpctl printed `accepted 0,
duplicates 0, rejected 0` for them, which reads as if the events had vanished."""

from __future__ import annotations

import asyncio
import json
import time


async def test_send_reports_the_events_the_collector_suppressed(people_cli):
    await people_cli.send({"type": "identify", "userId": "gone", "messageId": "m-gone-1", "traits": {"plan": "pro"}})
    deadline = time.monotonic() + 15
    while (await people_cli.run("profile", "user_id", "gone")).exit_code != 0:
        assert time.monotonic() < deadline, "the profile never appeared"
        await asyncio.sleep(0.1)
    deleted = await people_cli.run("delete", "user_id", "gone", "--suppress", "--yes")
    assert deleted.exit_code == 0, deleted.output

    send = ("send", "identify", "--user-id", "gone", "--url", people_cli.http)  # the run file's write key
    deadline = time.monotonic() + 20  # the collector learns of the suppression over the bus, a moment later
    while True:
        shown = await people_cli.run(*send, "--json")
        totals = json.loads(shown.output)
        if totals.get("suppressed") == 1 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert shown.exit_code == 0 and totals["suppressed"] == 1 and totals["accepted"] == 0, shown.output

    shown = await people_cli.run(*send, "--count", "2")
    assert shown.exit_code == 0, shown.output
    assert "accepted 0, duplicates 0, rejected 0, suppressed 2" in shown.output, shown.output
