"""grpc.aio server interceptors: tracing, metrics + access log, error mapping, caller authentication.

Order on the server (outermost first): tracing → observe (metrics, logs) → errors → auth → handler.
Tracing is outermost so everything below runs inside the call's span; errors sits outside auth so an
authentication failure is mapped like any other domain error.

Each interceptor wraps a method's handler once and caches it by method name: grpc.aio asks the
interceptors for a handler on every call, and re-wrapping per call would cost more than the wrapping.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from cdp_kit.auth import ANONYMOUS, Caller, TokenAuthenticator
from cdp_kit.errors import CdpError, InvalidArgument, Unavailable
from cdp_kit.telemetry import LATENCY_BUCKETS_MS, Telemetry, extract_context

log = logging.getLogger("cdp.grpc")

PUBLIC = "public"  # scope marker: the method authenticates its caller itself (e.g. a source write key)

# Services that must answer without a token: Kubernetes probes and tooling carry none.
OPEN_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)

_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("cdp_caller", default=ANONYMOUS)


def current_caller() -> Caller:
    """The authenticated caller of the gRPC call being handled (ANONYMOUS when auth is off)."""
    return _caller.get()


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}


UnaryAround = Callable[[str, Callable[..., Awaitable[Any]], Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _as_async_iter(behaviour):
    """Adapt a streaming handler (async generator, sync generator, or coroutine writing through
    `context.write`) to one that always returns an async iterator."""

    async def call(request, context):
        result = behaviour(request, context)
        if hasattr(result, "__aiter__"):
            async for response in result:
                yield response
        elif inspect.isawaitable(result):
            await result
        elif result is not None:
            for response in result:
                yield response

    return call


class _WrappingInterceptor(grpc.aio.ServerInterceptor):
    """Base: subclasses implement `around(method, call, request, context)` for unary responses and
    `around_stream` for streaming responses; the base wraps and caches handlers."""

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler | None] = {}

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        try:
            return self._wrapped[method]
        except KeyError:
            pass
        handler = await continuation(handler_call_details)
        wrapped = self._wrap(method, handler) if handler is not None and self.applies_to(method) else handler
        self._wrapped[method] = wrapped
        return wrapped

    def applies_to(self, method: str) -> bool:
        # Probes hit health every few seconds; spans, metrics and logs of those are noise.
        return method.lstrip("/").partition("/")[0] not in OPEN_SERVICES

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                return await self.around(method, inner, request, context)

            return handler._replace(unary_unary=unary_unary)
        if handler.stream_unary is not None:
            inner = handler.stream_unary

            async def stream_unary(request_iterator, context):
                return await self.around(method, inner, request_iterator, context)

            return handler._replace(stream_unary=stream_unary)
        # grpc.aio tells async from sync handlers by the function's kind, so streaming wrappers must
        # themselves be async generator functions.
        if handler.unary_stream is not None:
            inner = handler.unary_stream

            async def unary_stream(request, context):
                async for response in self.around_stream(method, _as_async_iter(inner), request, context):
                    yield response

            return handler._replace(unary_stream=unary_stream)
        inner = handler.stream_stream

        async def stream_stream(request_iterator, context):
            async for response in self.around_stream(method, _as_async_iter(inner), request_iterator, context):
                yield response

        return handler._replace(stream_stream=stream_stream)

    async def around(self, method, call, request, context):
        return await call(request, context)

    async def around_stream(self, method, call, request, context) -> AsyncIterator[Any]:
        async for response in call(request, context):
            yield response


class TracingInterceptor(_WrappingInterceptor):
    """One SERVER span per call, continuing the caller's W3C trace context from metadata."""

    def __init__(self, tracer: trace.Tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def _span(self, method: str, context):
        service, _, name = method.lstrip("/").partition("/")
        return self.tracer.start_as_current_span(
            method.lstrip("/"),
            context=extract_context(_metadata(context)),
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
            record_exception=False,
            set_status_on_exception=False,
        )

    @staticmethod
    def _finish(span, context, exc: BaseException | None) -> None:
        code = context.code()
        if exc is not None and code is None:
            code = grpc.StatusCode.UNKNOWN
        if code is not None and code != grpc.StatusCode.OK:
            value = code.value[0] if isinstance(code, grpc.StatusCode) else code
            span.set_attribute("rpc.grpc.status_code", value)
            span.set_status(Status(StatusCode.ERROR, str(context.details() or code)))
        else:
            span.set_attribute("rpc.grpc.status_code", 0)

    async def around(self, method, call, request, context):
        with self._span(method, context) as span:
            try:
                response = await call(request, context)
            except BaseException as exc:
                self._finish(span, context, exc)
                raise
            self._finish(span, context, None)
            return response

    async def around_stream(self, method, call, request, context):
        with self._span(method, context) as span:
            try:
                async for response in call(request, context):
                    yield response
            except BaseException as exc:
                self._finish(span, context, exc)
                raise
            self._finish(span, context, None)


def _status_name(context, exc: BaseException | None) -> str:
    code = context.code()
    if code is None:
        return "UNKNOWN" if exc is not None else "OK"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class ObserveInterceptor(_WrappingInterceptor):
    """Latency histogram and call counter per method and status; access log lines with trace ids."""

    def __init__(self, telemetry: Telemetry) -> None:
        super().__init__()
        self.duration = telemetry.meter.create_histogram(
            "rpc.server.duration",
            unit="ms",
            description="gRPC server call latency",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )

    def _record(self, method: str, started: float, context, exc: BaseException | None) -> None:
        elapsed_ms = (time.perf_counter() - started) * 1000
        status = _status_name(context, exc)
        self.duration.record(elapsed_ms, {"rpc.method": method, "rpc.grpc.status": status})
        if status == "OK":
            if log.isEnabledFor(logging.DEBUG):
                log.debug("grpc call", extra={"method": method, "status": status, "ms": round(elapsed_ms, 2)})
        elif status in ("INTERNAL", "UNKNOWN", "DATA_LOSS"):
            log.error("grpc call failed", extra={"method": method, "status": status, "ms": round(elapsed_ms, 2)})
        else:
            log.info(
                "grpc call rejected",
                extra={"method": method, "status": status, "detail": context.details(), "ms": round(elapsed_ms, 2)},
            )

    async def around(self, method, call, request, context):
        started = time.perf_counter()
        try:
            response = await call(request, context)
        except BaseException as exc:
            self._record(method, started, context, exc)
            raise
        self._record(method, started, context, None)
        return response

    async def around_stream(self, method, call, request, context):
        started = time.perf_counter()
        try:
            async for response in call(request, context):
                yield response
        except BaseException as exc:
            self._record(method, started, context, exc)
            raise
        self._record(method, started, context, None)


def status_for(error: CdpError) -> status_pb2.Status:
    """The google.rpc.Status (with details) a domain error becomes on the wire."""
    status = status_pb2.Status(code=error.code.value[0], message=error.message)
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain="cdp")
    status.details.add().Pack(info)
    if isinstance(error, InvalidArgument):
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.description)
            ]
        )
        status.details.add().Pack(bad_request)
    if isinstance(error, Unavailable):
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(error.retry_after * 1000))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return status


