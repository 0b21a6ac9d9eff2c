"""The Segment HTTP tracking API on aiohttp: /v1/batch, /v1/track, /v1/identify, /v1/alias, /v1/page,
/v1/screen, /v1/group, and the paths Segment's own SDKs post to (PATHS: /v1/t … /v1/b, /v1/import) — so
Segment and RudderStack SDKs work unchanged with `host=` pointed here; GET /v1/projects/<key>/settings
gives analytics.js and the mobile SDKs settings that send them here.

Answers (always JSON):
  200 {"success": true, "accepted": n, "duplicates": d, "suppressed": s}
      every event stored durably, except the `s` suppressed ones: their people asked to be deleted and
      suppressed. Segment answers suppressed users with success too, so SDKs do not retry them.
  400 {"success": false, "code": "invalid_events", "message": ..., "error": {...}, "accepted": k, "rejected": [...]}
      some events invalid: each is named with its field and reason; the valid ones *were* stored
  400 invalid JSON / gzip (and gzip with anything after its end), 401 a write key missing, unknown or of
  a disabled source (`error.reason`: `missing_key`, `unknown_key`, `source_disabled`), 408 a client too
  slow to send its request, 413 over a Segment limit (the limit is named); a body longer than the limit
  can be is not read to its end; 415 a Content-Encoding other than gzip/deflate, or more than one
  429 / 503 with Retry-After when the bus is saturated / unreachable: nothing was stored by this call
      that a retry would not report as a duplicate
  429 `source_rate_limited` with Retry-After, and the limit under `limit`, when the source sends faster
      than its events_per_second (source_limits.py): nothing of the request was stored; 400
      `too_many_events` over the source's max_batch, as over the collector's own count limit
  503 `busy` with Retry-After, before the body is read, when the bodies being received at once would go
      over CDP_COLLECTOR_HTTP_BODY_BUDGET_BYTES (BodyBudget); a connection past the collector's caps is
      answered 503 / 429 `too_many_connections` without reaching this code (connections.py)

Every error answer carries `code` and `message` at the top level, which is where the Segment (2.4.0) and
RudderStack (2.1.9) Python SDKs read them (`payload["code"]`, `payload["message"]`; RudderStack's SDK
fails with a KeyError, and so retries, when they are missing), and again with the `field` at fault under
`error`. Both SDKs give up on a 4xx other than 429 (Segment's also retries 408) and retry 429 and 5xx:
so a bad write key or an invalid event is answered 4xx and never retried, and only "try again later"
(429, 503) is.

The write key is checked before any event is: from the Authorization header before the body is read, or,
when only the body carries it (`writeKey`), after the body is decoded and before its events are
converted and validated (domain/decode.py): a body with a wrong key costs a gunzip and a JSON decode, not
the validation of up to 2,500 events. A client that goes away mid-body gets no answer and is no error:
it is counted (abandoned.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import math
import time
import zlib
from datetime import UTC, datetime

import orjson
from aiohttp import web

from cdp_collector.abandoned import GONE, AbandonedRequests, EveryMinute
from cdp_collector.body_budget import DEFAULT_BODY_BUDGET, BodyBudget
from cdp_collector.connections import (
    RETRY_AFTER,
    ConnectionGate,
    ConnectionLimits,
    GatedSite,
    default_max_connections,
)
from cdp_collector.domain import (
    Limits,
    RequestRejected,
    SuppressionList,
    check_event_count,
    check_request_bytes,
    decode_body,
    parse_decoded,
)
from cdp_collector.domain.limits import describe_bytes
from cdp_collector.ingest import Ingestor
from cdp_collector.key_refusals import KeyRefusals
from cdp_collector.source_limits import SourceLimited, SourceLimiter
from cdp_collector.sources import KeyRefused, SourceRegistry
from cdp_kit.errors import CdpError, ResourceExhausted, Unauthenticated, Unavailable
from cdp_kit.telemetry import Telemetry

log = logging.getLogger("cdp.collector.http")

KINDS = ("batch", "track", "identify", "alias", "page", "screen", "group")
#: Every path under /v1/ events are posted to, and the endpoint it is: Segment's documented ones, and the
#: ones Segment's own SDKs post to. analytics.js (analytics-next) posts each call to the first letter of
#: its type (`/v1/t`, …) and its batching dispatcher to `/v1/b`; analytics-kotlin and analytics-swift post
#: their batches to `/v1/b`; analytics-ruby to `/v1/import`. Each is served exactly as its endpoint is
#: (same key check, limits, answers); metrics and logs name the path as requested (`route="/v1/t"`).
PATHS = {
    **{kind: kind for kind in KINDS},
    "t": "track",
    "i": "identify",
    "p": "page",
    "s": "screen",
    "g": "group",
    "a": "alias",
    "b": "batch",
    "import": "batch",
}
#: The paths only Segment's client-side SDKs (browser, mobile) post to.
CLIENT_PATHS = frozenset({"t", "i", "p", "s", "g", "a", "b"})


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted_networks(entries: tuple[str, ...]) -> tuple[Network, ...]:
    """CDP_COLLECTOR_TRUSTED_PROXIES: addresses or networks; ValueError naming the entry that is neither."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{entry.strip()!r} is not an IP address or network (e.g. 10.0.0.0/8)") from None
    return tuple(networks)


