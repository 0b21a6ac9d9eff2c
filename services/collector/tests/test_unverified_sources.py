"""An operator is told which browser or mobile sources are open to a claimed identity (docs/security.md, "A
claimed identity"): an enabled client source without identity_secret is said at WARNING by its id, one line
a source, with what is open and the fix, when the sources file is first read and each time it is read
changed (not again while it says the same), and counted in `cdp.collector.sources.unverified`. A server
source, a client source with a secret and a disabled source are not. No line holds a write key or secret.

A real collector and nats-server; the file is re-read at the next request after it changed, as in
production, so each change is followed by a real HTTP request."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from cdp_collector.__main__ import setup
from cdp_kit.service import serving
from cdp_testing.metrics import MetricsCapture

from .conftest import RunningCollector, collector_settings
from .test_source_limits import batch, post

SECRET = "s3cr3t-identity-hmac-key-0001"
KEYS = {
    "backend": "wk_backend_server_0001",
    "web": "wk_web_verified_00001",
    "shop": "wk_shop_open_0000001",
    "ios": "wk_ios_open_00000001",
    "ios-old": "wk_ios_old_000000001",
    "kiosk": "wk_kiosk_off_0000001",
}
SOURCES = [
    {"id": "backend", "write_key": KEYS["backend"]},  # a server source: its key is secret
    {"id": "web", "write_key": KEYS["web"], "kind": "client", "identity_secret": SECRET},
    {"id": "shop", "write_key": KEYS["shop"], "kind": "client"},
    {"id": "ios", "write_key": KEYS["ios"], "kind": "client"},
    {"id": "ios", "write_key": KEYS["ios-old"], "kind": "client", "enabled": False},  # one key of it turned off
    {"id": "kiosk", "write_key": KEYS["kiosk"], "kind": "client", "enabled": False},  # the source turned off
]
LOGGER = "cdp.collector.sources"


def _write(path: Path, sources: list[dict]) -> None:
    """Written so the collector sees the file changed however coarse the file system's clock."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(json.dumps({"sources": sources}))
    if path.stat().st_mtime_ns <= before:
        os.utime(path, ns=(before + 1_000_000, before + 1_000_000))


@contextlib.asynccontextmanager
async def _collector(nats_server, tmp_path, sources: list[dict]):
    path = tmp_path / "client-sources.json"
    _write(path, sources)
    captured = MetricsCapture("collector")
    settings = collector_settings(nats_server.url, tmp_path, sources_file=path)
    async with serving(settings, setup, telemetry=captured.telemetry) as runtime:
        yield RunningCollector(runtime, nats_server.url), captured, path


def _warned(caplog) -> list[str]:
    """The ids said unverified so far, in order."""
    return [
        r.source
        for r in caplog.records
        if r.name == LOGGER and r.levelno == logging.WARNING and "without identity_secret" in r.getMessage()
    ]


def _gauge(captured: MetricsCapture) -> int:
    (point,) = captured.collected()["cdp.collector.sources.unverified"][1]
    assert dict(point.attributes) == {}
    return point.value


async def _reread(collector: RunningCollector) -> None:
    """A request: the collector reads the changed file before it authenticates it."""
    status, _, _ = await post(collector, batch("r", 1), KEYS["backend"])
    assert status == 200


def _mentions(records: list[logging.LogRecord], text: str) -> bool:
    return any(text in r.getMessage() or text in json.dumps(r.__dict__, default=str) for r in records)


async def test_each_enabled_client_source_without_a_secret_is_said_once_at_start_by_its_id(
    nats_server, tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    async with _collector(nats_server, tmp_path, SOURCES) as (collector, captured, _):
        # Not the server source, not the client with a secret, not the disabled one; "ios" once for its keys.
        assert sorted(_warned(caplog)) == ["ios", "shop"]
        assert _gauge(captured) == 2
        for _ in range(3):  # requests re-check the file: unchanged, nothing said again
            await _reread(collector)
        assert sorted(_warned(caplog)) == ["ios", "shop"]

    (line,) = [r for r in caplog.records if r.name == LOGGER and getattr(r, "source", None) == "shop"]
    text = line.getMessage()
    assert line.levelno == logging.WARNING and "source 'shop'" in text
    assert "another person's user id or email" in text  # what is open
    assert "Set identity_secret" in text and "context.userHash" in text  # the fix
    for secret in (*KEYS.values(), SECRET):
        assert not _mentions(caplog.records, secret), "no line holds a write key or a secret"


async def test_a_server_source_a_verified_client_and_a_disabled_client_are_not_warned_about(
    nats_server, tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    quiet = [s for s in SOURCES if s["id"] in ("backend", "web", "kiosk")]
    async with _collector(nats_server, tmp_path, quiet) as (_, captured, _):
        assert _warned(caplog) == []
        assert _gauge(captured) == 0
    assert not [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


async def test_the_warning_and_gauge_follow_the_sources_file_as_it_changes(nats_server, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    async with _collector(nats_server, tmp_path, SOURCES) as (collector, captured, path):
        caplog.clear()

        _write(path, SOURCES)  # rewritten the same: not said again
        await _reread(collector)
        assert _warned(caplog) == [] and _gauge(captured) == 2

        # "shop" given a secret: it is closed; the file changed, so what is still open is said again.
        shop_verified = [{**s, "identity_secret": SECRET} if s["id"] == "shop" else s for s in SOURCES]
        _write(path, shop_verified)
        await _reread(collector)
        assert _warned(caplog) == ["ios"] and _gauge(captured) == 1
        caplog.clear()

        # "ios" turned off (every key of it): nothing open, nothing said.
        ios_off = [{**s, "enabled": False} if s["id"] == "ios" else s for s in shop_verified]
        _write(path, ios_off)
        await _reread(collector)
        assert _warned(caplog) == [] and _gauge(captured) == 0

        # A new browser source without a secret, and the disabled kiosk turned on: both said.
        opened = [{**s, "enabled": True} if s["id"] == "kiosk" else s for s in ios_off]
        opened.append({"id": "landing", "write_key": "wk_landing_open_0001", "kind": "client"})
        _write(path, opened)
        await _reread(collector)
        assert sorted(_warned(caplog)) == ["kiosk", "landing"] and _gauge(captured) == 2

    for secret in (*KEYS.values(), "wk_landing_open_0001", SECRET):
        assert not _mentions(caplog.records, secret), "no line holds a write key or a secret"
