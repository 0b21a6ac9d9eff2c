"""`cdpctl status` with a dev companion that accepts connections and never answers (the `channels` mail relay
stopped with SIGSTOP, as an on-call trial did): companions do not decide the platform's health (they stand
in for providers outside it; README, status.py), so it stays healthy - and the output says so, naming the
companion and its state, rather than a bare `"healthy": true` read as "sending mail"."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from cdpctl.cli import main
from cdpctl.platform import Workspace


@pytest.fixture
def silent_smtp() -> Iterator[int]:
    """A listener that accepts (the kernel does, up to its backlog) and never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield listener.getsockname()[1]
    listener.close()


class Quiet(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass  # the CLI's output is read as JSON


def _workspace(tmp_path, nats_url: str, companions: dict[str, dict[str, int]]) -> Workspace:
    ws = Workspace(tmp_path / "home")
    ws.prepare(())
    listed = {
        name: {"ports": ports, "urls": {k: f"127.0.0.1:{p}" for k, p in ports.items()}, "role": ""}
        for name, ports in companions.items()
    }
    ws.write_run({"pid": os.getpid(), "nats": nats_url, "services": {}, "companions": listed})
    return ws


def test_a_companion_not_answering_is_named_in_the_output_as_not_counted(nats_server, tmp_path, silent_smtp):
    ws = _workspace(tmp_path, nats_server.url, {"channels": {"smtp": silent_smtp}})
    runner = CliRunner()
    result = runner.invoke(main, ["--home", str(ws.root), "status", "--json"])
    document = json.loads(result.output)
    assert result.exit_code == 0 and document["healthy"] is True
    assert document["companions"]["channels"]["health"] == "NOT ANSWERING"
    assert document["companions_counted"] is False
    assert "not counted toward health: channels (dev, not up)" in document["note"]

    table = runner.invoke(main, ["--home", str(ws.root), "status"], env={"COLUMNS": "200"})
    assert table.exit_code == 0
    assert "not counted toward health: channels (dev, not up)" in table.output, table.output


def test_no_note_while_every_companion_answers(nats_server, tmp_path):
    # Any HTTP answer is one (this server's is a 501 to every GET).
    server = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ws = _workspace(tmp_path, nats_server.url, {"crm-zoho": {"api": server.server_address[1]}})
        result = CliRunner().invoke(main, ["--home", str(ws.root), "status", "--json"])
    finally:
        server.shutdown()
        server.server_close()
    document = json.loads(result.output)
    assert document["companions"]["crm-zoho"]["health"] == "UP"
    assert result.exit_code == 0 and document["companions_counted"] is False and "note" not in document
