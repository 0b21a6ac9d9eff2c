"""What every CRM emulator shares: binding, TLS, the fault injector, the request log, inspection and snapshots.

An emulator is an aiohttp application with in-memory state. It binds 127.0.0.1 on a free port (or the one
given), optionally over TLS with a self-signed certificate made at start (clients that insist on https, like
simple-salesforce and msal, trust `ca_file`). Every request is kept in memory for inspection (method, path with
query, status; never bodies or headers) and logged by its route's template, method and status only
(`cdp_testing.channels.logs.AccessLog`): paths and bodies can hold personal data. Faults apply to API
requests only (never to ``/_emulator/`` or token endpoints), and only to those that `admit` (authentication
and the CRM's limits) let in, so a faulted request has been counted against the limits as the CRM counts it
on arrival (the local HubSpot does the same in its own outermost middleware):

- ``status``: answer the CRM's own error for that status (its 429 body and headers for 429) without
  touching state;
- ``timeout``: hold the request `seconds` and then answer 504 without touching state;
- ``drop``: run the request - the write commits - then drop the connection before the answer goes out;
- ``reject``: records matching a predicate get the CRM's per-record validation error.

The inspection API is available from Python (`records`, `requests`, `budget`) and over HTTP under
``/_emulator/`` for tests and `make up` running in other processes. With `snapshot` set, state is read
at start, written `save_within` seconds (5 by default) after a request that may have changed
it - to a temporary file renamed over the snapshot, so a crash leaves the previous one whole - and at close:
a `make up` restart keeps what the CRM holds, and a `kill -9` loses at most those last seconds. Each write is
the whole state, on the event loop: a short interval would cost a benchmark's 10,000 contacts CPU twice a
second.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import logging
import os
import ssl
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import orjson
from aiohttp import web

from cdp_testing.channels.logs import AccessLog

log = logging.getLogger("cdp_crm_emulators")

RecordPredicate = Callable[[str, dict[str, Any]], bool]


class Clock:
    """Wall time with an offset tests can advance, so windows and daily limits roll without sleeping."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def iso_z(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class Fault:
    kind: str  # "status" | "timeout" | "drop" | "pass" (none: a place in the queue)
    status: int = 503
    seconds: float = 30.0


@dataclass
class Rejection:
    predicate: RecordPredicate
    message: str
    remaining: int | None  # None: every matching record until cleared


class FaultInjector:
    """Queued faults for the next API requests, and record rejections by predicate."""

    def __init__(self) -> None:
        self.pending: list[Fault] = []
        self.rejections: list[Rejection] = []

    def fail_next(self, n: int = 1, *, status: int = 503) -> None:
        self.pending.extend(Fault("status", status=status) for _ in range(n))

    def throttle_next(self, n: int = 1) -> None:
        self.fail_next(n, status=429)

    def timeout_next(self, n: int = 1, *, seconds: float = 30.0) -> None:
        self.pending.extend(Fault("timeout", seconds=seconds) for _ in range(n))

    def hold_after(self, passing: int, *, seconds: float = 30.0, held: int = 1000) -> None:
        """Let the next `passing` API requests through, then keep each of the `held` after them waiting
        `seconds` before a 504 (nothing done): requests a client is still waiting on, whenever it looks."""
        self.pending.extend(Fault("pass") for _ in range(passing))
        self.timeout_next(held, seconds=seconds)

    def drop_after_commit_next(self, n: int = 1) -> None:
        self.pending.extend(Fault("drop") for _ in range(n))

    def reject(
        self, predicate: RecordPredicate, *, message: str = "rejected by fault injection", times: int | None = None
    ) -> None:
        self.rejections.append(Rejection(predicate, message, times))

    def rejection_for(self, obj: str, record: dict[str, Any]) -> str | None:
        for rejection in self.rejections:
            if rejection.remaining != 0 and rejection.predicate(obj, record):
                if rejection.remaining is not None:
                    rejection.remaining -= 1
                return rejection.message
        return None

    def clear(self) -> None:
        self.pending.clear()
        self.rejections.clear()

    def take(self) -> Fault | None:
        return self.pending.pop(0) if self.pending else None


@dataclass
class LoggedRequest:
    method: str
    path: str
    status: int = 0
    at: float = 0.0
    faulted: str | None = None


