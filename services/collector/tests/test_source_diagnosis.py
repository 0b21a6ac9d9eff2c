"""A support engineer can tell from the collector's logs and metrics why a source's events stopped: a
disabled source is named (its id: configuration, not personal data) in a rate-limited WARNING and in
`cdp.collector.write_key.refused`, over HTTP and gRPC alike, while a key no source has stays unnamed and the
key itself is never logged; every change to the sources file is logged by source id when it is re-read;
and a request over a source's `max_batch` is logged and answered with what the client must do (split its
batches), not "until it slows down".

A real collector and nats-server, real HTTP and gRPC (test_source_limits.py's helpers)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from cdp_collector.sources import SourceRegistry

from .test_source_limits import APP_KEY, WRITE_KEY, batch, collect, limited_collector, post

UNKNOWN_KEY = "wk_nobody_5e1f0a9c"
IOS_KEY = "wk_ios_7c1d2e3f4a5b6c7d"
SECRET = "s3cr3t-identity-hmac-key"


def _mentions(records: list[logging.LogRecord], text: str) -> bool:
    return any(text in r.getMessage() or text in json.dumps(r.__dict__, default=str) for r in records)


def _refused(run) -> dict[tuple[str, str, str | None], int]:
    """cdp.collector.write_key.refused as (transport, reason, source or None) -> requests."""
    points = run.captured.collected().get("cdp.collector.write_key.refused", ("", []))[1]
    return {(p.attributes["transport"], p.attributes["reason"], p.attributes.get("source")): p.value for p in points}


def _error_info_reason(error: grpc.aio.AioRpcError) -> str:
    (packed,) = [d for d in rpc_status.from_call(error).details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    info = error_details_pb2.ErrorInfo()
    packed.Unpack(info)
    return info.reason


def _disable_app(path: Path) -> None:
    before = path.stat().st_mtime_ns
    document = json.loads(path.read_text())
    for entry in document["sources"]:
        if entry["id"] == "app":
            entry["enabled"] = False
    path.write_text(json.dumps(document))
    if path.stat().st_mtime_ns <= before:
        os.utime(path, ns=(before + 1_000_000, before + 1_000_000))


async def test_a_disabled_source_is_named_in_a_warning_and_the_metric_an_unknown_key_is_not_over_http(
    nats_server, tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    async with limited_collector(nats_server, tmp_path, None) as run:
        _disable_app(run.sources)
        for _ in range(3):
            status, reply, _ = await post(run.collector, batch("d", 1), APP_KEY)
            assert status == 401 and "source 'app' is disabled" in reply["message"]
            assert (reply["code"], reply["error"]["reason"]) == ("unauthorized", "source_disabled")
        status, reply, _ = await post(run.collector, batch("u", 1), UNKNOWN_KEY)
        assert status == 401 and reply["message"].startswith("unknown write key")
        assert (reply["code"], reply["error"]["reason"]) == ("unauthorized", "unknown_key")
        status, _, _ = await post(run.collector, batch("m", 1), None)
        assert status == 401
        assert _refused(run) == {
            ("http", "source_disabled", "app"): 3,
            ("http", "unknown_key", None): 1,
            ("http", "missing_key", None): 1,
        }
        http_lines = [r for r in caplog.records if r.name == "cdp.collector.http"]
        # The route's refusal line says which kind of 401 it was, not only "401 unauthorized".
        assert http_lines[0].reason == "401 source_disabled"

    said = [r for r in caplog.records if r.name == "cdp.collector.sources" and getattr(r, "source", None) == "app"]
    assert len(said) == 1  # the first at once, the others counted for the minute's summary
    assert said[0].levelno == logging.WARNING and "'app'" in said[0].getMessage()
    assert "disabled" in said[0].getMessage() and said[0].transport == "http"
    assert not any(getattr(r, "source", None) not in (None, "app") for r in caplog.records)
    assert not _mentions(caplog.records, APP_KEY) and not _mentions(caplog.records, UNKNOWN_KEY)


async def test_a_disabled_source_is_named_alike_over_grpc_and_the_rejection_line_says_which_401(
    nats_server, tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    async with limited_collector(nats_server, tmp_path, None) as run:
        _disable_app(run.sources)
        reasons = []
        for key in (APP_KEY, UNKNOWN_KEY):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await collect(run.collector, key, "g", 1)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reasons.append(_error_info_reason(caught.value))
        assert reasons == ["source_disabled", "unknown_key"]  # the client's machine-readable why
        assert _refused(run) == {("grpc", "source_disabled", "app"): 1, ("grpc", "unknown_key", None): 1}

    said = [r for r in caplog.records if r.name == "cdp.collector.sources" and getattr(r, "source", None) == "app"]
    assert len(said) == 1 and said[0].levelno == logging.WARNING and said[0].transport == "grpc"
    rejected = [r for r in caplog.records if r.name == "cdp.grpc" and r.getMessage() == "grpc call rejected"]
    assert [r.reason for r in rejected] == ["source_disabled", "unknown_key"]
    assert not _mentions(caplog.records, APP_KEY) and not _mentions(caplog.records, UNKNOWN_KEY)


def _write(path: Path, sources: list[dict]) -> None:
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(json.dumps({"sources": sources}))
    if path.stat().st_mtime_ns <= before:
        os.utime(path, ns=(before + 1_000_000, before + 1_000_000))


def test_each_change_to_the_sources_file_is_logged_by_source_id_never_a_key_or_secret(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    path = tmp_path / "sources.json"
    web = {"id": "web", "write_key": WRITE_KEY}
    ios = {"id": "ios", "write_key": IOS_KEY, "kind": "client", "identity_secret": SECRET}
    app = {"id": "app", "write_key": APP_KEY, "limits": {"events_per_second": 50}}
    _write(path, [web, ios, app])
    registry = SourceRegistry(path)
    started = [r for r in caplog.records if r.name == "cdp.collector.sources"]
    assert len(started) == 1 and started[0].levelno == logging.INFO and started[0].sources == ["app", "ios", "web"]
    caplog.clear()

    # This morning: the iOS app's key turned off, the app's limits changed, a new source, web's key rotated.
    _write(
        path,
        [
            {"id": "web", "write_key": "wk_web_rotated_00000001"},
            {**ios, "enabled": False},
            {**app, "limits": {"events_per_second": 5}},
            {"id": "crm", "write_key": "wk_crm_0000000000000001"},
        ],
    )
    assert len(registry) == 4  # read at the next request
    (line,) = [r for r in caplog.records if r.name == "cdp.collector.sources"]
    assert line.levelno == logging.INFO
    text = line.getMessage()
    assert "source 'ios' disabled" in text
    assert "source 'crm' added" in text
    assert "source 'app' limits changed" in text and "50" in text and "5 events per second" in text
    assert "source 'web': 1 key added, 1 key removed" in text
    assert line.changes == {
        "added": ["crm"],
        "removed": [],
        "disabled": ["ios"],
        "enabled": [],
        "keys_changed": ["web"],
        "settings_changed": ["app"],
    }
    for secret in (IOS_KEY, APP_KEY, WRITE_KEY, "wk_web_rotated_00000001", "wk_crm_0000000000000001", SECRET):
        assert not _mentions(caplog.records, secret)
    caplog.clear()

    _write(path, [web])  # sources removed, the old web key back
    registry.authenticate(WRITE_KEY)
    (line,) = [r for r in caplog.records if r.name == "cdp.collector.sources"]
    assert "source 'ios' removed" in line.getMessage() and line.changes["removed"] == ["app", "crm", "ios"]
    caplog.clear()

    _write(path, [web, {**ios, "enabled": True}])  # the iOS source back: added, and said enabled
    registry.authenticate(IOS_KEY)
    (line,) = [r for r in caplog.records if r.name == "cdp.collector.sources"]
    assert line.changes["added"] == ["ios"] and "source 'ios' added" in line.getMessage()
    caplog.clear()

    _write(path, [web, {**ios, "identity_secret": SECRET + "-new"}])  # a secret changed: said, never shown
    registry.authenticate(IOS_KEY)
    (line,) = [r for r in caplog.records if r.name == "cdp.collector.sources"]
    assert "source 'ios' identity_secret changed" in line.getMessage()
    assert not _mentions(caplog.records, SECRET)
    caplog.clear()

    _write(path, [web, {**ios, "identity_secret": SECRET + "-new"}])  # rewritten the same: nothing at INFO
    registry.authenticate(IOS_KEY)
    assert not [r for r in caplog.records if r.name == "cdp.collector.sources" and r.levelno >= logging.INFO]


async def test_over_max_batch_the_log_and_the_answer_say_the_client_must_split_its_batches(
    nats_server, tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    async with limited_collector(nats_server, tmp_path, {"max_batch": 3}) as run:
        status, reply, _ = await post(run.collector, batch("x", 4), APP_KEY)
        assert status == 400 and reply["code"] == "too_many_events"
        message = reply["message"]
        assert "nothing of it was stored" in message
        assert "split it into requests of at most 3 events" in message
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collect(run.collector, APP_KEY, "y", 4)
        assert "split it into requests of at most 3 events" in caught.value.details()

    said = [r for r in caplog.records if r.name == "cdp.collector.limits"]
    assert said and said[0].levelno == logging.WARNING and said[0].limit == "max_batch"
    text = said[0].getMessage()
    assert "slows down" not in text
    assert "max_batch of 3 events" in text and "split" in text
    assert not _mentions(said, APP_KEY)
