"""`cdpctl status` names a consumer whose backlog is stuck (its oldest unacknowledged message older than
STUCK_AFTER), and the platform is not healthy then: an on-call trial watched `status` say healthy while a
dispatcher's backlog grew for minutes, and could tell stuck from busy only by sampling `cdpctl lag` twice.
Orchestration's dispatchers hold deferred actions unacknowledged on purpose and are not counted."""

from __future__ import annotations

import asyncio
import json
import os

from click.testing import CliRunner

from cdp_kit.bus import Bus, OutMessage, events_raw_stream
from cdp_kit.bus.streams import actions_stream
from cdpctl import status as status_module
from cdpctl.cli import main
from cdpctl.platform import Workspace


async def _backlogs(url: str) -> None:
    async with Bus.connect(url, name="test", connect_timeout=5) as bus:
        await bus.ensure_streams(events_raw_stream(), actions_stream())
        await bus.js.add_consumer("EVENTS_RAW", durable_name="identity-p0", ack_policy="explicit")
        await bus.js.add_consumer("ACTIONS", durable_name="orchestration-dispatch-email", ack_policy="explicit")
        await bus.publisher.publish_batch([OutMessage("events.raw.0", b"x", "web:1")])
        await bus.publisher.publish_batch([OutMessage("actions.email.0", b"x", "a:1")])


def test_a_stuck_consumer_is_named_and_the_platform_is_not_healthy(nats_server, tmp_path, monkeypatch):
    asyncio.run(_backlogs(nats_server.url))
    ws = Workspace(tmp_path / "home")
    ws.prepare(())
    ws.write_run({"pid": os.getpid(), "nats": nats_server.url, "services": {}, "companions": {}})
    runner = CliRunner()

    result = runner.invoke(main, ["--home", str(ws.root), "status", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["stuck"] == []  # a second old: busy, not stuck

    monkeypatch.setattr(status_module, "STUCK_AFTER", 0.0)  # every waiting message is "old" now
    result = runner.invoke(main, ["--home", str(ws.root), "status", "--json"])
    document = json.loads(result.output)
    assert result.exit_code == 1 and document["healthy"] is False
    assert [(row["stream"], row["consumer"]) for row in document["stuck"]] == [("EVENTS_RAW", "identity-p0")]

    table = runner.invoke(main, ["--home", str(ws.root), "status"], env={"COLUMNS": "200"})
    assert table.exit_code == 1 and "stuck: identity-p0 on EVENTS_RAW: 1 waiting" in table.output, table.output
