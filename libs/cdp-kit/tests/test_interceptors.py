"""The cdp interceptor on a real grpc.aio server: auth before the handler, one span per call continuing the
caller's trace, latency metrics and access logs per status, domain errors as rich statuses, all four kinds
of RPC, health left alone."""

import asyncio
import contextlib
import logging

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from cdp_kit.auth import TokenAuthenticator, new_token, write_tokens_file
from cdp_kit.errors import AlreadyExists, InvalidArgument, NotFound
from cdp_kit.interceptors import PUBLIC, CdpInterceptor, current_caller
from cdp_kit.telemetry import Telemetry
from cdp_testing.waiting import eventually

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN_ID = "b7ad6b7169203331"
SCOPES = {
    "/test.Svc/Echo": "svc:read",
    "/test.Svc/Fail": "svc:read",
    "/test.Svc/Open": PUBLIC,
    "/test.Svc/List": "svc:read",
    "/test.Svc/Sum": "svc:write",
    "/test.Svc/Chat": "svc:write",
    # /test.Svc/Hidden is declared by nobody: only `*` reaches it
}


class Recorder:
    """Handlers that note what they saw: the caller, the current trace."""

    def __init__(self):
        self.calls = []

    def _seen(self, name):
        span_context = trace.get_current_span().get_span_context()
        self.calls.append((name, current_caller().name, span_context.trace_id, span_context.span_id))

    async def echo(self, request, context):
        self._seen("Echo")
        return request

    async def fail(self, request, context):
        self._seen("Fail")
        if request == b"bad-field":
            raise InvalidArgument("traits.email", "must contain '@'")
        if request == b"bad-value":
            raise InvalidArgument("traits.email", "'ada.example.com' must contain '@'")
        if request == b"abort":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "handler said no")
        if request == b"long":
            unknown = ", ".join(f'in_segment("s{i}") is not a segment ✗' for i in range(2_000))
            raise InvalidArgument("definition.text", unknown)
        if request == b"not-found":
            raise NotFound("no person with email ada@example.com")
        if request == b"exists":
            raise AlreadyExists("segment vip exists")
        if request == b"set-code":
            context.set_code(grpc.StatusCode.ALREADY_EXISTS)
            context.set_details("exists already")
            return b""
        raise KeyError("secret internals")

    async def open(self, request, context):
        self._seen("Open")
        return request

    async def hidden(self, request, context):
        self._seen("Hidden")
        return request

    async def list(self, request, context):
        self._seen("List")
        for i in range(3):
            if request == b"fail-midway" and i == 1:
                raise NotFound("person p_1 is gone")
            yield b"item%d" % i

    async def sum(self, request_iterator, context):
        self._seen("Sum")
        return b"%d" % sum([len(r) async for r in request_iterator])

    async def chat(self, request_iterator, context):
        self._seen("Chat")
        async for request in request_iterator:
            yield request.upper()

    async def written(self, request, context):
        self._seen("Written")
        for part in (b"a", b"b"):
            await context.write(part)

    def generated(self, request, context):
        self._seen("Generated")
        yield from (b"x", b"y")

    async def wait(self, request, context):
        """Never answers: what a service far behind is to a caller with a deadline."""
        self._seen("Wait")
        await asyncio.Event().wait()

    async def trickle(self, request, context):
        self._seen("Trickle")
        yield b"first"
        await asyncio.Event().wait()

    async def lost(self, request, context):
        """Awaits work another task cancels: a CancelledError while the call itself goes on."""
        self._seen("Lost")
        work = asyncio.ensure_future(asyncio.Event().wait())
        asyncio.get_running_loop().call_soon(work.cancel)
        await work


def generic_handler(recorder):
    return grpc.method_handlers_generic_handler(
        "test.Svc",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(recorder.echo),
            "Fail": grpc.unary_unary_rpc_method_handler(recorder.fail),
            "Open": grpc.unary_unary_rpc_method_handler(recorder.open),
            "Hidden": grpc.unary_unary_rpc_method_handler(recorder.hidden),
            "List": grpc.unary_stream_rpc_method_handler(recorder.list),
            "Sum": grpc.stream_unary_rpc_method_handler(recorder.sum),
            "Chat": grpc.stream_stream_rpc_method_handler(recorder.chat),
            "Written": grpc.unary_stream_rpc_method_handler(recorder.written),
            "Generated": grpc.unary_stream_rpc_method_handler(recorder.generated),
            "Wait": grpc.unary_unary_rpc_method_handler(recorder.wait),
            "Trickle": grpc.unary_stream_rpc_method_handler(recorder.trickle),
            "Lost": grpc.unary_unary_rpc_method_handler(recorder.lost),
        },
    )


