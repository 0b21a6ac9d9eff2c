"""The development companions' logs, as `cdpctl up` writes them (`.cdp/logs/<name>.log`): every line is one
JSON object like a service's - the line saying where it listens, one line per request (failures at INFO,
successes too at DEBUG), an error inside a handler, a crash at start - and none holds what a request
carried (an email, a phone number, a message's text, a path or query naming a person): routes, statuses
and counts only."""

from __future__ import annotations

import base64
import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from email.message import EmailMessage
from pathlib import Path

import pytest

from cdp_kit.natsserver import wait_for_port
from cdpctl.platform import (
    CHANNELS,
    COMPANIONS,
    ORCHESTRATION,
    Companion,
    Workspace,
    companion_command,
    companion_environment,
    pick_port,
)
from cdpctl.supervise import spawn

# What requests carry below; none may reach a log line.
EMAIL = "ada.lovelace.7f3a@example.com"
PHONE = "+15557654321"
TEXT = "private-words-9d2c"
SENT = (EMAIL, PHONE, TEXT, urllib.parse.quote(EMAIL), urllib.parse.quote(PHONE))

CRMS = {c.args[0]: c for c in COMPANIONS if c.module == "cdp_crm_emulators"}


class Running:
    """One companion started as `cdpctl up` starts it (`supervise.spawn`: output appended to its log)."""

    def __init__(self, ws: Workspace, companion: Companion, **env: str) -> None:
        self.ports = {listener: pick_port(0) for listener in companion.ports}
        self.log = ws.logs_dir / f"{companion.name}.log"
        environment = companion_environment(ws, companion, self.ports) | env
        self.proc = spawn(companion_command(ws, companion, self.ports), environment, self.log)
        for port in self.ports.values():
            assert wait_for_port("127.0.0.1", port, 30), self.log.read_text()

    def url(self, listener: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[listener]}{path}"

    def stop(self) -> list[dict]:
        """Stop it (SIGTERM, as `cdpctl up` does) and return its log, each line parsed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(15) == 0
        return parsed(self.log)


def parsed(log: Path) -> list[dict]:
    text = log.read_text()
    assert text.strip(), "the companion wrote nothing"
    entries = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"a log line that is not JSON: {line!r}\n--- the whole log:\n{text}")
        assert isinstance(entry, dict), line
        assert {"ts", "level", "service", "msg"} <= entry.keys(), line
        entries.append(entry)
    for value in SENT:
        assert value not in text, f"{value!r} reached the log:\n{text}"
    return entries


def call(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def garbage_after_a_request(port: int) -> None:
    """A good request, then a malformed one on the same connection: the parser's error quotes the line."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET /{TEXT} HTTP/1.1\r\nHost: x\r\n\r\n{EMAIL} {TEXT}\r\n\r\n".encode())
        sock.settimeout(5)
        try:
            while sock.recv(65536):
                pass
        except TimeoutError:
            pass


@pytest.fixture
def ws(tmp_path) -> Workspace:
    ws = Workspace(tmp_path / "home")
    ws.prepare((ORCHESTRATION,))
    return ws


def test_the_channels_log_json_lines_naming_routes_and_statuses_never_what_was_sent(ws):
    """At DEBUG, where every request has its line."""
    channels = Running(ws, CHANNELS, CDP_LOG_LEVEL="DEBUG")
    try:
        with smtplib.SMTP("127.0.0.1", channels.ports["smtp"], timeout=10) as smtp:
            mail = EmailMessage()
            mail["From"], mail["To"], mail["Subject"] = EMAIL, EMAIL, TEXT
            mail.set_content(f"{TEXT} {PHONE}")
            smtp.send_message(mail)
            assert smtp.docmd(f"{TEXT} {EMAIL}")[0] == 500  # not a command
            assert smtp.docmd(f"RCPT TO:<{EMAIL}>")[0] == 503  # out of order
        twilio_sid = "AC" + "0" * 32
        messages = channels.url("twilio", f"/2010-04-01/Accounts/{twilio_sid}/Messages.json")
        form = urllib.parse.urlencode({"To": PHONE, "From": "+15005550006", "Body": TEXT}).encode()
        good = base64.b64encode(f"{twilio_sid}:{ws.dev_secret('twilio')}".encode()).decode()
        assert call("POST", messages, form, {"Authorization": f"Basic {good}"}) == 201
        assert call("POST", messages, form, {"Authorization": "Basic " + base64.b64encode(b"x:y").decode()}) == 401
        assert call("POST", channels.url("webhook", f"/hooks/{EMAIL}"), json.dumps({"text": TEXT}).encode()) == 401
        assert call("POST", channels.url("fcm", "/v1/projects/cdp-local/messages:send"), TEXT.encode()) == 401
        assert call("POST", channels.url("webpush", f"/push/{EMAIL}"), TEXT.encode()) == 404
        assert call("GET", channels.url("twilio", f"/{EMAIL}?phone={PHONE}")) == 404
        garbage_after_a_request(channels.ports["fcm"])
    finally:
        entries = channels.stop()

    assert {e["service"] for e in entries} == {"channels"}
    (listening,) = [e for e in entries if "endpoints" in e]
    assert set(listening["endpoints"]) == {"smtp", "twilio", "fcm", "webpush", "webhook"}
    requests = {(e.get("method"), e.get("route"), e.get("status")) for e in entries if "status" in e}
    assert ("POST", "/2010-04-01/Accounts/{account}/Messages.json", 201) in requests
    assert ("POST", "/2010-04-01/Accounts/{account}/Messages.json", 401) in requests
    assert ("POST", "/{path}", 401) in requests  # the webhook receiver's route, not the path it was sent
    assert ("POST", "/push/{id}", 404) in requests
    assert ("GET", None, 404) in requests  # no route: nothing of the path
    assert any(e["msg"] == "accepted a message" and e["recipients"] == 1 for e in entries)
    assert ("UNKNOWN", None, 400) in requests  # the malformed request: answered, nothing of it logged
    assert not [e for e in entries if e["level"] in ("ERROR", "CRITICAL")]


