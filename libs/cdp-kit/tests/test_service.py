"""The service bootstrap: health, reflection, auth with scopes, error mapping, tracing, shutdown."""

import asyncio
import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import sys

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

from cdp.collector.v1 import collector_pb2, collector_pb2_grpc
from cdp_kit.auth import new_token, write_tokens_file
from cdp_kit.errors import InvalidArgument, Unavailable
from cdp_kit.interceptors import current_caller
from cdp_kit.service import serving
from cdp_kit.settings import ServiceSettings
from cdp_kit.telemetry import inject_context, setup_telemetry, trace_sampler
from cdp_testing.waiting import until

SERVICE = collector_pb2.DESCRIPTOR.services_by_name["CollectorService"]


class Behaviour(collector_pb2_grpc.CollectorServiceServicer):
    """A servicer whose behaviour is chosen by the write key, to exercise the kit."""

    def __init__(self):
        self.callers = []

    async def Collect(self, request, context):
        self.callers.append(current_caller().name)
        if request.write_key == "bad-field":
            raise InvalidArgument("events[2].user_id", "must not be empty")
        if request.write_key == "busy":
            raise Unavailable("bus is down", retry_after=3)
        if request.write_key == "bug":
            raise KeyError("secret internals")
        if request.write_key == "slow":
            await asyncio.sleep(0.5)
        return collector_pb2.CollectResponse(accepted=len(request.events))


@pytest.fixture
def tokens(tmp_path):
    writer, reader, admin = new_token(), new_token(), new_token()
    path = tmp_path / "tokens.json"
    write_tokens_file(
        path, [("writer", writer, ["collector:write"]), ("reader", reader, ["profile:read"]), ("admin", admin, ["*"])]
    )
    return path, {"writer": writer, "reader": reader, "admin": admin}


def settings(**overrides):
    base = dict(
        nats_url="nats://unused:4222",
        service_name="kit-test",
        grpc_host="127.0.0.1",
        auth_mode="none",
        shutdown_grace=2.0,
    )
    base.update(overrides)
    return ServiceSettings(**base)


def setup_with(servicer, scopes=None):
    async def setup(runtime):
        runtime.grpc.add_service(
            collector_pb2_grpc.add_CollectorServiceServicer_to_server,
            servicer,
            SERVICE,
            scopes or {"Collect": "collector:write"},
        )

    return setup


async def collect(port, write_key="ok", token=None, metadata=()):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = collector_pb2_grpc.CollectorServiceStub(channel)
        md = list(metadata) + ([("authorization", f"Bearer {token}")] if token else [])
        return await stub.Collect(collector_pb2.CollectRequest(write_key=write_key), metadata=md)