class ErrorInterceptor(_WrappingInterceptor):
    """Domain errors → gRPC status with details; anything unexpected → INTERNAL without internals."""

    async def _abort(self, method: str, context, exc: BaseException):
        if isinstance(exc, CdpError):
            await context.abort_with_status(rpc_status.to_status(status_for(exc)))
        log.exception("unhandled error in %s", method, exc_info=exc)
        span_context = trace.get_current_span().get_span_context()
        trace_hint = f" (trace {span_context.trace_id:032x})" if span_context.is_valid else ""
        status = status_pb2.Status(code=code_pb2.INTERNAL, message=f"internal error{trace_hint}")
        await context.abort_with_status(rpc_status.to_status(status))

    async def around(self, method, call, request, context):
        try:
            return await call(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await self._abort(method, context, exc)

    async def around_stream(self, method, call, request, context):
        try:
            async for response in call(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await self._abort(method, context, exc)


class AuthInterceptor(_WrappingInterceptor):
    """Bearer-token authentication and per-method scopes. `method_scopes` maps full method names
    (`/pkg.Service/Method`) to the scope required, or PUBLIC."""

    def __init__(self, authenticator: TokenAuthenticator, method_scopes: Mapping[str, str]) -> None:
        super().__init__()
        self.authenticator = authenticator
        self.method_scopes = dict(method_scopes)

    def applies_to(self, method: str) -> bool:
        return super().applies_to(method) and self.method_scopes.get(method) != PUBLIC

    def _check(self, method: str, context) -> contextvars.Token:
        authorization = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                authorization = value
                break
        caller = self.authenticator.authenticate(authorization)
        # Fail closed: a method nobody declared a scope for is reachable only with `*`.
        self.authenticator.authorize(caller, self.method_scopes.get(method, "*"), method)
        return _caller.set(caller)

    async def around(self, method, call, request, context):
        token = self._check(method, context)
        try:
            return await call(request, context)
        finally:
            _caller.reset(token)

    async def around_stream(self, method, call, request, context):
        token = self._check(method, context)
        try:
            async for response in call(request, context):
                yield response
        finally:
            _caller.reset(token)
