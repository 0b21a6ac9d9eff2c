"""The grpc.aio server interceptor: caller authentication, request decoding, tracing, metrics + access log,
error mapping.

One interceptor does all of it, in one wrapper per method, because every service pays it on every call:
four stacked interceptors cost four `intercept_service` awaits and four wrapper coroutines per call, and
each re-read the metadata and the status. What a call goes through, outermost first:

    span    one SERVER span, continuing the caller's W3C trace context from metadata; current while the
            handler runs, so its logs and outgoing messages carry the trace
    timer   `rpc.server.duration` (ms) per method and status, and an access log line for failures (at
            DEBUG for NOT_FOUND and ALREADY_EXISTS, answers a poll expects; INFO or ERROR otherwise). A call
            grpc.aio cancels is DEADLINE_EXCEEDED (logged at WARNING) or CANCELLED (INFO), never UNKNOWN
    errors  CdpError -> its gRPC status with google.rpc details; anything else -> INTERNAL naming only the
            trace id. Sits outside auth, so an authentication failure is mapped like any domain error
    auth    bearer token and the method's scope (PUBLIC methods skip it); `current_caller()` for the handler
    decode  the request body becomes the method's request message only now, after authentication: a caller
            without a token gets UNAUTHENTICATED for whatever bytes it sent, and bytes that are not the
            request message are INVALID_ARGUMENT naming the message type

grpc.aio decodes a request before any handler runs and answers a body that fails to parse with UNKNOWN
"Unexpected <class ...>": a Python class name on the wire, no span, no metric, and the decoding done for
callers nobody authenticated. So a wrapped method's handler is registered without a request deserializer
(grpc hands over the raw bytes) and the method's own deserializer runs inside the wrapper. For streamed
requests the wrapper decodes each message as the handler iterates; `context.read()` in such a handler would
see raw bytes, so cdp handlers iterate their requests instead.

Health is left alone: probes carry no token, and its spans and metrics would be noise. Reflection answers
only a caller with a valid token, whatever its scopes (grpcurl sends one with -H): it lists every method
and message of the service, a map for an attacker and of no use to a caller that cannot authenticate
anyway. It gets no span or metric either. With CDP_AUTH_MODE=none (development) it answers everyone.

A method's wrapped handler is built once and cached: grpc.aio asks the interceptor for a handler on every
call, and re-wrapping per call would cost more than the wrapping. What a call still costs is mostly the
OpenTelemetry SDK's (starting and ending the span, recording the histogram); libs/cdp-kit/benchmarks/
interceptors.py measures it against a bare server.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
from collections.abc import Mapping
from time import perf_counter
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from opentelemetry import context as context_api
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind, Status, StatusCode

from cdp_kit.auth import ANONYMOUS, Caller, TokenAuthenticator
from cdp_kit.errors import CdpError, InvalidArgument, Unavailable
from cdp_kit.telemetry import LATENCY_BUCKETS_MS, Telemetry

log = logging.getLogger("cdp.grpc")

PUBLIC = "public"  # scope marker: the method authenticates its caller itself (e.g. a source write key)

# Services that must answer without a token: Kubernetes probes carry none.
OPEN_SERVICES = ("grpc.health.v1.Health",)
# Services any authenticated caller may use, whatever its scopes (grpcurl and the like send a token too).
REFLECTION_SERVICES = (
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)

_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("cdp_caller", default=ANONYMOUS)
# Who calls a PUBLIC method while tokens are checked: nobody the interceptor knows, so a scope asked of it
# (`current_caller().allows(...)`) is refused. ANONYMOUS, the default, holds `*`: it is for CDP_AUTH_MODE=none,
# and a PUBLIC method (the collector's Collect, whose callers are the internet) ran as it.
UNAUTHENTICATED = Caller("unauthenticated", frozenset())
# The domain error a call ended with, as a log may show it: its reason code and, for bad input, the field.
# Never the message: it names the value that failed for the caller's sake, and values are customer data.
_rejection: contextvars.ContextVar[tuple[str, str | None] | None] = contextvars.ContextVar(
    "cdp_rejection", default=None
)
# The name of the token the call presented, once authenticated (each call runs in a task of its own):
# the log lines of a refused or failed call name who made it, so a stolen token probing methods it lacks
# can be told apart. A token's name is the operator's label for a caller, never a secret.
_caller_name: contextvars.ContextVar[str | None] = contextvars.ContextVar("cdp_caller_name", default=None)
# Scopes whose successful calls are logged at INFO with the caller: a person's export and deletion are
# audited (who asked, when), whatever the log level.
AUDITED_SCOPES = frozenset({"privacy:export", "privacy:delete"})

# A call without trace context starts a new trace (extracting from an empty carrier gives the same).
_NO_PARENT = Context()
_OK = grpc.StatusCode.OK
_UNKNOWN = grpc.StatusCode.UNKNOWN
# Failures that are the answer a caller may well expect ("no such person yet" to a poll, "exists already"
# to an idempotent create): logged at DEBUG. At INFO, `cdpctl profile --wait` asking five times a second
# wrote a line per ask. Bad input, refused callers and the rest stay at INFO; all are counted alike.
_ANSWERS = frozenset({"NOT_FOUND", "ALREADY_EXISTS"})
_SERVER = SpanKind.SERVER
# A call grpc.aio cancelled ends with no status of ours: the caller's deadline passed (grpc answers it
# DEADLINE_EXCEEDED) or the caller cancelled it. Counted and logged as that, not as UNKNOWN at ERROR, which
# says a bug (a pipeline benchmark's BatchGetProfiles calls, 500 persons from a profile service far behind,
# were logged `grpc call failed` UNKNOWN when the caller's 30 s deadline passed).
_ENDED_BY_CALLER = {
    "DEADLINE_EXCEEDED": "grpc call not answered before the caller's deadline",
    "CANCELLED": "grpc call cancelled by the caller",
}


def _call_cancelled() -> bool:
    """Whether the running call's task is being cancelled (grpc.aio cancels it when the caller cancels or
    its deadline passes), rather than a CancelledError rising from something the handler awaited."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