@pytest.mark.parametrize("crm", sorted(CRMS))
def test_a_crm_emulator_logs_json_lines_naming_routes_and_statuses_never_what_was_sent(ws, crm):
    """At INFO, as `cdpctl up` runs it: the failures, not the connector's polls and the health probes."""
    emulator = Running(ws, CRMS[crm])
    try:
        assert call("GET", emulator.url("api", "/_emulator/budget")) == 200
        assert call("GET", emulator.url("api", f"/{EMAIL}?phone={urllib.parse.quote(PHONE)}")) in (401, 404)
        # An error inside a handler (a body that is not JSON): its traceback, its message withheld.
        assert call("POST", emulator.url("api", "/_emulator/faults"), f"{TEXT} {EMAIL}".encode()) == 500
        garbage_after_a_request(emulator.ports["api"])
        if crm == "hubspot":
            lookup = emulator.url("api", f"/crm/v3/objects/contacts/{EMAIL}?idProperty=email")
            assert call("GET", lookup) == 401
            assert call("GET", lookup, headers={"Authorization": "Bearer pat-local-hubspot"}) == 404
    finally:
        entries = emulator.stop()

    assert {e["service"] for e in entries} == {f"crm-{crm}"}
    (listening,) = [e for e in entries if "url" in e]
    assert listening["url"] == emulator.url("api", "")
    failed = [e for e in entries if e["level"] == "ERROR" and "exception" in e]
    assert failed and "JSONDecodeError: message withheld" in failed[0]["exception"]
    requests = {(e.get("method"), e.get("route"), e.get("status")) for e in entries if "status" in e}
    assert ("POST", "/_emulator/faults", 500) in requests
    assert all(status >= 400 for _method, _route, status in requests)
    if crm == "hubspot":
        assert ("GET", "/crm/v3/objects/{object}/{id}", 401) in requests
        assert ("GET", "/crm/v3/objects/{object}/{id}", 404) in requests


def test_a_crm_emulator_that_cannot_start_says_why_in_json(ws, tmp_path):
    """Its port taken: the crash is one JSON line (type and traceback), and the process exits non-zero."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        companion = CRMS["zoho"]
        log = tmp_path / "crash.log"
        proc = spawn(companion_command(ws, companion, {"api": port}), companion_environment(ws, companion, {}), log)
        assert proc.wait(30) != 0
    (crash,) = [e for e in parsed(log) if e["level"] == "CRITICAL"]
    assert "OSError" in crash["exception"]


def test_a_companion_given_a_bad_log_level_says_so_in_json(tmp_path):
    env = {**os.environ, "CDP_LOG_LEVEL": "loud"}
    result = subprocess.run(
        [sys.executable, "-m", "cdp_testing.channels", "--smtp-port=0"], env=env, capture_output=True, timeout=30
    )
    assert result.returncode == 2 and not result.stdout
    (error,) = [json.loads(line) for line in result.stderr.decode().splitlines()]
    assert error["msg"] == "CDP_LOG_LEVEL='loud' is invalid: must be DEBUG, INFO, WARNING or ERROR"


def test_a_companion_given_a_bad_argument_says_so_in_json(tmp_path):
    log = tmp_path / "bad.log"
    with open(log, "wb") as out:
        result = subprocess.run(
            [sys.executable, "-m", "cdp_crm_emulators", "nosuchcrm", "--set", f"x={EMAIL}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=30,
        )
    assert result.returncode == 2
    (error,) = parsed(log)
    assert error["level"] == "ERROR" and "nosuchcrm" in error["msg"]