@dataclass
class Records:
    """Records by object with unique indexes, so upserts by external id stay O(1) for million-row backfills."""

    unique_fields: dict[str, tuple[str, ...]]
    objects: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    _index: dict[tuple[str, str], dict[Any, str]] = field(default_factory=dict)

    def table(self, obj: str) -> dict[str, dict[str, Any]]:
        return self.objects.setdefault(obj, {})

    def get(self, obj: str, record_id: str) -> dict[str, Any] | None:
        return self.objects.get(obj, {}).get(record_id)

    def find(self, obj: str, fld: str, value: Any) -> str | None:
        if fld in self.unique_fields.get(obj, ()):
            return self._index.get((obj, fld), {}).get(_key(value))
        for record_id, record in self.objects.get(obj, {}).items():
            if record.get(fld) == value:
                return record_id
        return None

    def put(self, obj: str, record_id: str, record: dict[str, Any]) -> None:
        old = self.objects.get(obj, {}).get(record_id)
        for fld in self.unique_fields.get(obj, ()):
            index = self._index.setdefault((obj, fld), {})
            if old is not None and old.get(fld) not in (None, ""):
                index.pop(_key(old[fld]), None)
            if record.get(fld) not in (None, ""):
                index[_key(record[fld])] = record_id
        self.table(obj)[record_id] = record

    def delete(self, obj: str, record_id: str) -> dict[str, Any] | None:
        old = self.objects.get(obj, {}).pop(record_id, None)
        if old is not None:
            for fld in self.unique_fields.get(obj, ()):
                if old.get(fld) not in (None, ""):
                    self._index.get((obj, fld), {}).pop(_key(old[fld]), None)
        return old

    def copy_state(self) -> dict[str, dict[str, dict[str, Any]]]:
        return {obj: {rid: dict(rec) for rid, rec in table.items()} for obj, table in self.objects.items()}

    def restore(self, objects: dict[str, dict[str, dict[str, Any]]]) -> None:
        self.objects = {}
        self._index = {}
        for obj, table in objects.items():
            self.table(obj)
            for record_id, record in table.items():
                self.put(obj, record_id, record)


def _key(value: Any) -> Any:
    # Emails and external ids match case-insensitively in every one of these CRMs.
    return value.lower() if isinstance(value, str) else value


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, headers=headers, content_type="application/json")