def _address(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not text:
        return None
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [2001:db8::1]:443
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # 203.0.113.7:51234
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:  # a dual-stack socket's IPv4 peer
        return address.ipv4_mapped
    return address


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    field: str | None = None,
    reason: str | None = None,
    headers=None,
    **extra,
) -> web.Response:
    """`reason`, under `error`, refines `code` (a 401's `unknown_key`, `source_disabled`): the refusal log
    names it in the code's place."""
    error = {"code": code, "message": message}
    if field:
        error["field"] = field
    if reason:
        error["reason"] = reason
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


class ClientGone(Exception):
    """The client reset or closed its connection before its whole body arrived: nobody to answer."""


class Busy(Exception):
    """The bodies being received at once leave no room for this one: refused before it is read."""


def read_ceiling(limits: Limits) -> int:
    """The most of a body the collector reads. A body within the limit is at most `max_batch_bytes` long
    as sent: gzip and deflate never make JSON longer (incompressible data grows by 5 bytes per 64 KB
    stored block, plus gzip's header and trailer), so 1% and 4 KB cover every real encoder. A longer body
    is refused when this much of it has arrived, or at once when its Content-Length says so: each request
    costs the internet-facing port about the limit in memory, not many times it."""
    return body_ceiling(limits.max_batch_bytes)


def body_ceiling(max_batch_bytes: int) -> int:
    """read_ceiling for a decompressed limit of `max_batch_bytes`."""
    return max_batch_bytes + max_batch_bytes // 100 + 4096


