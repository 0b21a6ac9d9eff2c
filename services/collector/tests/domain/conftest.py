"""Fixtures that run the real Segment and RudderStack Python SDKs and capture the request bodies they would
POST, so the parser is tested on what is actually on the wire rather than on our idea of it."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from types import SimpleNamespace

import pytest


class _CapturingSession:
    """Stands in for the SDKs' `requests` session: keeps every POST, answers 200."""

    def __init__(self) -> None:
        self.requests: list[dict] = []

    def post(self, url: str, **kwargs: object) -> SimpleNamespace:
        headers = dict(kwargs.get("headers") or {})
        data = kwargs["data"]
        if isinstance(data, str):
            data = data.encode()
        if headers.get("Content-Encoding") == "gzip":
            data = gzip.decompress(data)  # what the HTTP layer does before calling parse_request
        self.requests.append({"url": url, "headers": headers, "body": data})
        return SimpleNamespace(status_code=200, json=dict, text="", reason="OK", headers={})


@pytest.fixture
def segment_sdk(monkeypatch: pytest.MonkeyPatch) -> Callable[[], tuple[object, _CapturingSession]]:
    """A segment-analytics-python Client in sync mode (one POST per call, no threads) and what it sent."""
    from segment.analytics import request
    from segment.analytics.client import Client

    def make() -> tuple[object, _CapturingSession]:
        session = _CapturingSession()
        monkeypatch.setattr(request, "_session", session)
        return Client("wk_segment_0123456789", host="http://collector.test", sync_mode=True), session

    return make


@pytest.fixture
def rudder_sdk(monkeypatch: pytest.MonkeyPatch) -> Callable[[], tuple[object, _CapturingSession]]:
    """A rudder-sdk-python Client in sync mode (gzip on, its default) and what it sent."""
    from rudderstack.analytics import request
    from rudderstack.analytics.client import Client

    def make() -> tuple[object, _CapturingSession]:
        session = _CapturingSession()
        monkeypatch.setattr(request, "_session", session)
        return Client("wk_rudder_0123456789", host="http://collector.test", sync_mode=True), session

    return make