async def test_health_serving_without_a_token_and_reflection_with_one(tokens):
    path, t = tokens
    async with serving(settings(auth_mode="tokens", auth_tokens_file=path), setup_with(Behaviour())) as rt:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{rt.grpc.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", "cdp.collector.v1.CollectorService"):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            # Reflection maps every method: any valid token (here one without a collector scope) reads it.
            names = await reflected_services(channel, token=t["reader"])
            assert "cdp.collector.v1.CollectorService" in names and "grpc.health.v1.Health" in names


async def reflected_services(channel, token=None) -> list[str]:
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    metadata = [("authorization", f"Bearer {token}")] if token else []
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = reflect.ServerReflectionInfo(iter([request]), metadata=metadata)
    return [s.name async for r in responses for s in r.list_services_response.service]


async def test_bearer_tokens_and_scopes(tokens):
    path, t = tokens
    servicer = Behaviour()
    async with serving(settings(auth_mode="tokens", auth_tokens_file=path), setup_with(servicer)) as rt:
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await collect(rt.grpc.port)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await collect(rt.grpc.port, token="cdp_not-a-real-token")
        assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as wrong_scope:
            await collect(rt.grpc.port, token=t["reader"])
        assert wrong_scope.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "collector:write" in wrong_scope.value.details()
        assert (await collect(rt.grpc.port, token=t["writer"])).accepted == 0
        await collect(rt.grpc.port, token=t["admin"])
    assert servicer.callers == ["writer", "admin"]


async def test_a_rotated_tokens_file_takes_effect_without_restart(tokens):
    path, t = tokens
    async with serving(settings(auth_mode="tokens", auth_tokens_file=path), setup_with(Behaviour())) as rt:
        await collect(rt.grpc.port, token=t["writer"])
        rotated = new_token()
        write_tokens_file(path, [("writer", rotated, ["collector:write"])])
        with pytest.raises(grpc.aio.AioRpcError) as revoked:
            await collect(rt.grpc.port, token=t["writer"])
        assert revoked.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await collect(rt.grpc.port, token=rotated)


def test_every_rpc_must_declare_a_scope():
    from cdp_kit.service import GrpcServer

    server = GrpcServer(settings(), setup_telemetry("kit-test"))
    with pytest.raises(ValueError, match="missing \\['Collect'\\]"):
        server.add_service(collector_pb2_grpc.add_CollectorServiceServicer_to_server, Behaviour(), SERVICE, {})


async def test_domain_errors_become_rich_statuses():
    async with serving(settings(), setup_with(Behaviour())) as rt:
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await collect(rt.grpc.port, write_key="bad-field")
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        status = rpc_status.from_call(bad.value)
        violations = []
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                request = error_details_pb2.BadRequest()
                detail.Unpack(request)
                violations += [(v.field, v.description) for v in request.field_violations]
        assert violations == [("events[2].user_id", "must not be empty")]

        with pytest.raises(grpc.aio.AioRpcError) as busy:
            await collect(rt.grpc.port, write_key="busy")
        assert busy.value.code() == grpc.StatusCode.UNAVAILABLE
        retry = [d for d in rpc_status.from_call(busy.value).details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
        info = error_details_pb2.RetryInfo()
        retry[0].Unpack(info)
        assert info.retry_delay.seconds == 3

        with pytest.raises(grpc.aio.AioRpcError) as bug:
            await collect(rt.grpc.port, write_key="bug")
        assert bug.value.code() == grpc.StatusCode.INTERNAL
        assert "secret internals" not in bug.value.details()


def caller_tracer(sampled: bool) -> trace.Tracer:
    """A caller's own tracer (another process in real life), which samples its traces or not."""
    return TracerProvider(sampler=ALWAYS_ON if sampled else ALWAYS_OFF).get_tracer("caller")


async def test_the_callers_trace_continues_on_the_server():
    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry("kit-test", span_processors=[SimpleSpanProcessor(exporter)])
    async with serving(settings(), setup_with(Behaviour()), telemetry=telemetry) as rt:
        with caller_tracer(sampled=True).start_as_current_span("client") as span:
            carrier = {}
            inject_context(carrier)
            await collect(rt.grpc.port, metadata=carrier.items())
            trace_id = span.get_span_context().trace_id
    server_spans = [s for s in exporter.get_finished_spans() if s.name == "cdp.collector.v1.CollectorService/Collect"]
    assert server_spans and server_spans[-1].context.trace_id == trace_id
    assert server_spans[-1].kind == trace.SpanKind.SERVER


class TraceSeen(Behaviour):
    async def Collect(self, request, context):
        span = trace.get_current_span()
        self.callers.append((span.get_span_context().trace_id, span.is_recording()))
        return collector_pb2.CollectResponse()


async def test_a_trace_its_caller_did_not_sample_continues_unrecorded():
    """Parent-based sampling: the server keeps the trace id (its logs and outgoing messages carry it)
    but records nothing for a caller that dropped its trace."""
    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry("kit-test", span_processors=[SimpleSpanProcessor(exporter)])
    servicer = TraceSeen()
    async with serving(settings(), setup_with(servicer), telemetry=telemetry) as rt:
        with caller_tracer(sampled=False).start_as_current_span("client") as span:
            carrier = {}
            inject_context(carrier)
            await collect(rt.grpc.port, metadata=carrier.items())
            trace_id = span.get_span_context().trace_id
    assert servicer.callers == [(trace_id, False)]
    assert not [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]


def test_traces_started_here_are_sampled_at_a_ratio_set_by_the_standard_variables():
    from opentelemetry.sdk.trace.sampling import Decision

    def kept(environ, trace_ids) -> int:
        sampler = trace_sampler(environ)
        return sum(sampler.should_sample(None, t, "root").decision == Decision.RECORD_AND_SAMPLE for t in trace_ids)

    ids = [random.Random(n).getrandbits(128) for n in range(2000)]
    assert 100 < kept({}, ids) < 300  # the default: one trace in ten
    assert kept({"OTEL_TRACES_SAMPLER_ARG": "1"}, ids) == 2000
    assert kept({"OTEL_TRACES_SAMPLER_ARG": "0"}, ids) == 0
    assert trace_sampler({"OTEL_TRACES_SAMPLER": "parentbased_always_on"}) is None  # the SDK builds that one
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER_ARG"):
        trace_sampler({"OTEL_TRACES_SAMPLER_ARG": "lots"})


def test_the_event_loop_is_uvloop_unless_asked_otherwise(monkeypatch):
    import sys

    import uvloop

    from cdp_kit.service import event_loop_factory
    from cdp_kit.settings import SettingsError

    def loop_type(choice=None) -> type:
        loop = event_loop_factory(choice)()
        try:
            return type(loop)
        finally:
            loop.close()

    monkeypatch.delenv("CDP_EVENT_LOOP", raising=False)
    assert loop_type() is uvloop.Loop
    monkeypatch.setenv("CDP_EVENT_LOOP", "asyncio")
    assert loop_type() is not uvloop.Loop and issubclass(loop_type(), asyncio.BaseEventLoop)
    with pytest.raises(SettingsError, match="CDP_EVENT_LOOP"):
        event_loop_factory("trio")
    monkeypatch.setitem(sys.modules, "uvloop", None)  # not installed
    assert loop_type("auto") is not uvloop.Loop
    with pytest.raises(SettingsError, match="uvloop is not installed"):
        event_loop_factory("uvloop")


async def test_shutdown_reports_not_serving_and_drains_in_flight_calls():
    behaviour = Behaviour()
    async with serving(settings(), setup_with(behaviour)) as rt:
        port = rt.grpc.port
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = collector_pb2_grpc.CollectorServiceStub(channel)
        in_flight = asyncio.ensure_future(stub.Collect(collector_pb2.CollectRequest(write_key="slow")))
        # In flight means the handler has it (it then sleeps 0.5 s): 0.1 s after the call, as it was, the
        # channel had often not connected yet on a loaded machine, and the stop refused the call instead.
        await until(lambda: behaviour.callers, "the call to reach its handler")
        stopping = asyncio.ensure_future(rt.grpc.stop(2.0))
        await asyncio.sleep(0.05)
        reply = await in_flight  # the in-flight call completes during the drain
        assert reply.accepted == 0
        await stopping
        await channel.close()


def test_settings_fail_fast_naming_every_problem(tmp_path):
    from cdp_kit.settings import SettingsError, load_settings

    with pytest.raises(SettingsError) as info:
        load_settings(ServiceSettings, environ={"CDP_GRPC_PORT": "eighty", "CDP_AUTH_MODE": "tokens"})
    text = str(info.value)
    assert "CDP_NATS_URL is required" in text and "CDP_GRPC_PORT='eighty' is invalid" in text
    with pytest.raises(SettingsError, match="CDP_AUTH_TOKENS_FILE is required"):
        load_settings(ServiceSettings, environ={"CDP_NATS_URL": "nats://x:4222"})
    ok = load_settings(
        ServiceSettings, environ={"CDP_NATS_URL": "nats://x:4222", "CDP_AUTH_MODE": "none", "CDP_PARTITIONS": "16"}
    )
    assert dataclasses.replace(ok).partitions == 16


async def test_a_plaintext_health_port_answers_probes_and_nothing_else():
    from cdp_kit.natsserver import free_port

    health_port = free_port()
    async with serving(settings(health_port=health_port), setup_with(Behaviour())):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collector_pb2_grpc.CollectorServiceStub(channel).Collect(collector_pb2.CollectRequest())
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_a_body_that_is_not_the_request_is_rejected_by_auth_first_then_as_invalid(tokens):
    path, t = tokens
    servicer = Behaviour()
    async with serving(settings(auth_mode="tokens", auth_tokens_file=path), setup_with(servicer)) as rt:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{rt.grpc.port}") as channel:
            # A generic call: the bytes go out as they are, whatever the method expects.
            raw = channel.unary_unary(
                "/cdp.collector.v1.CollectorService/Collect", request_serializer=None, response_deserializer=None
            )
            with pytest.raises(grpc.aio.AioRpcError) as anonymous:
                await raw(b"\xff\xff garbage")
            with pytest.raises(grpc.aio.AioRpcError) as garbage:
                await raw(b"\xff\xff garbage", metadata=[("authorization", f"Bearer {t['writer']}")])

    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cdp.collector.v1.CollectRequest" in garbage.value.details()
    assert "class" not in garbage.value.details() and "Error" not in garbage.value.details()
    violations = []
    for detail in rpc_status.from_call(garbage.value).details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            request = error_details_pb2.BadRequest()
            detail.Unpack(request)
            violations += [v.field for v in request.field_violations]
    assert violations == ["request"]
    assert servicer.callers == []


def _answers_http(host, port):
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            return sock.recv(12).startswith(b"HTTP/1.0 200")
    except OSError:
        return False


async def test_metrics_listen_on_the_configured_host_only():
    from cdp_kit.natsserver import free_port

    metrics_port = free_port()
    async with serving(settings(grpc_host="127.0.0.1", metrics_port=metrics_port), setup_with(Behaviour())):
        assert await asyncio.to_thread(_answers_http, "127.0.0.1", metrics_port)
        # 127.0.0.2 is this machine too (all of 127/8 is loopback): a listener on every interface answers
        # there, one on 127.0.0.1 does not.
        assert not await asyncio.to_thread(_answers_http, "127.0.0.2", metrics_port)
    # Stopping the service releases the port: nothing listens on it any more.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", metrics_port))


HANGS_ON_STOP = """
import asyncio
import signal
from cdp_kit.service import run_main
from cdp_kit.settings import ServiceSettings

async def setup(runtime):
    async def drain_that_never_ends():
        await asyncio.Event().wait()

    runtime.stack.push_async_callback(drain_that_never_ends)
    runtime.spawn(announce(), "announce")

async def announce():
    # Once the stop handlers are in place (run_service installs them after serving starts).
    while signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        await asyncio.sleep(0.01)
    print("stoppable", flush=True)
    await asyncio.Event().wait()

run_main(ServiceSettings, setup)
"""


def test_a_stop_that_hangs_ends_the_process_after_its_bound(tmp_path):
    # No supervisor may be left to SIGKILL a service whose stop hangs (cdpctl up SIGKILLed ends its
    # children with SIGTERM, nats-server among them): the process ends itself, exit code 1, naming why.
    env = {
        **os.environ,
        "CDP_NATS_URL": "nats://127.0.0.1:1",
        "CDP_AUTH_MODE": "none",
        "CDP_GRPC_HOST": "127.0.0.1",
        "CDP_SHUTDOWN_GRACE": "0.5",
        "CDP_STORE_URL": f"sqlite:///{tmp_path / 'cdp.db'}",
        "OTEL_SERVICE_NAME": "hangs-on-stop",
        "CDP_EVENT_LOOP": "asyncio",  # its signal handlers show in signal.getsignal
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", HANGS_ON_STOP], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "stoppable"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 1
        assert "hangs-on-stop did not stop within 4s; exiting" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("which", ["grpc_port", "health_port"])
async def test_a_port_another_socket_has_stops_start_up_naming_the_port_and_its_variable(which):
    from cdp_kit.natsserver import free_port

    with socket.socket() as taken:  # another program listening there (or a connection given the port)
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        overrides = {which: port} if which == "grpc_port" else {"grpc_port": free_port(), which: port}
        with pytest.raises(RuntimeError) as caught:
            async with serving(settings(**overrides), setup_with(Behaviour())):
                pass
    variable = "CDP_GRPC_PORT" if which == "grpc_port" else "CDP_HEALTH_PORT"
    assert f"127.0.0.1:{port}" in str(caught.value) and variable in str(caught.value)
    assert "in use" in str(caught.value)


async def test_while_a_store_cannot_write_the_health_of_cdp_storage_says_so_and_liveness_stays_serving(monkeypatch):
    from cdp_kit import service
    from cdp_kit.storage import health as stores

    monkeypatch.setattr(service, "STORE_HEALTH_SECONDS", 0.05)

    async def status(channel, name):
        request = health_pb2.HealthCheckRequest(service=name)
        return (await health_pb2_grpc.HealthStub(channel).Check(request)).status

    async def until(channel, name, wanted):
        for _ in range(100):
            if await status(channel, name) == wanted:
                return True
            await asyncio.sleep(0.05)
        return False

    async with serving(settings(), setup_with(Behaviour())) as rt:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{rt.grpc.port}") as channel:
            assert await until(channel, stores.HEALTH_NAME, health_pb2.HealthCheckResponse.SERVING)
            stores.cannot_write("/data/kit-test.db")  # as the SQLite store does on a full disk
            try:
                assert await until(channel, stores.HEALTH_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
                assert await status(channel, "") == health_pb2.HealthCheckResponse.SERVING  # no restart for it
            finally:
                stores.writes_again("/data/kit-test.db")
            assert await until(channel, stores.HEALTH_NAME, health_pb2.HealthCheckResponse.SERVING)


FAILS_TO_START = """
from cdp_kit.errors import Unavailable
from cdp_kit.service import run_main
from cdp_kit.settings import ServiceSettings

async def setup(runtime):
    raise Unavailable("cannot connect to NATS at nats://127.0.0.1:1 (CDP_NATS_URL): not answering")

run_main(ServiceSettings, setup)
"""


def test_a_start_that_cannot_reach_what_it_needs_ends_with_one_line_naming_it(tmp_path):
    env = {
        **os.environ,
        "CDP_NATS_URL": "nats://127.0.0.1:1",
        "CDP_AUTH_MODE": "none",
        "CDP_GRPC_HOST": "127.0.0.1",
        "CDP_STORE_URL": f"sqlite:///{tmp_path / 'cdp.db'}",
        "OTEL_SERVICE_NAME": "fails-to-start",
    }
    done = subprocess.run([sys.executable, "-c", FAILS_TO_START], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    [line] = [json.loads(text) for text in done.stderr.splitlines() if "cannot start" in text]
    assert line["level"] == "ERROR" and line["error"] == "Unavailable"
    assert "nats://127.0.0.1:1 (CDP_NATS_URL): not answering" in line["msg"]