class HttpApi:
    def __init__(
        self,
        sources: SourceRegistry,
        ingestor: Ingestor,
        limits: Limits,
        suppression: SuppressionList,
        *,
        telemetry: Telemetry,
        body_timeout: float = 30.0,
        body_budget: int = DEFAULT_BODY_BUDGET,
        cors_origins: tuple[str, ...] = ("*",),
        limiter: SourceLimiter | None = None,
        key_refusals: KeyRefusals | None = None,
        fill_context_ip: bool = True,
        trusted_proxies: tuple[str, ...] = (),
    ) -> None:
        self.sources = sources
        self.fill_context_ip = fill_context_ip
        self.trusted_proxies = trusted_networks(trusted_proxies)
        # Each source's own limits; shared with the gRPC front door (one bucket a source for both).
        self.limiter = limiter or SourceLimiter(telemetry)
        # Refused write keys, by why and (a disabled source) which; shared with the gRPC front door.
        self.key_refusals = key_refusals or KeyRefusals(telemetry)
        self.ingestor = ingestor
        self.limits = limits
        self.suppression = suppression
        self.body_timeout = body_timeout
        self.telemetry = telemetry
        self.abandoned = AbandonedRequests(log, telemetry)
        self.bodies = BodyBudget(body_budget, telemetry, log)
        self.ready = False
        self.cors_origins = frozenset(cors_origins)
        self.duration = telemetry.meter.create_histogram(
            "cdp.collector.http.duration",
            unit="ms",
            description="HTTP API requests answered, by route (the endpoint, or 'other') and status",
        )
        # Refusals (a wrong write key, bad input, 429/503 while the bus is away) said in the log by status
        # and reason, at most a line a minute: a misconfigured client sends thousands.
        self.refusals = EveryMinute(
            log,
            first="http request refused",
            summary="%d http requests refused in the last minute",
            unit="requests",
        )

    def app(self) -> web.Application:
        # The body limit is enforced by us on the *decompressed* size, with a clear error; aiohttp's own
        # limit stops the read of a body that cannot be within it (`read_ceiling`).
        app = web.Application(
            client_max_size=read_ceiling(self.limits), middlewares=[self._observed, self._cors, self._errors]
        )
        for path, kind in PATHS.items():
            app.router.add_post(f"/v1/{path}", self._handler(kind, path))
        app.router.add_get("/v1/projects/{write_key}/settings", self._sdk_settings, name="sdk_settings")
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _cleanup(self, _app: web.Application) -> None:
        self.bodies.report.close()
        self.refusals.close()
        self.limiter.close()
        self.key_refusals.close()

    @web.middleware
    async def _observed(self, request: web.Request, handler):
        """Every answer timed by route and status (`cdp.collector.http.duration`), and a refusal said in
        the log by status and the error's code (never the value that failed): an on-call trial found 401s,
        400s and the 503s of a bus outage in no log line and no metric by status."""
        started = time.perf_counter()
        response = await handler(request)
        path = request.path.removeprefix("/v1/")
        if request.path in ("/healthz", "/readyz") or path in PATHS:
            route = request.path
        elif request.match_info.route.name == "sdk_settings":
            route = "/v1/projects/{write_key}/settings"  # the key is not a label value
        else:
            route = "other"
        status = response.status
        self.duration.record((time.perf_counter() - started) * 1000, {"route": route, "status": str(status)})
        if status >= 400 and request.method != "OPTIONS":
            # A refused key by why (`401 source_disabled`, `401 unknown_key`), not the answer's one code.
            self.refusals(f"{status} {_error_code(response)}", route=route)
        return response

    def _allowed_origin(self, request: web.Request) -> str | None:
        origin = request.headers.get("Origin")
        if origin is None or not request.path.startswith("/v1/"):
            return None
        return origin if "*" in self.cors_origins or origin in self.cors_origins else None

    @web.middleware
    async def _cors(self, request: web.Request, handler):
        """Browsers' SDKs (Segment's analytics.js, RudderStack's JavaScript SDK) post from the site's origin:
        a request with an `Authorization` header or a JSON body is preflighted with OPTIONS, and its answer
        is readable only with `Access-Control-Allow-Origin`. Any origin by default (the write key, which
        browsers hold in the open anyway, is what admits an event); CDP_COLLECTOR_CORS_ORIGINS narrows it.
        The origin is echoed, with credentials allowed, as browser SDKs that send cookies need."""
        origin = self._allowed_origin(request)
        if request.method == "OPTIONS" and request.headers.get("Access-Control-Request-Method"):
            if origin is None or request.path.removeprefix("/v1/") not in PATHS:
                return error_response(403, "origin_not_allowed", "this origin may not send events here")
            headers = {
                **_cors_headers(origin),
                "Access-Control-Allow-Methods": "POST",
                "Access-Control-Max-Age": "86400",
            }
            wanted = request.headers.get("Access-Control-Request-Headers", "")
            if wanted:
                headers["Access-Control-Allow-Headers"] = wanted[:1024]
            return web.Response(status=204, headers=headers)
        response = await handler(request)
        if origin is not None:
            response.headers.update(_cors_headers(origin))
        return response

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
        except GONE as exc:
            if request.transport is not None and not request.transport.is_closing():
                log.exception("unhandled error on %s", request.path)  # not the client's connection
                return error_response(500, "internal", "internal error")
            # The client went away while its answer was being written (a 408 to a slow client that gave up).
            self.abandoned(exc, request.path)
            return web.Response(status=400)
        except Exception:
            log.exception("unhandled error on %s", request.path)
            return error_response(500, "internal", "internal error")

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _request: web.Request) -> web.Response:
        connected = self.ingestor.publisher.nc.is_connected
        # Connected is not enough: a server whose disk is full answers every store with a refusal.
        bus = (
            "refusing writes"
            if connected and self.ingestor.refusing()
            else "connected"
            if connected
            else "disconnected"
        )
        ok = self.ready and bus == "connected"
        return web.json_response({"ready": ok, "bus": bus}, status=200 if ok else 503)

    async def _body(self, request: web.Request) -> bytes:
        if (request.content_length or 0) > read_ceiling(self.limits):
            raise BodyTooLong
        size = request.content_length if request.content_length is not None else read_ceiling(self.limits)
        if not self.bodies.take(size):
            raise Busy
        # A client trickling its body would otherwise hold a connection and a buffer for as long as it likes.
        try:
            async with asyncio.timeout(self.body_timeout):
                raw = await request.read()
        except TimeoutError:
            raise SlowBody from None
        except web.HTTPRequestEntityTooLarge:
            raise BodyTooLong from None
        except GONE as exc:
            self.abandoned(exc, request.path)
            raise ClientGone from None
        finally:
            self.bodies.give_back(size)
        encoding = _content_encoding(request)
        if encoding in ("", "identity"):
            body = raw
        elif encoding in ("gzip", "x-gzip", "deflate"):
            # Decompress with a ceiling so a small bomb cannot cost more than the limit allows.
            wbits = 16 + zlib.MAX_WBITS if encoding != "deflate" else _deflate_wbits(raw)
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
                if inflater.unused_data:
                    # A second gzip member, padding or anything else: a body says one thing, read one way.
                    raise RequestRejected(
                        "invalid_gzip",
                        "Content-Encoding",
                        f"the {encoding} body has {len(inflater.unused_data)} bytes after the end of its compressed "
                        f"data; send the body compressed as one {encoding} stream with nothing after it",
                        status=400,
                    )
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

    def _handler(self, kind: str, path: str):
        async def handle(request: web.Request) -> web.Response:
            return await self._collect(kind, request, path=path)

        return handle

    def _trusted(self, address) -> bool:
        return address is not None and any(address in network for network in self.trusted_proxies)

    def _from_trusted_proxy(self, request: web.Request) -> bool:
        return self._trusted(_address(request.remote))

    def _client_address(self, request: web.Request) -> str:
        """The connection's peer address; when the peer is one of CDP_COLLECTOR_TRUSTED_PROXIES (anyone else
        can write the header), the address X-Forwarded-For names before the trusted proxies. "" when there
        is none.

        Read from the right: each proxy appends the address it was connected from to the header it
        received (nginx's $proxy_add_x_forwarded_for, the cloud load balancers), so what is left of the
        trusted proxies' entries is whatever the client sent, and its first address could be anything. The
        last address not of a trusted proxy is the client; every one trusted, the first of them. An entry
        that is not an address ends the walk at the last one read (the peer when it is the last entry)."""
        peer = _address(request.remote)
        if not self._trusted(peer):
            return str(peer) if peer is not None else ""
        client = peer
        forwarded = ",".join(request.headers.getall("X-Forwarded-For", ()))
        for entry in reversed(forwarded.split(",") if forwarded else ()):
            hop = _address(entry)
            if hop is None:
                break
            client = hop
            if not self._trusted(hop):
                break
        return str(client)

    def _scheme(self, request: web.Request) -> str:
        if self._from_trusted_proxy(request):
            proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
            if proto in ("http", "https"):
                return proto
        return request.scheme

    async def _sdk_settings(self, request: web.Request) -> web.Response:
        """`GET /v1/projects/<writeKey>/settings`: what analytics.js and the mobile SDKs fetch from their CDN
        host at start (analytics-next's fetchCDNSettings, analytics-kotlin's RequestFactory.settings). Their
        Segment destination sends to `integrations["Segment.io"].apiHost` when the settings give one
        (analytics-next: mergedSettings["Segment.io"] → apiHost and protocol; analytics-kotlin and -swift:
        SegmentSettings(apiKey, apiHost), always https), so pointing the SDK's CDN host here makes it send
        here too. Only that is said: no device-mode destinations, no plan, no middleware. An unknown or
        disabled key is 404, as an unknown project is."""
        write_key = request.match_info["write_key"]
        try:
            self.sources.authenticate(write_key)
        except Unauthenticated:
            return error_response(404, "not_found", "no source has this write key")
        settings = {
            "integrations": {
                "Segment.io": {"apiKey": write_key, "apiHost": f"{request.host}/v1", "protocol": self._scheme(request)}
            }
        }
        return web.Response(
            body=orjson.dumps(settings),
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    async def _collect(self, kind: str, request: web.Request, *, path: str) -> web.Response:
        received_at = datetime.now(UTC)
        header_key = _basic_write_key(request.headers.get("Authorization"))
        try:
            if header_key is not None:
                source = self.sources.authenticate(header_key)
                # A source over its rate is answered before its body is read, like a body that cannot fit.
                self.limiter.check_open(source, transport="http")
                decoded = decode_body(await self._body(request), self.limits)
            else:
                # Segment also accepts the key in the body ("writeKey"); some SDKs send only that. It is
                # checked before any event is looked at: read for the key only, then exactly if it is good.
                decoded = decode_body(await self._body(request), self.limits, exact=False)
                source = self.sources.authenticate(decoded.write_key)
            count = _events_in(kind, decoded.document)
            too_many = check_event_count(count, self.limits) or self.limiter.check_batch(
                source, count, field="batch", transport="http"
            )
            if too_many is not None:
                raise RequestRejected.of(too_many)
            self.limiter.take(source, count, transport="http")
            parsed = parse_decoded(kind, decoded, received_at=received_at, source_id=source.id, limits=self.limits)
        except SourceLimited as exc:
            return error_response(
                429,
                exc.reason,
                exc.message,
                headers={"Retry-After": str(math.ceil(exc.retry_after))},
                limit=exc.limit,
            )
        except Unauthenticated as exc:
            # The answer's code stays `unauthorized` (what clients know); `error.reason` says why.
            why = {}
            if isinstance(exc, KeyRefused):
                self.key_refusals(exc, transport="http")
                why["reason"] = exc.reason
            return error_response(
                401, "unauthorized", exc.message, headers={"WWW-Authenticate": 'Basic realm="cdp"'}, **why
            )
        except RequestRejected as exc:
            return error_response(exc.status or 400, str(exc.code), exc.message, field=exc.field)
        except SlowBody:
            return await self._request_timeout(request)
        except BodyTooLong:
            return self._too_long()
        except Busy:
            # Like a body too long: answered before it is read (aiohttp drops the rest for a few seconds).
            return error_response(
                503,
                "busy",
                f"the request bodies being received at once are at CDP_COLLECTOR_HTTP_BODY_BUDGET_BYTES "
                f"({describe_bytes(self.bodies.limit)}); nothing was stored: send again after Retry-After seconds",
                headers={"Retry-After": str(RETRY_AFTER)},
            )
        except ClientGone:
            # Nobody to answer: aiohttp sends nothing on a closed connection. Counted and said in _body.
            return web.Response(status=400)
        valid = [e for e in parsed.events if e is not None]
        if self.fill_context_ip and path in CLIENT_PATHS:
            # Segment fills context.ip from the request for client-side events that have none: browser and
            # mobile SDKs cannot know the device's public address. Personal data: never logged.
            ip = self._client_address(request)
            if ip:
                for event in valid:
                    if not event.context.ip:
                        event.context.ip = ip
        suppressed = 0
        if self.suppression:  # nobody suppressed (the common case): no event is even looked at
            kept = [e for e in valid if self.suppression.match(e) is None]
            suppressed, valid = len(valid) - len(kept), kept
        try:
            stored = await self.ingestor.store(valid, source)
        except ResourceExhausted as exc:
            self.limiter.give_back(source, count)  # nothing confirmed stored: the retry is not charged twice
            return error_response(
                429, "rate_limited", exc.message, headers={"Retry-After": str(math.ceil(exc.retry_after))}
            )
        except Unavailable as exc:
            self.limiter.give_back(source, count)
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


def _events_in(kind: str, document: dict) -> int:
    """How many events a decoded body carries, as its source's limits count them: a batch's items (a
    `batch` that is no list is refused as such by the parse), one for every other endpoint."""
    if kind != "batch":
        return 1
    batch = document.get("batch")
    return len(batch) if isinstance(batch, list) else 0


def _deflate_wbits(raw: bytes) -> int:
    """How a `deflate` body is framed. HTTP's deflate is the zlib format (RFC 9110 8.4.1.2), but clients
    have long sent the raw deflate stream under that name too (RFC 9110 says so); a body read the other way
    is garbage, so each is read as it was sent. A zlib stream starts with a header whose method is 8 and
    whose first two bytes are a multiple of 31 (RFC 1950), which a raw stream's first block rarely is."""
    if len(raw) >= 2 and raw[0] & 0x0F == 8 and (raw[0] << 8 | raw[1]) % 31 == 0:
        return zlib.MAX_WBITS
    return -zlib.MAX_WBITS


def _content_encoding(request: web.Request) -> str:
    """The body's one Content-Encoding, lower case ("" for none). More than one (two headers, or a list in
    one) is refused: a proxy and the collector could each read a different one of them."""
    values = [
        token.strip().lower()
        for header in request.headers.getall("Content-Encoding", ())
        for token in header.split(",")
        if token.strip()
    ]
    if len(values) > 1:
        raise RequestRejected(
            "unsupported_encoding",
            "Content-Encoding",
            f"the request has {len(values)} Content-Encoding values; send one Content-Encoding (gzip) or none",
            status=415,
        )
    return values[0] if values else ""


def _error_code(response: web.StreamResponse) -> str:
    """The `code` of one of our error answers ("invalid_events"), or its `error.reason` where it has one
    ("source_disabled"); "" for another answer."""
    body = getattr(response, "body", None)
    if isinstance(body, bytes) and body.startswith(b"{"):
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            return ""
        error = answer.get("error")
        reason = error.get("reason") if isinstance(error, dict) else None
        code = reason if isinstance(reason, str) else answer.get("code")
        return code if isinstance(code, str) else ""
    return ""


def _cors_headers(origin: str) -> dict[str, str]:
    return {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Credentials": "true", "Vary": "Origin"}


async def start_http(
    api: HttpApi,
    host: str,
    port: int,
    *,
    shutdown_grace: float = 10.0,
    header_timeout: float = 10.0,
    connections: ConnectionLimits | None = None,
) -> tuple[web.AppRunner, int]:
    """Serve `api` on host:port; at most `connections` open at once (connections.py; by default as many as
    CDP_COLLECTOR_HTTP_MAX_CONNECTIONS unset allows, none per client)."""
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
    assert runner.server is not None
    limits = connections or ConnectionLimits(default_max_connections())
    site = GatedSite(runner, host, port, ConnectionGate(runner.server, limits, api.telemetry, log))
    await site.start()
    return runner, site.port