class _OpenServerSpans(SpanProcessor):
    """How many server spans (one a call, begun and ended by the interceptor) are open, in this process.

    grpc.aio sends an aborted call's status before the handler's interceptor has logged it, counted it and
    ended its span: the caller may read the spans first (CI, a loaded worker: no span). `serving` waits for
    none to be open before stopping the server, which would cancel those handlers."""

    open = 0

    def on_start(self, span, parent_context=None) -> None:
        if span.kind == SpanKind.SERVER:
            _OpenServerSpans.open += 1

    def on_end(self, span) -> None:
        if span.kind == SpanKind.SERVER:
            _OpenServerSpans.open -= 1


class Observed:
    """A Telemetry whose spans and metrics the test can read."""

    def __init__(self):
        self.spans = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        _OpenServerSpans.open = 0  # an earlier test's call may have been cancelled with its server
        tracer_provider.add_span_processor(_OpenServerSpans())
        tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.metrics = InMemoryMetricReader()
        meter_provider = MeterProvider(metric_readers=[self.metrics])
        self.telemetry = Telemetry(
            service_name="kit-test",
            tracer=tracer_provider.get_tracer("cdp.kit-test"),
            meter=meter_provider.get_meter("cdp.kit-test"),
        )

    def server_spans(self):
        return [s for s in self.spans.get_finished_spans() if s.kind == SpanKind.SERVER]

    def durations(self):
        """{(method, status): count} of rpc.server.duration."""
        counts = {}
        data = self.metrics.get_metrics_data()
        for resource_metrics in data.resource_metrics if data else ():
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    if metric.name == "rpc.server.duration":
                        assert metric.unit == "ms"
                        for point in metric.data.data_points:
                            key = (point.attributes["rpc.method"], point.attributes["rpc.grpc.status"])
                            counts[key] = point.count
        return counts


@pytest.fixture
def observed():
    return Observed()


@pytest.fixture
def tokens(tmp_path):
    reader, writer, admin = new_token(), new_token(), new_token()
    path = tmp_path / "tokens.json"
    write_tokens_file(path, [("reader", reader, ["svc:read"]), ("writer", writer, ["svc:*"]), ("admin", admin, ["*"])])
    return path, {"reader": reader, "writer": writer, "admin": admin}


