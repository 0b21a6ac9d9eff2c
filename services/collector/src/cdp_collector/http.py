"""The Segment HTTP tracking API on aiohttp: /v1/batch, /v1/track, /v1/identify, /v1/alias, /v1/page,
/v1/screen, /v1/group — so Segment and RudderStack SDKs work unchanged with `host=` pointed here.

Answers (always JSON):
  200 {"success": true, "accepted": n, "duplicates": d, "suppressed": s}
      every event stored durably, except the `s` suppressed ones: their people asked to be deleted and
      suppressed. Segment answers suppressed users with success too, so SDKs do not retry them.
  400 {"success": false, "code": "invalid_events", "message": ..., "error": {...}, "accepted": k, "rejected": [...]}
      some events invalid: each is named with its field and reason; the valid ones *were* stored
  400 invalid JSON / gzip, 401 unknown write key, 408 a client too slow to send its request,
  413 over a Segment limit (the limit is named); a body longer than the limit can be is not read to its end
  429 / 503 with Retry-After when the bus is saturated / unreachable: nothing was stored by this call
      that a retry would not report as a duplicate

Every error answer carries `code` and `message` at the top level, which is where the Segment (2.4.0) and
RudderStack (2.1.9) Python SDKs read them (`payload["code"]`, `payload["message"]`; RudderStack's SDK
fails with a KeyError, and so retries, when they are missing), and again with the `field` at fault under
`error`. Both SDKs give up on a 4xx other than 429 (Segment's also retries 408) and retry 429 and 5xx:
so a bad write key or an invalid event is answered 4xx and never retried, and only "try again later"
(429, 503) is.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import zlib
from datetime import UTC, datetime

import orjson
from aiohttp import web

from cdp_collector.domain import Limits, RequestRejected, SuppressionList, check_request_bytes, parse_request
from cdp_collector.domain.limits import describe_bytes
from cdp_collector.ingest import Ingestor
from cdp_collector.sources import Source, SourceRegistry
from cdp_kit.errors import CdpError, ResourceExhausted, Unauthenticated, Unavailable

log = logging.getLogger("cdp.collector.http")

KINDS = ("batch", "track", "identify", "alias", "page", "screen", "group")


def error_response(
    status: int, code: str, message: str, *, field: str | None = None, headers=None, **extra
) -> web.Response:
    error = {"code": code, "message": message}
    if field:
        error["field"] = field
    body = {"success": False, "code": code, "message": message, "error": error, **extra}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


async def _close_after(response: web.Response, request: web.Request) -> web.Response:
    """Send `response`, then close the connection at once: aiohttp would otherwise keep reading the rest of
    an unread body for its lingering time, which is what a slow client is not to be given."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    if request.protocol is not None:
        request.protocol.force_close()
    return response


