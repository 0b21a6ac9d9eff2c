"""`cdpctl status` says when it could not look at the consumers' backlogs, and does not call the platform
healthy when nats-server refused to list them (exit 1): a backlog it did not see is not one it found moving.

Found by the on-call helper (stop 43): the stuck-consumer check (test_status_backlog.py) runs only when
nats-server answers its probes, and whatever stopped the check itself - the operator's NATS credentials refused
(the run file's password not the server's), nats-server's JetStream API slower than the check's deadline -
made it return nothing, which read as "no consumer stuck": `status` exited 0 with `healthy: true` and
`stuck: null`, and the table said nothing, while a consumer's oldest message had waited past STUCK_AFTER. A
late listing is now said too; it still counts healthy (test_status_speed's nats-server answers no request)."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from click.testing import CliRunner

from cdp_kit.bus import Bus, OutMessage, events_raw_stream
from cdp_kit.natsauth import authorization_config, new_password
from cdp_kit.natsroles import OPERATOR
from cdp_kit.natsserver import NatsServer
from cdpctl import bus as bus_module
from cdpctl import status as status_module
from cdpctl.cli import main
from cdpctl.platform import Workspace


async def _stuck_backlog(url: str) -> None:
    async with Bus.connect(url, name="test", connect_timeout=5) as bus:
        await bus.ensure_streams(events_raw_stream())
        await bus.js.add_consumer("EVENTS_RAW", durable_name="identity-p0", ack_policy="explicit")
        await bus.publisher.publish_batch([OutMessage("events.raw.0", b"x", "web:1")])


def _status(ws: Workspace, *args: str):
    return CliRunner().invoke(main, ["--home", str(ws.root), "status", *args], env={"COLUMNS": "200"})


def _assert_not_checked(ws: Workspace, why: str, *, healthy: bool) -> None:
    result = _status(ws, "--json")
    document = json.loads(result.output)
    assert document["stuck"] is None
    assert (result.exit_code, document["healthy"]) == (0 if healthy else 1, healthy), result.output
    assert document["backlogs"].startswith("not checked: ") and why in document["backlogs"], document
    table = _status(ws)
    assert table.exit_code == result.exit_code, table.output
    assert "consumers' backlogs not checked" in table.output and why in table.output, table.output


@pytest.fixture
def secured_nats(tmp_path):
    """A nats-server where only the operator (cdpctl's user) may do anything; yields (server, its URL with the
    operator's password)."""
    operator = new_password()
    with NatsServer(store_dir=tmp_path / "nats", config=authorization_config({}, operator_password=operator)) as server:
        yield server, server.url.replace("nats://", f"nats://{OPERATOR}:{operator}@", 1)


def test_backlogs_the_operators_credentials_may_not_see_are_said_so_and_not_healthy(
    secured_nats, tmp_path, monkeypatch
):
    server, operator_url = secured_nats
    asyncio.run(_stuck_backlog(operator_url))
    monkeypatch.setattr(status_module, "STUCK_AFTER", 0.0)  # the waiting message is "old"
    ws = Workspace(tmp_path / "home")
    ws.prepare(())
    run = {"pid": os.getpid(), "nats": operator_url, "services": {}, "companions": {}}
    ws.run_file.write_text(json.dumps(run))  # as written, not with this home's own operator password
    result = _status(ws, "--json")
    document = json.loads(result.output)
    assert result.exit_code == 1 and document["stuck"][0]["consumer"] == "identity-p0", result.output  # control

    # The run file's password no longer the one nats-server takes: its probes still answer (INFO comes first).
    wrong = server.url.replace("nats://", f"nats://{OPERATOR}:not-the-password@", 1)
    ws.run_file.write_text(json.dumps({**run, "nats": wrong}))
    assert json.loads(_status(ws, "--json").output)["nats"]["up"] is True
    _assert_not_checked(ws, "Authorization Violation", healthy=False)

    ws.run_file.write_text(json.dumps(run))  # the right password again: listed, and said so
    assert json.loads(_status(ws, "--json").output)["backlogs"] == "checked"


def test_backlogs_nats_server_does_not_list_in_time_are_said_so(nats_server, tmp_path, monkeypatch):
    asyncio.run(_stuck_backlog(nats_server.url))
    ws = Workspace(tmp_path / "home")
    ws.prepare(())
    ws.write_run({"pid": os.getpid(), "nats": nats_server.url, "services": {}, "companions": {}})
    listing = bus_module.streams_and_lag

    async def slow(url, tls=None):  # JetStream's API slower than status's deadline (a loaded server)
        await asyncio.sleep(status_module.STATUS_TIMEOUT + 1.0)
        return await listing(url, tls)

    monkeypatch.setattr(bus_module, "streams_and_lag", slow)
    _assert_not_checked(ws, "no answer", healthy=True)