# The caller's own clock ends a call at its deadline (it cancels the call) a moment before ours would: our
# deadline counts from when the request arrived. A call cancelled within this many seconds of our deadline,
# or in the last DEADLINE_SHARE of the time it had, was ended by its deadline.
DEADLINE_SLACK = 1.0
DEADLINE_SHARE = 0.05


def _ended_by_caller(context, elapsed: float) -> grpc.StatusCode | None:
    """DEADLINE_EXCEEDED or CANCELLED for a call grpc.aio cancelled `elapsed` seconds after it began; None
    for one it did not."""
    if not _call_cancelled():
        return None
    remaining = context.time_remaining()
    if remaining is not None and remaining <= max(DEADLINE_SLACK, DEADLINE_SHARE * (remaining + elapsed)):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


class _StrGetter(Getter[dict[str, str]]):
    """Reads a carrier whose values are all str; the default getter checks each for being a list."""

    def get(self, carrier: dict[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        return None if value is None else [value]

    def keys(self, carrier: dict[str, str]) -> list[str]:
        return list(carrier)


_GETTER = _StrGetter()


def current_caller() -> Caller:
    """The authenticated caller of the gRPC call being handled (ANONYMOUS when auth is off)."""
    return _caller.get()


# The status travels in trailers, twice (grpc-message, percent-encoded, and inside grpc-status-details-bin,
# base64), and a client drops a call whose trailers pass its metadata limit (16 KB by default) as
# RESOURCE_EXHAUSTED: an error listing thousands of problems would never reach the caller as itself. Each
# text is kept to this many UTF-8 bytes, its start (the field and the first problems) kept.
MAX_ERROR_TEXT_BYTES = 1024


def bounded(text: str, limit: int = MAX_ERROR_TEXT_BYTES) -> str:
    """`text`, or its start cut to at most `limit` UTF-8 bytes with how much was left out."""
    encoded = text.encode()
    if len(encoded) <= limit:
        return text
    kept = encoded[: limit - 40].decode(errors="ignore")
    return f"{kept} … ({len(text) - len(kept)} more characters)"


def status_for(error: CdpError) -> status_pb2.Status:
    """The google.rpc.Status (with details) a domain error becomes on the wire."""
    status = status_pb2.Status(code=error.code.value[0], message=bounded(error.message))
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain="cdp")
    status.details.add().Pack(info)
    if isinstance(error, InvalidArgument):
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=bounded(error.field, 256), description=bounded(error.description)
                )
            ]
        )
        status.details.add().Pack(bad_request)
    if isinstance(error, Unavailable):
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(error.retry_after * 1000))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return status