@contextlib.asynccontextmanager
async def serving(interceptor, recorder):
    server = grpc.aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers((generic_handler(recorder),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
            # Every call answered has ended its span (see _OpenServerSpans); one still running (a handler
            # that never answers) is cancelled by the stop.
            with contextlib.suppress(AssertionError):
                await eventually(lambda: _OpenServerSpans.open <= 0, timeout=10)
    finally:
        await server.stop(None)


def bearer(token):
    return [("authorization", f"Bearer {token}")]


async def test_a_call_continues_the_callers_trace_in_one_server_span(observed):
    recorder = Recorder()
    async with serving(CdpInterceptor(observed.telemetry), recorder) as channel:
        traceparent = [("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01")]
        assert await channel.unary_unary("/test.Svc/Echo")(b"hi", metadata=traceparent) == b"hi"
        await channel.unary_unary("/test.Svc/Echo")(b"untraced")

    traced, untraced = observed.server_spans()
    assert traced.name == "test.Svc/Echo"
    assert format(traced.context.trace_id, "032x") == TRACE_ID
    assert format(traced.parent.span_id, "016x") == PARENT_SPAN_ID and traced.parent.is_remote
    assert dict(traced.attributes) == {
        "rpc.system": "grpc",
        "rpc.service": "test.Svc",
        "rpc.method": "Echo",
        "rpc.grpc.status_code": 0,
    }
    assert traced.status.status_code == StatusCode.UNSET
    assert untraced.parent is None and format(untraced.context.trace_id, "032x") != TRACE_ID
    # The span is current while the handler runs, so its logs and outgoing messages carry the trace.
    assert [(trace_id, span_id) for _, _, trace_id, span_id in recorder.calls] == [
        (traced.context.trace_id, traced.context.span_id),
        (untraced.context.trace_id, untraced.context.span_id),
    ]
    assert current_caller().name == "anonymous"
    assert observed.durations() == {("/test.Svc/Echo", "OK"): 2}


async def test_a_domain_error_becomes_its_status_with_details(observed, caplog):
    caplog.set_level(logging.INFO, logger="cdp.grpc")
    async with serving(CdpInterceptor(observed.telemetry), Recorder()) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await channel.unary_unary("/test.Svc/Fail")(b"bad-field")

    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad.value.details() == "traits.email: must contain '@'"
    details = rpc_status.from_call(bad.value).details
    info, request = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    assert details[0].Unpack(info) and (info.reason, info.domain) == ("invalid_argument", "cdp")
    assert details[1].Unpack(request)
    assert [(v.field, v.description) for v in request.field_violations] == [("traits.email", "must contain '@'")]

    (span,) = observed.server_spans()
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert span.status.status_code == StatusCode.ERROR
    assert span.status.description == "INVALID_ARGUMENT"
    assert observed.durations() == {("/test.Svc/Fail", "INVALID_ARGUMENT"): 1}
    (line,) = [r for r in caplog.records if r.name == "cdp.grpc"]
    assert (line.levelname, line.getMessage(), line.status) == ("INFO", "grpc call rejected", "INVALID_ARGUMENT")
    assert (line.method, line.reason, line.field) == ("/test.Svc/Fail", "invalid_argument", "traits.email")


async def test_an_answer_a_poll_expects_is_logged_at_debug_not_once_per_call_at_info(observed, caplog):
    """`cdpctl profile --wait` asks every 200 ms until the person exists: each NOT_FOUND is the answer
    "not yet", not a rejection, and an INFO line per poll buried the service's log. NOT_FOUND and
    ALREADY_EXISTS go to DEBUG (still counted, still in the span); bad input stays INFO."""
    caplog.set_level(logging.INFO, logger="cdp.grpc")
    async with serving(CdpInterceptor(observed.telemetry), Recorder()) as channel:
        for request in [b"not-found"] * 20 + [b"exists"]:
            with pytest.raises(grpc.aio.AioRpcError):
                await channel.unary_unary("/test.Svc/Fail")(request)
        # The server records and logs a call as its handler ends, and the caller may see the status first (a
        # full run logged the last call's DEBUG line after the level below was set). Recorded, it is logged
        # (or not) too: the same step, nothing awaited in between.
        done = {("/test.Svc/Fail", "NOT_FOUND"): 20, ("/test.Svc/Fail", "ALREADY_EXISTS"): 1}
        for _ in range(1000):
            if observed.durations() == done:
                break
            await asyncio.sleep(0.01)
        assert observed.durations() == done
        assert [r for r in caplog.records if r.name == "cdp.grpc"] == []

        caplog.set_level(logging.DEBUG, logger="cdp.grpc")
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await channel.unary_unary("/test.Svc/Fail")(b"not-found")
        with pytest.raises(grpc.aio.AioRpcError):
            await channel.unary_unary("/test.Svc/Fail")(b"bad-field")

    assert missing.value.code() == grpc.StatusCode.NOT_FOUND  # the caller's answer is unchanged
    assert observed.durations() == {
        ("/test.Svc/Fail", "NOT_FOUND"): 21,
        ("/test.Svc/Fail", "ALREADY_EXISTS"): 1,
        ("/test.Svc/Fail", "INVALID_ARGUMENT"): 1,
    }
    not_found, invalid = [r for r in caplog.records if r.name == "cdp.grpc"]
    assert (not_found.levelname, not_found.getMessage(), not_found.status) == (
        "DEBUG",
        "grpc call rejected",
        "NOT_FOUND",
    )
    assert (not_found.method, not_found.reason) == ("/test.Svc/Fail", "not_found")
    assert "ada@example.com" not in str(not_found.__dict__)
    assert (invalid.levelname, invalid.status) == ("INFO", "INVALID_ARGUMENT")


async def test_a_long_error_is_shortened_to_fit_the_trailers_and_still_names_its_field(observed):
    """What the fuzz found: a definition naming 2,000 unknown segments was refused with a message of
    ~100 KB; the trailers carrying it passed gRPC's 16 KB metadata limit, and the caller got
    RESOURCE_EXHAUSTED ("Stream removed") instead of INVALID_ARGUMENT naming the field."""
    async with serving(CdpInterceptor(observed.telemetry), Recorder()) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await channel.unary_unary("/test.Svc/Fail")(b"long")

    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad.value.details().startswith('definition.text: in_segment("s0") is not a segment ✗')
    assert "more characters" in bad.value.details()
    request = error_details_pb2.BadRequest()
    assert rpc_status.from_call(bad.value).details[1].Unpack(request)
    [violation] = request.field_violations
    assert violation.field == "definition.text"
    assert violation.description.startswith('in_segment("s0") is not a segment ✗')
    assert len(violation.description.encode()) <= 1100


async def test_the_caller_hears_the_value_that_failed_the_log_and_span_do_not(observed, caplog):
    caplog.set_level(logging.DEBUG)
    async with serving(CdpInterceptor(observed.telemetry), Recorder()) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await channel.unary_unary("/test.Svc/Fail")(b"bad-value")

    assert "ada.example.com" in bad.value.details()  # the caller's own value, to fix their request
    (span,) = observed.server_spans()
    assert "ada.example.com" not in (span.status.description or "")
    for record in caplog.records:
        assert "ada.example.com" not in str({**record.__dict__, "msg": record.getMessage()}), record.name


async def test_an_unexpected_error_is_internal_and_names_only_the_trace(observed, caplog):
    caplog.set_level(logging.INFO, logger="cdp.grpc")
    async with serving(CdpInterceptor(observed.telemetry), Recorder()) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as bug:
            await channel.unary_unary("/test.Svc/Fail")(b"bug")

    (span,) = observed.server_spans()
    assert bug.value.code() == grpc.StatusCode.INTERNAL
    assert bug.value.details() == f"internal error (trace {span.context.trace_id:032x})"
    assert span.status.status_code == StatusCode.ERROR and span.attributes["rpc.grpc.status_code"] == 13
    assert observed.durations() == {("/test.Svc/Fail", "INTERNAL"): 1}
    unhandled, failed = [r for r in caplog.records if r.name == "cdp.grpc"]
    assert unhandled.levelname == "ERROR" and "unhandled error in /test.Svc/Fail" in unhandled.getMessage()
    assert "secret internals" in str(unhandled.exc_info[1])
    assert (failed.levelname, failed.getMessage(), failed.status) == ("ERROR", "grpc call failed", "INTERNAL")


# The handlers must have started before it passes (a call whose deadline passes first is answered by grpc
# alone, and never logged): CI's loaded workers stall a process for seconds at a time.
DEADLINE = 10.0


async def test_a_call_its_caller_gave_up_on_is_deadline_exceeded_or_cancelled_never_unknown(observed, caplog):
    """A pipeline benchmark: crm's BatchGetProfiles calls (a 30 s deadline) to a profile service far behind
    were logged `grpc call failed` UNKNOWN at ERROR when the deadline passed - grpc.aio cancels the
    handler, and the cancellation set no status - and counted as UNKNOWN, which pages as a bug. They are
    what the caller saw: DEADLINE_EXCEEDED, a warning; a caller that cancelled is CANCELLED, at INFO."""
    caplog.set_level(logging.INFO, logger="cdp.grpc")
    recorder = Recorder()
    async with serving(CdpInterceptor(observed.telemetry), recorder) as channel:

        async def trickled():
            async for _ in channel.unary_stream("/test.Svc/Trickle")(b"", timeout=DEADLINE):
                pass

        # Both at once; the deadline leaves a busy machine time to start the handlers (a call whose deadline
        # passes before its handler runs is answered by grpc alone).
        late, late_stream = await asyncio.gather(
            channel.unary_unary("/test.Svc/Wait")(b"", timeout=DEADLINE), trickled(), return_exceptions=True
        )
        call = channel.unary_unary("/test.Svc/Wait")(b"")
        # Cancelled once its handler runs (the second call of Wait the recorder sees).
        await eventually(lambda: [name for name, *_ in recorder.calls].count("Wait") == 2, timeout=30)
        call.cancel()
        ended = {
            ("/test.Svc/Wait", "DEADLINE_EXCEEDED"): 1,
            ("/test.Svc/Trickle", "DEADLINE_EXCEEDED"): 1,
            ("/test.Svc/Wait", "CANCELLED"): 1,
        }
        # The server records a call as its handler ends, after the caller has its answer.
        await eventually(lambda: observed.durations() == ended, timeout=30)

    assert isinstance(late, grpc.aio.AioRpcError) and isinstance(late_stream, grpc.aio.AioRpcError)
    assert late.code() == late_stream.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    lines = sorted((r.levelname, r.getMessage(), r.method, r.status) for r in caplog.records if r.name == "cdp.grpc")
    assert lines == [
        ("INFO", "grpc call cancelled by the caller", "/test.Svc/Wait", "CANCELLED"),
        ("WARNING", "grpc call not answered before the caller's deadline", "/test.Svc/Trickle", "DEADLINE_EXCEEDED"),
        ("WARNING", "grpc call not answered before the caller's deadline", "/test.Svc/Wait", "DEADLINE_EXCEEDED"),
    ]
    assert sorted(s.status.description for s in observed.server_spans()) == [
        "CANCELLED",
        "DEADLINE_EXCEEDED",
        "DEADLINE_EXCEEDED",
    ]


async def test_a_cancellation_inside_a_call_that_goes_on_is_an_internal_error(observed, caplog):
    """A CancelledError the handler did not ask for (work it awaited was cancelled by another task) is a
    bug of the service, not the caller leaving: INTERNAL with the traceback logged, not UNKNOWN."""
    caplog.set_level(logging.INFO, logger="cdp.grpc")
    async with serving(CdpInterceptor(observed.telemetry), Recorder()) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as lost:
            await channel.unary_unary("/test.Svc/Lost")(b"", timeout=30)
        await eventually(observed.durations, timeout=30)

    assert lost.value.code() == grpc.StatusCode.INTERNAL
    assert observed.durations() == {("/test.Svc/Lost", "INTERNAL"): 1}
    unhandled, failed = [r for r in caplog.records if r.name == "cdp.grpc"]
    assert unhandled.levelname == "ERROR" and isinstance(unhandled.exc_info[1], asyncio.CancelledError)
    assert (failed.getMessage(), failed.status) == ("grpc call failed", "INTERNAL")


async def test_a_status_the_handler_set_itself_passes_through(observed):
    async with serving(CdpInterceptor(observed.telemetry), Recorder()) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as aborted:
            await channel.unary_unary("/test.Svc/Fail")(b"abort")
        with pytest.raises(grpc.aio.AioRpcError) as set_code:
            await channel.unary_unary("/test.Svc/Fail")(b"set-code")

    assert (aborted.value.code(), aborted.value.details()) == (grpc.StatusCode.FAILED_PRECONDITION, "handler said no")
    assert (set_code.value.code(), set_code.value.details()) == (grpc.StatusCode.ALREADY_EXISTS, "exists already")
    # The caller hears the details; the span (exported like a log) keeps the status only.
    assert [s.status.description for s in observed.server_spans()] == ["FAILED_PRECONDITION", "ALREADY_EXISTS"]
    assert observed.durations() == {
        ("/test.Svc/Fail", "FAILED_PRECONDITION"): 1,
        ("/test.Svc/Fail", "ALREADY_EXISTS"): 1,
    }


async def test_auth_runs_before_the_handler(observed, tokens):
    path, t = tokens
    recorder = Recorder()
    interceptor = CdpInterceptor(observed.telemetry, authenticator=TokenAuthenticator(path), method_scopes=SCOPES)
    async with serving(interceptor, recorder) as channel:
        echo = channel.unary_unary("/test.Svc/Echo")
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await echo(b"")
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await echo(b"", metadata=bearer("cdp_not-a-real-token"))
        with pytest.raises(grpc.aio.AioRpcError) as wrong_scope:
            await channel.stream_unary("/test.Svc/Sum")(iter([b"a"]), metadata=bearer(t["reader"]))
        assert recorder.calls == []  # rejected calls never reach a handler
        await echo(b"", metadata=bearer(t["reader"]))

        # PUBLIC methods authenticate their callers themselves; undeclared methods need `*` (fail closed).
        await channel.unary_unary("/test.Svc/Open")(b"")
        with pytest.raises(grpc.aio.AioRpcError) as undeclared:
            await channel.unary_unary("/test.Svc/Hidden")(b"", metadata=bearer(t["writer"]))
        await channel.unary_unary("/test.Svc/Hidden")(b"", metadata=bearer(t["admin"]))

    assert missing.value.code() == unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert wrong_scope.value.code() == undeclared.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "svc:write" in wrong_scope.value.details() and "'*'" in undeclared.value.details()
    reason = error_details_pb2.ErrorInfo()
    rpc_status.from_call(missing.value).details[0].Unpack(reason)
    assert reason.reason == "unauthenticated"
    assert [(name, caller) for name, caller, *_ in recorder.calls] == [
        ("Echo", "reader"),
        ("Open", "unauthenticated"),
        ("Hidden", "admin"),
    ]
    # Rejections are traced and counted like any other failure.
    assert [s.attributes["rpc.grpc.status_code"] for s in observed.server_spans()][:3] == [16, 16, 7]
    assert observed.durations()[("/test.Svc/Echo", "UNAUTHENTICATED")] == 2


async def test_a_public_methods_caller_holds_no_scope_while_tokens_are_checked(observed, tokens):
    """A PUBLIC method authenticates its caller itself (the collector's write key): the interceptor knows
    nobody, so whatever the handler asks of `current_caller()` is refused. Before, it ran as ANONYMOUS, the
    caller of CDP_AUTH_MODE=none, which holds `*`: a handler checking a scope would have let the internet
    through. A caller sending an admin token is no one either: the token is not read for a PUBLIC method."""
    path, t = tokens
    seen: list = []

    class Asking(Recorder):
        async def open(self, request, context):
            caller = current_caller()
            seen.append((caller.name, caller.allows("svc:read"), caller.allows("*")))
            return request

    interceptor = CdpInterceptor(observed.telemetry, authenticator=TokenAuthenticator(path), method_scopes=SCOPES)
    async with serving(interceptor, Asking()) as channel:
        await channel.unary_unary("/test.Svc/Open")(b"")
        await channel.unary_unary("/test.Svc/Open")(b"", metadata=bearer(t["admin"]))
    assert seen == [("unauthenticated", False, False)] * 2
    # Without tokens (development) every caller is ANONYMOUS, as before.
    async with serving(CdpInterceptor(observed.telemetry), Asking()) as channel:
        await channel.unary_unary("/test.Svc/Open")(b"")
    assert seen[-1] == ("anonymous", True, True)


async def test_health_needs_no_token_and_leaves_no_spans_or_metrics(observed, tokens):
    path, _ = tokens
    interceptor = CdpInterceptor(observed.telemetry, authenticator=TokenAuthenticator(path), method_scopes=SCOPES)
    async with serving(interceptor, Recorder()) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await channel.unary_unary("/test.Svc/Nope")(b"")
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert observed.server_spans() == [] and observed.durations() == {}


async def test_streaming_calls_are_traced_counted_and_mapped(observed, tokens):
    path, t = tokens
    recorder = Recorder()
    interceptor = CdpInterceptor(observed.telemetry, authenticator=TokenAuthenticator(path), method_scopes=SCOPES)
    admin = bearer(t["admin"])
    async with serving(interceptor, recorder) as channel:
        listed = [r async for r in channel.unary_stream("/test.Svc/List")(b"", metadata=bearer(t["reader"]))]
        assert listed == [b"item0", b"item1", b"item2"]
        assert await channel.stream_unary("/test.Svc/Sum")(iter([b"ab", b"cde"]), metadata=admin) == b"5"
        chatted = [r async for r in channel.stream_stream("/test.Svc/Chat")(iter([b"hi", b"yo"]), metadata=admin)]
        assert chatted == [b"HI", b"YO"]
        assert [r async for r in channel.unary_stream("/test.Svc/Written")(b"", metadata=admin)] == [b"a", b"b"]
        assert [r async for r in channel.unary_stream("/test.Svc/Generated")(b"", metadata=admin)] == [b"x", b"y"]

        received = []
        with pytest.raises(grpc.aio.AioRpcError) as midway:
            async for response in channel.unary_stream("/test.Svc/List")(b"fail-midway", metadata=admin):
                received.append(response)
        with pytest.raises(grpc.aio.AioRpcError) as unauthenticated:
            async for _ in channel.stream_stream("/test.Svc/Chat")(iter([b"hi"])):
                pass

    assert received == [b"item0"]
    assert (midway.value.code(), midway.value.details()) == (grpc.StatusCode.NOT_FOUND, "person p_1 is gone")
    assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert [(name, caller) for name, caller, *_ in recorder.calls] == [
        ("List", "reader"),
        ("Sum", "admin"),
        ("Chat", "admin"),
        ("Written", "admin"),
        ("Generated", "admin"),
        ("List", "admin"),
    ]
    spans = observed.server_spans()
    assert [(s.name, s.attributes["rpc.grpc.status_code"]) for s in spans] == [
        ("test.Svc/List", 0),
        ("test.Svc/Sum", 0),
        ("test.Svc/Chat", 0),
        ("test.Svc/Written", 0),
        ("test.Svc/Generated", 0),
        ("test.Svc/List", 5),
        ("test.Svc/Chat", 16),
    ]
    assert observed.durations() == {
        ("/test.Svc/List", "OK"): 1,
        ("/test.Svc/Sum", "OK"): 1,
        ("/test.Svc/Chat", "OK"): 1,
        ("/test.Svc/Written", "OK"): 1,
        ("/test.Svc/Generated", "OK"): 1,
        ("/test.Svc/List", "NOT_FOUND"): 1,
        ("/test.Svc/Chat", "UNAUTHENTICATED"): 1,
    }


class CountingParser:
    """A request deserializer that counts what it parsed; bound to it, `FromString` names the message type
    as a generated stub's `Message.FromString` does."""

    DESCRIPTOR = health_pb2.HealthCheckRequest.DESCRIPTOR

    def __init__(self):
        self.parsed = 0

    def FromString(self, raw):
        self.parsed += 1
        return health_pb2.HealthCheckRequest.FromString(raw)


def typed_handler(parser, seen):
    """Every request kind with a real request message type (`test.Typed`, declared by nobody: needs `*`)."""

    async def check(request, context):
        seen.append(request.service)
        return request.service.encode()

    async def watch(request, context):
        seen.append(request.service)
        yield request.service.encode()

    async def count(requests, context):
        names = [request.service async for request in requests]
        seen.extend(names)
        return b"%d" % len(names)

    async def echo(requests, context):
        async for request in requests:
            seen.append(request.service)
            yield request.service.encode()

    deserialize = parser.FromString
    return grpc.method_handlers_generic_handler(
        "test.Typed",
        {
            "Check": grpc.unary_unary_rpc_method_handler(check, request_deserializer=deserialize),
            "Watch": grpc.unary_stream_rpc_method_handler(watch, request_deserializer=deserialize),
            "Count": grpc.stream_unary_rpc_method_handler(count, request_deserializer=deserialize),
            "Echo": grpc.stream_stream_rpc_method_handler(echo, request_deserializer=deserialize),
        },
    )


GARBAGE = b"\xff\xff garbage"


async def test_a_body_that_is_not_the_request_message_is_invalid_argument_after_authentication(observed, tokens):
    path, t = tokens
    parser, seen = CountingParser(), []
    interceptor = CdpInterceptor(observed.telemetry, authenticator=TokenAuthenticator(path), method_scopes=SCOPES)
    server = grpc.aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers((typed_handler(parser, seen),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    valid = health_pb2.HealthCheckRequest(service="svc").SerializeToString()

    async def each_kind(channel, body, metadata=(), kinds=("Check", "Watch", "Count", "Echo")):
        """Send `body` with every request kind (after a valid message when requests stream); the status
        (or OK) of each."""
        calls = {
            "Check": lambda: channel.unary_unary("/test.Typed/Check")(body, metadata=metadata),
            "Watch": lambda: _drain(channel.unary_stream("/test.Typed/Watch")(body, metadata=metadata)),
            "Count": lambda: channel.stream_unary("/test.Typed/Count")(iter([valid, body]), metadata=metadata),
            "Echo": lambda: _drain(channel.stream_stream("/test.Typed/Echo")(iter([valid, body]), metadata=metadata)),
        }
        codes = {}
        for name in kinds:
            call = calls[name]
            try:
                await call()
                codes[name] = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                codes[name] = exc.code()
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    failures.append(exc)
        return codes

    failures = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            # Single requests are what grpc itself would decode before any handler ran. (A client still
            # streaming requests into a call the server already closed may fail on its own side, in grpc's
            # client, so the anonymous streamed kinds are left to test_streaming_calls_are_traced...)
            anonymous = await each_kind(channel, GARBAGE, kinds=("Check", "Watch"))
            # Rejected before decoding: an unauthenticated caller costs no parsing, whatever it sent.
            assert parser.parsed == 0 and seen == []
            authenticated = await each_kind(channel, GARBAGE, bearer(t["admin"]))
            fine = await each_kind(channel, valid, bearer(t["admin"]))
    finally:
        await server.stop(None)

    assert set(anonymous.values()) == {grpc.StatusCode.UNAUTHENTICATED}
    assert set(authenticated.values()) == {grpc.StatusCode.INVALID_ARGUMENT}
    assert set(fine.values()) == {grpc.StatusCode.OK}
    assert len(failures) == 4
    for exc in failures:
        assert "grpc.health.v1.HealthCheckRequest" in exc.details()
        assert "<class" not in exc.details() and "DecodeError" not in exc.details()
        request = error_details_pb2.BadRequest()
        assert any(d.Unpack(request) for d in rpc_status.from_call(exc).details)
        assert [v.field for v in request.field_violations] == ["request"]
    # Garbage reached no handler; the echo stream had handled the valid message sent before it.
    assert seen == ["svc"] + ["svc"] * 6
    assert observed.durations()[("/test.Typed/Check", "INVALID_ARGUMENT")] == 1
    assert observed.durations()[("/test.Typed/Check", "UNAUTHENTICATED")] == 1


async def _drain(responses):
    return [response async for response in responses]


async def test_a_refused_or_failed_call_does_not_keep_its_request_until_a_full_collection(observed, tokens, caplog):
    """A security trial grew profile from 70 MB to 2.6 GB with 150 token-less 15 MB calls, each answered
    UNAUTHENTICATED: the refusal's exception held the call's frame (and its request bytes) in a reference
    cycle through the call's context, freed only by a full garbage collection, which a busy service rarely
    runs. Refused and failed calls must let their request go when they end."""
    import gc
    import tracemalloc

    path, t = tokens
    interceptor = CdpInterceptor(observed.telemetry, authenticator=TokenAuthenticator(path), method_scopes=SCOPES)
    body = b"x" * (1 << 20)
    # pytest's log capture keeps every record, and an unhandled error's record its traceback: the services'
    # JSON handler formats a record and lets it go.
    caplog.set_level(logging.CRITICAL, logger="cdp.grpc")
    async with serving(interceptor, Recorder()) as channel:
        echo, fail = channel.unary_unary("/test.Svc/Echo"), channel.unary_unary("/test.Svc/Fail")
        gc.collect()
        gc.disable()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            codes = set()
            for _ in range(20):
                # Caught here, not kept (pytest.raises keeps the client's frames in a cycle of its own).
                for call, metadata in ((echo, None), (fail, bearer(t["reader"]))):  # no token; the handler fails
                    try:
                        await call(body, metadata=metadata)
                    except grpc.aio.AioRpcError as exc:
                        codes.add(exc.code())
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
            gc.enable()
    assert codes == {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INTERNAL}
    assert held < 4 * len(body), f"{held / len(body):.0f} request bodies still held after 40 ended calls"


async def test_refusals_name_the_token_and_exports_and_deletions_are_audited(observed, tokens, caplog):
    """A security trial probed other services' methods with a stolen token and nothing said whose; and a
    person's export or deletion left no line saying who asked. A token's name is a label, not a secret."""
    path, t = tokens
    scopes = {**SCOPES, "/test.Svc/Open": "privacy:export"}  # a method of an audited scope
    interceptor = CdpInterceptor(observed.telemetry, authenticator=TokenAuthenticator(path), method_scopes=scopes)
    caplog.set_level(logging.INFO, logger="cdp.grpc")
    async with serving(interceptor, Recorder()) as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await channel.stream_unary("/test.Svc/Sum")(iter([b"a"]), metadata=bearer(t["reader"]))
        await channel.unary_unary("/test.Svc/Echo")(b"", metadata=bearer(t["reader"]))  # not audited
        await channel.unary_unary("/test.Svc/Open")(b"", metadata=bearer(t["admin"]))
    lines = [(r.getMessage(), r.method, r.status, getattr(r, "caller", None)) for r in caplog.records]
    assert lines == [
        ("grpc call rejected", "/test.Svc/Sum", "PERMISSION_DENIED", "reader"),
        ("grpc call", "/test.Svc/Open", "OK", "admin"),
    ]