class Emulator:
    """Base class: subclasses add routes in `__init__` and implement the CRM-specific hooks."""

    name = "crm"

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: bool = False,
        snapshot: str | Path | None = None,
        clock: Clock | None = None,
        save_within: float = 5.0,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.snapshot = Path(snapshot) if snapshot else None
        self.save_within = save_within
        self._changed: asyncio.Event | None = None  # set by a request that may have changed state
        self._saver: asyncio.Task[None] | None = None
        self.clock = clock or Clock()
        self.faults = FaultInjector()
        # Bounded: a million-record backfill must not grow the log without end.
        self.requests: deque[LoggedRequest] = deque(maxlen=100_000)
        self.ca_file: str | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._runner: web.AppRunner | None = None
        self.app = web.Application(middlewares=[self._middleware], client_max_size=256 * 1024 * 1024)
        self.app.router.add_get("/_emulator/records/{object}", self._inspect_records)
        self.app.router.add_get("/_emulator/requests", self._inspect_requests)
        self.app.router.add_get("/_emulator/budget", self._inspect_budget)
        self.app.router.add_post("/_emulator/faults", self._inspect_faults)

    # --- hooks -----------------------------------------------------------------------------------

    def is_api(self, request: web.Request) -> bool:
        """True for requests that count against limits and take faults (not token or inspection)."""
        return not request.path.startswith("/_emulator/")

    def admit(self, request: web.Request) -> web.StreamResponse | None:
        """Authentication and the CRM's limits for an API request, before the fault injector: None lets the
        request in, counted; a response refuses it, changing nothing and counting nothing more. The CRM counts
        a request when it arrives, so one that then meets an injected fault (a 5xx, a 429, a timeout, a
        dropped connection) has been counted, as it would have been there."""
        return None

    def error_response(self, status: int, request: web.Request) -> web.Response:
        """The CRM's own answer for an injected status (429s carry its rate-limit body and headers)."""
        return json_response({"message": "injected fault"}, status=status)

    def budget(self) -> dict[str, Any]:
        return {}

    def state(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def records(self, obj: str) -> list[dict[str, Any]]:
        raise NotImplementedError

    # --- lifecycle -------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    async def start(self) -> Self:
        if self.snapshot is not None and self.snapshot.exists():
            self.load_state(orjson.loads(self.snapshot.read_bytes()))
        context = self._ssl_context() if self.tls else None
        self._runner = web.AppRunner(
            self.app,
            access_log_class=AccessLog,
            access_log=logging.getLogger(f"cdp_crm_emulators.{self.name}"),
            handler_cancellation=True,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        if self.snapshot is not None:
            self._changed = asyncio.Event()
            self._saver = asyncio.create_task(self._save_soon(self._changed))
        return self

    async def _save_soon(self, changed: asyncio.Event) -> None:
        """Write the snapshot `save_within` seconds after a change, however many changes came meanwhile."""
        while True:
            await changed.wait()
            await asyncio.sleep(self.save_within)
            changed.clear()
            try:
                self.save()
            except OSError as exc:  # a full disk: the next change tries again, as does close
                log.warning("emulator snapshot not written", extra={"error": type(exc).__name__})

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._saver is not None:
            self._saver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._saver
            self._saver = None
        self.save()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def save(self) -> None:
        if self.snapshot is None:
            return
        # Write then rename: a crash mid-write leaves the previous snapshot, never half of one.
        tmp = self.snapshot.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(self.state()))
        os.replace(tmp, self.snapshot)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _ssl_context(self) -> ssl.SSLContext:
        cert, key = self_signed_certificate(self.host)
        self._tmp = tempfile.TemporaryDirectory(prefix=f"cdp-{self.name}-tls-")
        cert_path = Path(self._tmp.name) / "cert.pem"
        key_path = Path(self._tmp.name) / "key.pem"
        cert_path.write_bytes(cert)
        key_path.write_bytes(key)
        self.ca_file = str(cert_path)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_path, key_path)
        return context

    # --- middleware ------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        logged = LoggedRequest(request.method, request.path_qs, at=self.clock())
        self.requests.append(logged)
        api = self.is_api(request)
        if api and (refused := self.admit(request)) is not None:
            logged.status = refused.status
            return refused
        fault = self.faults.take() if api else None
        if fault is not None and fault.kind == "pass":
            fault = None
        if fault is not None:
            logged.faulted = fault.kind
        if fault is not None and fault.kind == "status":
            response = self.error_response(fault.status, request)
            logged.status = response.status
            return response
        if fault is not None and fault.kind == "timeout":
            await asyncio.sleep(fault.seconds)
            logged.status = 504
            return web.Response(status=504, text="gateway timeout")
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            logged.status = exc.status
            raise
        finally:
            if self._changed is not None and not (request.method == "GET" and not api):
                self._changed.set()  # it may have changed state (a read too: a Bulk job's progress)
        logged.status = response.status
        if fault is not None and fault.kind == "drop" and request.transport is not None:
            # The write has committed; the client never hears about it.
            request.transport.abort()
            raise asyncio.CancelledError
        return response

    # --- inspection over HTTP --------------------------------------------------------------------

    async def _inspect_records(self, request: web.Request) -> web.Response:
        return json_response(self.records(request.match_info["object"]))

    async def _inspect_requests(self, request: web.Request) -> web.Response:
        return json_response([r.__dict__ for r in self.requests])

    async def _inspect_budget(self, request: web.Request) -> web.Response:
        return json_response(self.budget())

    async def _inspect_faults(self, request: web.Request) -> web.Response:
        """``{"kind": "status"|"timeout"|"drop"|"reject"|"clear", "n": 1, "status": 503, "seconds": 30}``.

        ``reject`` takes ``"field"`` and ``"value"`` (and optionally ``"object"``, ``"message"``, ``"times"``):
        records whose field equals the value are rejected, for tests driving the emulator from another process.
        """
        body = await request.json()
        kind, n = body.get("kind"), int(body.get("n", 1))
        if kind == "status":
            self.faults.fail_next(n, status=int(body.get("status", 503)))
        elif kind == "timeout":
            self.faults.timeout_next(n, seconds=float(body.get("seconds", 30)))
        elif kind == "drop":
            self.faults.drop_after_commit_next(n)
        elif kind == "reject":
            fld, value, obj = body.get("field"), body.get("value"), body.get("object")
            if not fld:
                return json_response({"error": "reject needs field and value"}, status=400)
            self.faults.reject(
                lambda o, record: (obj is None or o == obj) and record.get(fld) == value,
                message=str(body.get("message", "rejected by fault injection")),
                times=body.get("times"),
            )
        elif kind == "clear":
            self.faults.clear()
        else:
            return json_response({"error": "kind must be status, timeout, drop, reject or clear"}, status=400)
        return json_response({"pending": len(self.faults.pending)})


def new_id() -> str:
    return uuid.uuid4().hex


def self_signed_certificate(host: str) -> tuple[bytes, bytes]:
    """A certificate for `host`, localhost and 127.0.0.1, valid a day: PEM certificate and key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    alt_names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    try:
        alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        alt_names.append(x509.DNSName(host))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(list(dict.fromkeys(alt_names))), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