class _Method:
    """What is fixed per method, worked out once: span name and attributes, metric attributes, scope."""

    __slots__ = (
        "_by_status",
        "_deserializer",
        "audited",
        "name",
        "ok_attributes",
        "public",
        "request_type",
        "scope",
        "span_attributes",
        "span_name",
    )

    def __init__(self, name: str, scope: str | None, deserializer=None, *, public: bool = False) -> None:
        self.name = name  # "/pkg.Service/Method", as metrics and logs name it
        self.public = public  # PUBLIC while tokens are checked: its handler runs as UNAUTHENTICATED
        self._deserializer = deserializer  # None: the handler takes the raw bytes
        # Generated stubs register `Message.FromString`, bound to the message class.
        descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
        self.request_type = getattr(descriptor, "full_name", None) or "request message"
        self.span_name = name.lstrip("/")
        service, _, rpc = self.span_name.partition("/")
        # Nothing changes these dicts (the SDK copies span attributes), so one per method and status serves
        # every call.
        self.span_attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc}
        self.scope = scope  # None: no authentication for this method
        self.audited = scope in AUDITED_SCOPES
        self._by_status: dict[str, dict[str, str]] = {}
        self.ok_attributes = self.metric_attributes("OK")

    def decode(self, raw):
        """The request message `raw` encodes; InvalidArgument when it encodes none. Whatever the parser
        raised stays out of the answer: its class and text describe the library, not the caller's error."""
        if self._deserializer is None:
            return raw
        try:
            return self._deserializer(raw)
        except Exception:
            raise InvalidArgument(
                "request",
                f"the body does not parse as a {self.request_type}; send that message, protobuf-encoded",
                reason="undecodable_request",
            ) from None

    async def decode_each(self, raw_requests):
        """The streamed requests, each decoded as the handler asks for it."""
        async for raw in raw_requests:
            yield self.decode(raw)

    def metric_attributes(self, status: str) -> dict[str, str]:
        attributes = self._by_status.get(status)
        if attributes is None:
            attributes = self._by_status[status] = {"rpc.method": self.name, "rpc.grpc.status": status}
        return attributes