def _basic_write_key(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[0] or None


class SlowBody(Exception):
    """The client did not send its whole body within the body timeout."""


class BodyTooLong(Exception):
    """The body is (or is announced as) longer than any body within the limit can be: not read further."""


def read_ceiling(limits: Limits) -> int:
    """The most of a body the collector reads. A body within the limit is at most `max_batch_bytes` long
    as sent: gzip and deflate never make JSON longer (incompressible data grows by 5 bytes per 64 KB
    stored block, plus gzip's header and trailer), so 1% and 4 KB cover every real encoder. A longer body
    is refused when this much of it has arrived, or at once when its Content-Length says so: each request
    costs the internet-facing port about the limit in memory, not many times it."""
    return limits.max_batch_bytes + limits.max_batch_bytes // 100 + 4096


class HttpApi:
    def __init__(
        self,
        sources: SourceRegistry,
        ingestor: Ingestor,
        limits: Limits,
        suppression: SuppressionList,
        *,
        body_timeout: float = 30.0,
    ) -> None:
        self.sources = sources
        self.ingestor = ingestor
        self.limits = limits
        self.suppression = suppression
        self.body_timeout = body_timeout
        self.ready = False

    def app(self) -> web.Application:
        # The body limit is enforced by us on the *decompressed* size, with a clear error; aiohttp's own
        # limit stops the read of a body that cannot be within it (`read_ceiling`).
        app = web.Application(client_max_size=read_ceiling(self.limits), middlewares=[self._errors])
        for kind in KINDS:
            app.router.add_post(f"/v1/{kind}", self._handler(kind))
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_response(
                exc.status,
                exc.reason.lower().replace(" ", "_"),
                exc.text or exc.reason,
                headers={k: v for k, v in exc.headers.items() if k.lower() == "allow"},
            )
        except Exception:
            log.exception("unhandled error on %s", request.path)
            return error_response(500, "internal", "internal error")

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _request: web.Request) -> web.Response:
        bus_ok = self.ingestor.publisher.nc.is_connected
        ok = self.ready and bus_ok
        return web.json_response(
            {"ready": ok, "bus": "connected" if bus_ok else "disconnected"}, status=200 if ok else 503
        )

    async def _body(self, request: web.Request) -> bytes:
        if (request.content_length or 0) > read_ceiling(self.limits):
            raise BodyTooLong
        # A client trickling its body would otherwise hold a connection and a buffer for as long as it likes.
        try:
            async with asyncio.timeout(self.body_timeout):
                raw = await request.read()
        except TimeoutError:
            raise SlowBody from None
        except web.HTTPRequestEntityTooLarge:
            raise BodyTooLong from None
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if encoding in ("", "identity"):
            body = raw
        elif encoding in ("gzip", "x-gzip", "deflate"):
            # Decompress with a ceiling so a small bomb cannot cost more than the limit allows.
            wbits = 16 + zlib.MAX_WBITS if encoding != "deflate" else zlib.MAX_WBITS
            inflater = zlib.decompressobj(wbits)
            try:
                body = inflater.decompress(raw, self.limits.max_batch_bytes + 1)
                if len(body) > self.limits.max_batch_bytes:
                    # Stopped at the ceiling: the message says "over the limit", not a made-up size.
                    raise RequestRejected(
                        "request_too_large",
                        "",
                        f"request body is over {self.limits.max_batch_bytes} bytes after decompression; the limit is "
                        f"{self.limits.max_batch_bytes} bytes ({self.limits.max_batch_bytes // 1024} KB): "
                        "send fewer events per request",
                        status=413,
                    )
                if not inflater.eof:
                    raise RequestRejected("invalid_gzip", "", f"{encoding} body is truncated", status=400)
            except zlib.error as exc:
                raise RequestRejected("invalid_gzip", "", f"body is not valid {encoding}: {exc}", status=400) from None
        else:
            raise RequestRejected(
                "unsupported_encoding",
                "Content-Encoding",
                f"Content-Encoding {encoding!r} is not supported; use gzip or none",
                status=415,
            )
        too_large = check_request_bytes(len(body), self.limits)
        if too_large is not None:
            raise RequestRejected(too_large.code, too_large.field, too_large.message, status=413)
        return body

    async def _request_timeout(self, request: web.Request) -> web.Response:
        log.info("closed a connection that sent its body too slowly", extra={"transport": "http", "path": request.path})
        response = error_response(
            408,
            "request_timeout",
            f"the request body did not arrive within {self.body_timeout:g} seconds: nothing was stored; send it again",
        )
        return await _close_after(response, request)

    def _too_long(self) -> web.Response:
        # Answered before the rest of the body is read. aiohttp then reads and drops that rest for a few
        # seconds (its lingering), holding none of it, so a client still sending can finish and read this
        # answer: closed at once, it would see a reset connection, which SDKs retry.
        limit = describe_bytes(self.limits.max_batch_bytes)
        return error_response(
            413,
            "request_too_large",
            f"request body is longer than the limit of {limit} (after decompression) can be; nothing was "
            "stored: send fewer events per request",
        )

    def _handler(self, kind: str):
        async def handle(request: web.Request) -> web.Response:
            return await self._collect(kind, request)

        return handle

    async def _collect(self, kind: str, request: web.Request) -> web.Response:
        received_at = datetime.now(UTC)
        header_key = _basic_write_key(request.headers.get("Authorization"))
        source: Source | None = None
        try:
            if header_key is not None:
                source = self.sources.authenticate(header_key)
            body = await self._body(request)
            parsed = parse_request(
                kind, body, received_at=received_at, source_id=source.id if source else "", limits=self.limits
            )
            if source is None:
                # Segment also accepts the key in the body ("writeKey"); some SDKs send only that.
                source = self.sources.authenticate(parsed.write_key)
                parsed.assign_source(source.id)
        except Unauthenticated as exc:
            return error_response(401, "unauthorized", exc.message, headers={"WWW-Authenticate": 'Basic realm="cdp"'})
        except RequestRejected as exc:
            return error_response(exc.status or 400, str(exc.code), exc.message, field=exc.field)
        except SlowBody:
            return await self._request_timeout(request)
        except BodyTooLong:
            return self._too_long()
        valid = [e for e in parsed.events if e is not None]
        suppressed = 0
        if self.suppression:  # nobody suppressed (the common case): no event is even looked at
            kept = [e for e in valid if self.suppression.match(e) is None]
            suppressed, valid = len(valid) - len(kept), kept
        try:
            stored = await self.ingestor.store(valid)
        except ResourceExhausted as exc:
            return error_response(
                429, "rate_limited", exc.message, headers={"Retry-After": str(math.ceil(exc.retry_after))}
            )
        except Unavailable as exc:
            return error_response(
                503, "unavailable", exc.message, headers={"Retry-After": str(math.ceil(exc.retry_after))}
            )
        except CdpError as exc:
            return error_response(400, exc.reason, exc.message)
        duplicates = sum(1 for s in stored if s.duplicate)
        accepted = len(stored) - duplicates
        rejected = [
            {
                "index": index,
                "messageId": parsed.message_ids[index],
                "code": str(error.code),
                "field": error.field,
                "message": error.message,
            }
            for index, error in enumerate(parsed.errors)
            if error is not None
        ]
        self.ingestor.count(accepted, transport="http", source=source.id, outcome="accepted")
        self.ingestor.count(duplicates, transport="http", source=source.id, outcome="duplicate")
        self.ingestor.count(len(rejected), transport="http", source=source.id, outcome="rejected")
        self.ingestor.count(suppressed, transport="http", source=source.id, outcome="suppressed")
        if suppressed:
            log.info(
                "suppressed %d of %d events: their people asked to be deleted and suppressed",
                suppressed,
                len(parsed.events),
                extra={"transport": "http", "source": source.id},
            )
        if rejected:
            first = rejected[0]
            others = f"the other {len(stored)} were stored" + (
                f" and {suppressed} suppressed (privacy request)" if suppressed else ""
            )
            return error_response(
                400,
                "invalid_events",
                f"{len(rejected)} of {len(parsed.events)} events are invalid and were not stored "
                f"(first: {first['field']}: {first['message']}); {others}",
                field=first["field"],
                accepted=accepted,
                duplicates=duplicates,
                suppressed=suppressed,
                rejected=rejected,
            )
        return web.Response(
            body=orjson.dumps(
                {"success": True, "accepted": accepted, "duplicates": duplicates, "suppressed": suppressed}
            ),
            content_type="application/json",
        )


async def start_http(
    api: HttpApi, host: str, port: int, *, shutdown_grace: float = 10.0, header_timeout: float = 10.0
) -> tuple[web.AppRunner, int]:
    # auto_decompress off: we inflate ourselves, bounded, with a clear error on bad gzip.
    # keepalive_timeout is the header timeout: aiohttp closes a connection whose handler has been waiting
    # that long for a complete request head - counted from the connection's opening or its previous answer,
    # and not reset by partial data - so a client trickling its headers is cut off like an idle one.
    runner = web.AppRunner(
        api.app(),
        access_log=None,
        auto_decompress=False,
        handle_signals=False,
        shutdown_timeout=shutdown_grace,
        keepalive_timeout=header_timeout,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1] if site._server and site._server.sockets else port
    return runner, bound
