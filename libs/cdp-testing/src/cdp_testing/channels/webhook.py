"""A local webhook receiver that verifies signatures and fails on demand.

It accepts ``POST`` on any path. With a `secret` it checks what a careful receiver checks: the
``X-CDP-Timestamp`` is within `tolerance` seconds of now and ``X-CDP-Signature`` is ``v2=`` + the hex
HMAC-SHA256 of ``<timestamp>.POST <its own origin><request target>.<raw body>`` (401 otherwise). The
origin is one of its own (``http://<host>:<its port>`` for each of `hosts`: by default the address it
listens on, and ``localhost`` beside ``127.0.0.1``), never the request's Host header, which whoever posts the request sets: a request signed
for another URL (a receiver elsewhere that forwards what it got) is refused, and so is a ``v1=``
signature, which names no destination. It honours ``Idempotency-Key``: a key it has already processed
gets the first answer again and is not recorded twice (`replays` counts those).

`fail_next(n, status, retry_after)` answers the next n requests with that status (and Retry-After);
`stall_next(n, seconds)` holds the next n requests that long before answering (for timeouts). With
``slack=True`` it behaves like a Slack incoming webhook: the body must be JSON with ``text`` or
``blocks`` (400 ``no_text`` / ``invalid_payload``), and the answer is the text ``ok``.

``GET /_deliveries`` lists what it accepted, oldest first (path, idempotency key, the time it arrived, the
JSON body), so a test or a person can see what arrived when it runs in another process (`make up`'s
``channels`` companion); nothing else is served on GET.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from cdp_testing.channels._http import HttpFake


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any
    received_at: float = 0.0  # epoch seconds, when the request was accepted


class LocalWebhookReceiver(HttpFake):
    def __init__(
        self,
        *,
        secret: str | None = None,
        slack: bool = False,
        tolerance: float = 300.0,
        hosts: tuple[str, ...] | None = None,
        **kwargs: Any,
    ):
        """`hosts` are the names its URLs were given out under; None: the address it listens on."""
        super().__init__(**kwargs)
        self._hosts = hosts
        self.secret = secret
        self.slack = slack
        self.tolerance = tolerance
        self.deliveries: list[Delivery] = []
        self.attempts = 0
        self.replays = 0
        self.refused_signatures = 0
        self._failures: list[tuple[int, str | None]] = []
        self._stalls: list[float] = []
        self._processed: dict[str, tuple[int, str]] = {}
        self.app.router.add_get("/_deliveries", self._list)
        self.app.router.add_post("/{path:.*}", self._receive)

    def fail_next(self, n: int = 1, *, status: int = 503, retry_after: str | None = None) -> None:
        self._failures.extend([(status, retry_after)] * n)

    def stall_next(self, n: int = 1, *, seconds: float = 5.0) -> None:
        self._stalls.extend([seconds] * n)

    def url(self, path: str = "hooks/cdp") -> str:
        return f"{self.base_url}/{path}"

    async def _list(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            [
                {
                    "path": d.path,
                    "idempotency_key": d.headers.get("Idempotency-Key"),
                    "received_at": d.received_at,
                    "json": d.json,
                }
                for d in self.deliveries
            ]
        )

    @property
    def origins(self) -> tuple[str, ...]:
        names = self._hosts or ((self.host, "localhost") if self.host == "127.0.0.1" else (self.host,))
        return tuple(f"http://{name}:{self.port}" for name in names)

    def _signed(self, request: web.Request, body: bytes) -> bool:
        timestamp = request.headers.get("X-CDP-Timestamp", "")
        signature = request.headers.get("X-CDP-Signature", "")
        if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > self.tolerance:
            return False
        for origin in self.origins:
            signed = f"{timestamp}.POST {origin}{request.raw_path}.".encode() + body
            expected = hmac.new(self.secret.encode(), signed, hashlib.sha256).hexdigest()  # type: ignore[union-attr]
            if hmac.compare_digest("v2=" + expected, signature):
                return True
        return False

    async def _receive(self, request: web.Request) -> web.StreamResponse:
        self.attempts += 1
        body = await request.read()
        if self._stalls:
            await asyncio.sleep(self._stalls.pop(0))
        if self._failures:
            status, retry_after = self._failures.pop(0)
            headers = {"Retry-After": retry_after} if retry_after is not None else {}
            return web.Response(status=status, text="try later", headers=headers)
        if self.secret is not None and not self._signed(request, body):
            self.refused_signatures += 1
            return web.Response(status=401, text="bad signature")
        key = request.headers.get("Idempotency-Key")
        if key is not None and key in self._processed:
            self.replays += 1
            status, text = self._processed[key]
            return web.Response(status=status, text=text)
        try:
            payload = json.loads(body)
        except ValueError:
            return web.Response(status=400, text="invalid_payload")
        if self.slack and not (isinstance(payload, dict) and (payload.get("text") or payload.get("blocks"))):
            return web.Response(status=400, text="no_text")
        self.deliveries.append(Delivery(request.path, dict(request.headers), body, payload, time.time()))
        answer = (200, "ok")
        if key is not None:
            self._processed[key] = answer
        return web.Response(status=answer[0], text=answer[1])