class CdpInterceptor(grpc.aio.ServerInterceptor):
    """Authentication, a span, metrics, access logs and error mapping for every call but health and
    reflection (which needs a valid token, any scope, and nothing else). Without an `authenticator` every caller is ANONYMOUS; with one, `method_scopes` maps full
    method names (`/pkg.Service/Method`) to the scope required, or PUBLIC; a method missing from it needs
    `*` (fail closed)."""

    def __init__(
        self,
        telemetry: Telemetry,
        *,
        authenticator: TokenAuthenticator | None = None,
        method_scopes: Mapping[str, str] | None = None,
    ) -> None:
        self._tracer = telemetry.tracer
        self._duration = telemetry.meter.create_histogram(
            "rpc.server.duration",
            unit="ms",
            description="gRPC server call latency",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        self._authenticator = authenticator
        self._method_scopes = dict(method_scopes or {})
        # Metadata keys the configured propagator reads (traceparent, tracestate, baggage by default):
        # without any of them there is nothing to extract, and no carrier dict is built.
        self._trace_fields = frozenset(propagate.get_global_textmap().fields)
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            handler = await continuation(handler_call_details)
            if handler is None:
                return None  # unknown method; not cached, so made-up names cannot grow the cache
            service = method.lstrip("/").partition("/")[0]
            if service in REFLECTION_SERVICES:
                if self._authenticator is not None:
                    handler = self._authenticated_only(handler)
            elif service not in OPEN_SERVICES:
                public = self._authenticator is not None and self._method_scopes.get(method) == PUBLIC
                wrapped = _Method(method, self._scope_for(method), handler.request_deserializer, public=public)
                handler = self._wrap(wrapped, handler)
            self._handlers[method] = handler
        return handler

    def _authenticated_only(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """A streaming handler (reflection's) that first checks the caller's token, any scope."""
        authenticator, behaviour = self._authenticator, handler.stream_stream
        assert authenticator is not None and behaviour is not None

        async def guarded(requests, context):
            metadata = {key: value for key, value in context.invocation_metadata() or () if key == "authorization"}
            try:
                authenticator.authenticate(metadata.get("authorization"))
            except CdpError as exc:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            async for response in behaviour(requests, context):
                yield response

        return handler._replace(stream_stream=guarded)

    def _scope_for(self, method: str) -> str | None:
        if self._authenticator is None:
            return None
        scope = self._method_scopes.get(method, "*")  # fail closed: undeclared methods need `*`
        return None if scope == PUBLIC else scope

    def _wrap(self, method: _Method, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        # Without a deserializer grpc passes the raw bytes: the wrapper decodes them after authentication.
        handler = handler._replace(request_deserializer=None)
        streamed = handler.request_streaming
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._around(method, handler.unary_unary, streamed))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=self._around(method, handler.stream_unary, streamed))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._around_stream(method, handler.unary_stream, streamed))
        return handler._replace(stream_stream=self._around_stream(method, handler.stream_stream, streamed))

    def _around(self, method: _Method, behaviour, streamed: bool):
        """The handler of a method with a single response (unary-unary, stream-unary)."""
        start, authenticate, fail, finish = self._start, self._authenticate, self._fail, self._finish
        decode = method.decode_each if streamed else method.decode

        async def around(request, context):
            span, attached, authorization = start(method, context)
            started = perf_counter()
            failed = True
            caller = None
            try:
                if method.scope is not None:
                    caller = authenticate(method, authorization)
                elif method.public:
                    caller = _caller.set(UNAUTHENTICATED)
                response = await behaviour(decode(request), context)
                failed = False
                return response
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError as exc:
                if _call_cancelled():
                    raise  # the caller went away or its deadline passed: `_finish` names which
                request = None
                await fail(method, context, exc)
            except Exception as exc:
                # The abort `fail` raises is kept by the call's context until a full garbage collection
                # (a cycle through this frame): let go of the request first (see `_fail`).
                request = None
                await fail(method, context, exc)
            finally:
                if caller is not None:
                    _caller.reset(caller)
                finish(method, span, attached, started, context, failed)

        return around

    def _around_stream(self, method: _Method, behaviour, streamed: bool):
        """The handler of a method with streamed responses (unary-stream, stream-stream). grpc.aio tells
        async from sync handlers by the function's kind, so this is an async generator function whatever
        `behaviour` is: an async generator, a sync generator, or a coroutine writing via `context.write`."""
        start, authenticate, fail, finish = self._start, self._authenticate, self._fail, self._finish
        decode = method.decode_each if streamed else method.decode

        async def around_stream(request, context):
            span, attached, authorization = start(method, context)
            started = perf_counter()
            failed = True
            caller = None
            try:
                if method.scope is not None:
                    caller = authenticate(method, authorization)
                elif method.public:
                    caller = _caller.set(UNAUTHENTICATED)
                result = behaviour(decode(request), context)
                if hasattr(result, "__aiter__"):
                    async for response in result:
                        yield response
                elif inspect.isawaitable(result):
                    await result
                elif result is not None:
                    for response in result:
                        yield response
                failed = False
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError as exc:
                if _call_cancelled():
                    raise  # the caller went away or its deadline passed: `_finish` names which
                request = None
                await fail(method, context, exc)
            except Exception as exc:
                # The abort `fail` raises is kept by the call's context until a full garbage collection
                # (a cycle through this frame): let go of the request first (see `_fail`).
                request = None
                await fail(method, context, exc)
            finally:
                if caller is not None:
                    _caller.reset(caller)
                finish(method, span, attached, started, context, failed)

        return around_stream

    def _start(self, method: _Method, context) -> tuple[Any, object, str | None]:
        """Read the metadata once (bearer token, trace context), start the span and make it current."""
        metadata = context.invocation_metadata() or ()
        authorization = None
        traced = False
        trace_fields = self._trace_fields
        for key, value in metadata:
            if key == "authorization":
                if authorization is None:
                    authorization = value
            elif key in trace_fields:
                traced = True
        parent = (
            propagate.extract({key: value for key, value in metadata if isinstance(value, str)}, getter=_GETTER)
            if traced
            else _NO_PARENT
        )
        span = self._tracer.start_span(method.span_name, parent, _SERVER, method.span_attributes)
        return span, context_api.attach(trace.set_span_in_context(span)), authorization

    def _authenticate(self, method: _Method, authorization: str | None) -> contextvars.Token:
        authenticator = self._authenticator
        assert authenticator is not None and method.scope is not None  # `_scope_for` guarantees both
        caller = authenticator.authenticate(authorization)
        _caller_name.set(caller.name)
        authenticator.authorize(caller, method.scope, method.name)
        return _caller.set(caller)

    @staticmethod
    async def _fail(method: _Method, context, exc: BaseException):
        """End the call with the status `exc` stands for; always raises grpc.aio.AbortError.

        The AbortError carries `exc` as its context and is held, with its traceback's frames, in a
        reference cycle through the call's context that only a full garbage collection frees. Those frames
        hold the request (raw and decoded): a few dozen refused 15 MB calls, token or not, grew a service
        by gigabytes. So `exc` loses its traceback once it has been logged, and the caller (`around`) drops
        its request before calling this."""
        if isinstance(exc, CdpError):
            _rejection.set((exc.reason, getattr(exc, "field", None)))
            exc.__traceback__ = None
            await context.abort_with_status(rpc_status.to_status(status_for(exc)))
        log.exception("unhandled error in %s", method.name, exc_info=exc)
        exc.__traceback__ = None
        span_context = trace.get_current_span().get_span_context()
        trace_hint = f" (trace {span_context.trace_id:032x})" if span_context.is_valid else ""
        status = status_pb2.Status(code=code_pb2.INTERNAL, message=f"internal error{trace_hint}")
        await context.abort_with_status(rpc_status.to_status(status))

    def _finish(self, method: _Method, span, attached, started: float, context, failed: bool) -> None:
        """Record the call's latency, log a failure, set the span's status and end it. Runs while the
        span is still current, so the log line and the histogram exemplar carry the trace."""
        try:
            elapsed_ms = (perf_counter() - started) * 1000
            code = context.code()
            if code is None:
                code = (_ended_by_caller(context, elapsed_ms / 1000) or _UNKNOWN) if failed else _OK
            if code is _OK:
                self._duration.record(elapsed_ms, method.ok_attributes)
                span.set_attribute("rpc.grpc.status_code", 0)
                if method.audited:
                    log.info(
                        "grpc call",
                        extra={"method": method.name, "status": "OK", "caller": _caller_name.get(), "audit": True},
                    )
                elif log.isEnabledFor(logging.DEBUG):
                    log.debug("grpc call", extra={"method": method.name, "status": "OK", "ms": round(elapsed_ms, 2)})
                return
            status = code.name if isinstance(code, grpc.StatusCode) else str(code)
            self._duration.record(elapsed_ms, method.metric_attributes(status))
            if status in ("INTERNAL", "UNKNOWN", "DATA_LOSS"):
                log.error(
                    "grpc call failed",
                    extra={
                        "method": method.name,
                        "status": status,
                        "ms": round(elapsed_ms, 2),
                        "caller": _caller_name.get(),
                    },
                )
            elif status in _ENDED_BY_CALLER:
                # Not a fault of this service's code: a caller that gave up (CANCELLED), or asked more than
                # could be done before its deadline (a service far behind: worth a warning, and counted).
                level = logging.WARNING if status == "DEADLINE_EXCEEDED" else logging.INFO
                log.log(
                    level,
                    _ENDED_BY_CALLER[status],
                    extra={
                        "method": method.name,
                        "status": status,
                        "ms": round(elapsed_ms, 2),
                        "caller": _caller_name.get(),
                    },
                )
            else:
                level = logging.DEBUG if status in _ANSWERS else logging.INFO
                if log.isEnabledFor(level):
                    # The status details are the caller's: they quote the value that failed. The log and
                    # the span (exported like a log) get the reason code and the field only.
                    reason, field = _rejection.get() or (None, None)
                    extra = {
                        "method": method.name,
                        "status": status,
                        "ms": round(elapsed_ms, 2),
                        "caller": _caller_name.get(),
                    }
                    if reason is not None:
                        extra["reason"] = reason
                    if field is not None:
                        extra["field"] = field
                    log.log(level, "grpc call rejected", extra=extra)
            span.set_attribute("rpc.grpc.status_code", code.value[0] if isinstance(code, grpc.StatusCode) else code)
            span.set_status(Status(StatusCode.ERROR, status))
        finally:
            context_api.detach(attached)
            span.end()
