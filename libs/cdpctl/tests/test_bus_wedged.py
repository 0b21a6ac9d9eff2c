"""`cdpctl lag` and `cdpctl dlq` against a nats-server that accepts connections and never answers (stopped
with SIGSTOP: the kernel still accepts on its port). They used to hang, printing nats.py's tracebacks over
and over until the server came back (10 minutes in an on-call trial); now each ends with an error that
names the server and where to look, and no traceback."""

from __future__ import annotations

import asyncio
import socket

import pytest

from .conftest import Cli, workspace


@pytest.fixture
def wedged():
    """A port that accepts TCP connections and never sends a byte (what a SIGSTOPped nats-server looks like)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield f"nats://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


@pytest.mark.parametrize("command", [["lag"], ["dlq"], ["dlq", "EVENTS_RAW", "--replay"]])
async def test_a_nats_server_that_never_answers_ends_the_command_with_an_error_naming_it(
    tmp_path, wedged, command, capfd
):
    cli = Cli(workspace(tmp_path, wedged, {}), wedged)
    # A hang guard only (the command's own bound is a few seconds), not a speed goal.
    result = await asyncio.wait_for(cli.run(*command, "--nats", wedged), timeout=120)
    assert result.exit_code == 1
    assert "not answering" in result.output and wedged in result.output
    assert "cdpctl status" in result.output
    # The log of the platform acted on (an on-call trial with CDP_HOME was sent to ./.cdp's).
    assert str(tmp_path) in result.output.replace("\n", "") and "nats-server.log" in result.output, result.output
    captured = capfd.readouterr()
    assert "Traceback" not in result.output + captured.out + captured.err
