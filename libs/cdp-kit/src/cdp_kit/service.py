"""How every cdp service starts, serves and stops.

    def main() -> None:
        run_main(CollectorSettings, setup)          # settings from env, fail fast, then serve

    async def setup(runtime: ServiceRuntime) -> None:
        bus = await runtime.stack.enter_async_context(Bus.connect(...))   # resources live on one stack
        runtime.grpc.add_service(add_XServicer_to_server, XApi(...), x_pb2.DESCRIPTOR.services_by_name["X"],
                                 scopes={"Get": "x:read"})

The grpc.aio server carries the standard health service (SERVING once setup finished; NOT_SERVING the
moment shutdown starts, so Kubernetes stops routing before the drain; a service may hold one of its
gRPC services' names NOT_SERVING while it cannot answer, e.g. a standby: `GrpcServer.set_ready`, which
a readiness probe naming that service follows while liveness, on "", stays SERVING; and `cdp.storage`
reads NOT_SERVING while a store of the process cannot write, see `cdp_kit.storage.health`), reflection
(for callers with a valid token), and the cdp interceptor (auth, tracing, metrics, error mapping). SIGTERM/SIGINT become an asyncio.Event; shutdown drains in-flight calls for CDP_SHUTDOWN_GRACE
seconds, then closes every resource in reverse order of acquisition. A loop held for CDP_LOOP_STALL_SECONDS
is said at WARNING while it is held, with where (`cdp_kit.loopwatch`).

The event loop: `CDP_EVENT_LOOP` = `uvloop` (the default when uvloop is importable), `asyncio` (the
standard library's), or `auto` (the same as unset). It is read before the settings class exists (the loop
runs the service that loads them), so it is the one variable the runtime reads itself; a value it does
not know, or `uvloop` asked for where it is not installed, stops start-up naming the variable.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import resource
import signal
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import metrics

from cdp_kit.auth import TokenAuthenticator, TokenFile, bearer_from_file, token_file_variable
from cdp_kit.errors import Unauthenticated, Unavailable
from cdp_kit.interceptors import PUBLIC, CdpInterceptor
from cdp_kit.logging import configure_logging
from cdp_kit.loopwatch import LoopWatch
from cdp_kit.settings import ServiceSettings, SettingsError, load_settings
from cdp_kit.telemetry import Telemetry, setup_telemetry
from cdp_kit.tls_client import ClientCertificates, FollowingChannel
from cdp_kit.tls_reload import ServerCertificates

log = logging.getLogger("cdp.service")

S = TypeVar("S", bound=ServiceSettings)

# Batches of events travel in one message; the collector enforces its own, smaller, documented limits.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# The plaintext health port (CDP_HEALTH_PORT): kubelet probes, a few at a time, each a few bytes.
HEALTH_MAX_CONNECTIONS = 64
HEALTH_MAX_RECEIVE_BYTES = 4096


def open_file_limit() -> int:
    """The process's open-file limit (the soft one: what accept() fails beyond)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class GrpcServer:
    """A grpc.aio server with health, reflection and the cdp interceptor (auth, tracing, metrics, errors)."""

    def __init__(self, settings: ServiceSettings, telemetry: Telemetry) -> None:
        self.settings = settings
        self.telemetry = telemetry
        self.health = health.aio.HealthServicer()
        self._method_scopes: dict[str, str] = {}
        self._service_names: list[str] = []
        self._registrations: list[tuple[Callable[[Any, Any], None], Any]] = []
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self.port: int | None = None
        self._unready: set[str] = set()  # service names held NOT_SERVING (set_ready)
        self._serving = False
        # The longest request message taken; a service whose requests are smaller lowers it before start
        # (the collector: its port faces the internet), and longer ones are refused from their length.
        self.max_receive_bytes = DEFAULT_MAX_MESSAGE_BYTES
        # The longest answer sent; a service with longer ones (profile's export of a person) raises it.
        self.max_send_bytes = DEFAULT_MAX_MESSAGE_BYTES
        # What callers may hold, so a flood of connections or calls cannot take every file descriptor or all
        # memory (grpc core bounds none of these by default, and waits 120 s for a handshake). Past the
        # connection cap a new connection is closed at once (the caller sees UNAVAILABLE and retries); calls
        # past the per-connection cap wait in the caller's channel. Neither ends a long stream, and no age
        # limit is set: SubscribeInbox and TrainModel streams run for as long as they need.
        self.max_connections = max(16, open_file_limit() // 4)
        self.max_calls_per_connection = 1000
        self.handshake_seconds = 20.0  # to begin HTTP/2 (after TLS, when on) on a new connection
        # A connection with no call for this long is closed (HTTP/2 GOAWAY; a client's channel connects
        # again at its next call). Without it, connections that sent nothing after their handshake held
        # the connection cap for ever: as many as the cap kept every other caller out (on the collector,
        # whose port faces the internet, one client's sockets kept every SDK out). A call in progress,
        # however long, keeps its connection.
        self.idle_seconds = 60.0
        self.certificates: ServerCertificates | None = None  # what the port serves, when TLS is on

    def add_service(
        self,
        add_to_server: Callable[[Any, Any], None],
        servicer: Any,
        descriptor: ServiceDescriptor,
        scopes: Mapping[str, str],
    ) -> None:
        """Register a servicer. `scopes` names, per RPC, the caller scope it needs (or PUBLIC).

        Every RPC of the service must be listed: forgetting one would leave it reachable only by
        admin tokens, which is safe but surprising, so it stops start-up instead."""
        missing = [m.name for m in descriptor.methods if m.name not in scopes]
        unknown = sorted(set(scopes) - {m.name for m in descriptor.methods})
        if missing or unknown:
            raise ValueError(
                f"scopes for {descriptor.full_name}: missing {missing or 'none'}, unknown {unknown or 'none'}"
            )
        for name, scope in scopes.items():
            self._method_scopes[f"/{descriptor.full_name}/{name}"] = scope
        self._service_names.append(descriptor.full_name)
        self._registrations.append((add_to_server, servicer))

    def _interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        authenticator = None
        if self.settings.auth_mode == "tokens":
            assert self.settings.auth_tokens_file is not None  # settings.validate guarantees it
            authenticator = TokenAuthenticator(self.settings.auth_tokens_file)
        return [CdpInterceptor(self.telemetry, authenticator=authenticator, method_scopes=self._method_scopes)]

    async def start(self) -> int:
        server = grpc.aio.server(
            interceptors=self._interceptors(),
            options=[
                ("grpc.max_receive_message_length", self.max_receive_bytes),
                ("grpc.max_send_message_length", self.max_send_bytes),
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.max_allowed_incoming_connections", self.max_connections),
                ("grpc.max_concurrent_streams", self.max_calls_per_connection),
                ("grpc.server_handshake_timeout_ms", int(self.handshake_seconds * 1000)),
                ("grpc.max_connection_idle_ms", int(self.idle_seconds * 1000)),
            ],
        )
        for add_to_server, servicer in self._registrations:
            add_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [*self._service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            server,
        )
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        if self.settings.tls_cert_file is not None:
            assert self.settings.tls_key_file is not None
            # Renewed files (a Secret cert-manager updated) are taken at the next new connection's handshake.
            certificates = ServerCertificates(
                self.settings.tls_cert_file,
                self.settings.tls_key_file,
                self.settings.tls_client_ca_file,
                self.settings.service_name,
            )
            credentials = grpc.dynamic_ssl_server_credentials(
                certificates.initial(),
                certificates.fetch,
                require_client_authentication=certificates.require_client_auth,
            )
            certificates.instrument(self.telemetry.meter)
            self.certificates = certificates
            self.port = _bind(lambda: server.add_secure_port(address, credentials), address, "CDP_GRPC_PORT")
        else:
            self.port = _bind(lambda: server.add_insecure_port(address), address, "CDP_GRPC_PORT")
        await server.start()
        self._server = server
        if self.settings.health_port:
            # Kubelet gRPC probes speak neither TLS nor bearer tokens: give them a plaintext port that
            # serves health and nothing else.
            # Bounded as the main port is, and tighter: probes are small, short and few. Unbounded, one
            # client held 3,000 connections there, and could take every file descriptor of the process.
            health_server = grpc.aio.server(
                options=[
                    ("grpc.max_receive_message_length", HEALTH_MAX_RECEIVE_BYTES),
                    ("grpc.so_reuseport", 0),
                    ("grpc.max_allowed_incoming_connections", HEALTH_MAX_CONNECTIONS),
                    ("grpc.max_concurrent_streams", 16),
                    ("grpc.server_handshake_timeout_ms", int(self.handshake_seconds * 1000)),
                    ("grpc.max_connection_idle_ms", int(self.idle_seconds * 1000)),
                ]
            )
            health_pb2_grpc.add_HealthServicer_to_server(self.health, health_server)
            health_address = f"{self.settings.grpc_host}:{self.settings.health_port}"
            try:
                _bind(lambda: health_server.add_insecure_port(health_address), health_address, "CDP_HEALTH_PORT")
            except RuntimeError:
                await self.stop(0)
                raise
            await health_server.start()
            self._health_server = health_server
        return self.port

    async def set_serving(self) -> None:
        self._serving = True
        for name in ("", *self._service_names):
            await self.health.set(name, self._status(name))

    async def set_ready(self, name: str, ready: bool) -> None:
        """Whether the gRPC service `name` can answer now (a standby cannot). The process stays SERVING
        under "" (liveness); a readiness probe on `name` takes the pod out of its Service meanwhile."""
        if ready:
            self._unready.discard(name)
        else:
            self._unready.add(name)
        if self._serving:
            await self.health.set(name, self._status(name))

    def _status(self, name: str):
        if name in self._unready:
            return health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse.SERVING

    async def stop(self, grace: float) -> None:
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace)
        self._server = None
        if self._health_server is not None:
            await self._health_server.stop(0)
            self._health_server = None


def _bind(add_port: Callable[[], int], address: str, variable: str) -> int:
    """The port `add_port` bound, or a RuntimeError naming the address and the variable that set it
    (grpc raises 'Failed to bind' naming neither the cause nor the setting, or returns 0)."""
    try:
        port = add_port()
    except RuntimeError:
        port = 0
    if not port:
        raise RuntimeError(
            f"cannot bind {address} (CDP_GRPC_HOST/{variable}): the port is in use (another program listening "
            f"there, or an outgoing connection given it as its local port) or the host is not this machine's"
        )
    return port


def _peer_of(settings: ServiceSettings, address: str) -> str | None:
    """The peer `address` belongs to, from the settings field that holds it (`profile_address` -> profile)."""
    for f in dataclasses.fields(settings):
        if f.name.endswith("_address") and getattr(settings, f.name) == address:
            return f.name.removesuffix("_address")
    return None


def client_channel(
    settings: ServiceSettings,
    address: str,
    *,
    environ: Mapping[str, str] | None = None,
    meter: metrics.Meter | None = None,
) -> grpc.aio.Channel:
    """A channel to another cdp service: mutual TLS with this service's own certificate when TLS is on,
    and the token of CDP_<PEER>_TOKEN_FILE on every call when that file is set (cdp_kit.auth: outbound).

    With TLS on, the certificate, key and CA are followed (cdp_kit.tls_client): a renewal the files receive
    is what the next call presents and trusts, on a stub built before it too. A set that does not hold
    together at start raises CertificateSetError naming the variables. `meter` (the service's, by default)
    reports when the presented certificate expires."""
    environ = os.environ if environ is None else environ
    interceptors = None
    peer = _peer_of(settings, address)
    if peer is not None and environ.get(token_file_variable(peer)):
        variable = token_file_variable(peer)
        try:
            interceptors = bearer_from_file(TokenFile(Path(environ[variable]), variable=variable))
        except ValueError as exc:
            raise SettingsError([str(exc)]) from None
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        certificates = ClientCertificates.for_files(
            settings.tls_cert_file,
            settings.tls_key_file,
            settings.tls_client_ca_file,
            settings.service_name,
            meter if meter is not None else metrics.get_meter(f"cdp.{settings.service_name}"),
        )
        return FollowingChannel(address, certificates, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, interceptors=interceptors)


@dataclass
class ServiceRuntime:
    """What setup code gets: settings, telemetry, the gRPC server, one exit stack for resources."""

    settings: ServiceSettings
    telemetry: Telemetry
    grpc: GrpcServer
    stack: AsyncExitStack
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    # Extra endpoints to announce at start-up ("http" -> "http://0.0.0.0:8080").
    endpoints: dict[str, str] = field(default_factory=dict)
    # Ports bound at start-up besides gRPC ("http" -> 8080); port 0 in settings means "pick one".
    ports: dict[str, int] = field(default_factory=dict)
    # Named parts of the running service (its bus publisher, its store…), for in-process tests and
    # operator introspection; services register what they build in setup.
    parts: dict[str, Any] = field(default_factory=dict)
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _failure: BaseException | None = None

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
        """Run a background loop for the life of the service. If it dies, the service stops (and the
        orchestrator restarts it) rather than limping on without it."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.append(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        if task.cancelled() or self.stopping.is_set():
            return
        exc = task.exception()
        if exc is not None:
            log.error("background task %s failed; stopping", task.get_name(), exc_info=exc)
            self._failure = exc
        else:
            log.error("background task %s ended unexpectedly; stopping", task.get_name())
            self._failure = RuntimeError(f"background task {task.get_name()} ended")
        self.stopping.set()

    async def _cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # A task that swallows its cancellation must not hold the shutdown hostage.
            _done, stuck = await asyncio.wait(self._tasks, timeout=self.settings.shutdown_grace)
            for task in stuck:
                log.error("background task %s did not stop within %.0fs", task.get_name(), self.settings.shutdown_grace)
        self._tasks.clear()

    def stop(self) -> None:
        self.stopping.set()


SetupFn = Callable[[ServiceRuntime], Awaitable[None]]


@contextlib.asynccontextmanager
async def serving(
    settings: ServiceSettings, setup: SetupFn, *, telemetry: Telemetry | None = None
) -> AsyncIterator[ServiceRuntime]:
    """Start a service and yield its runtime once it is SERVING; stop and release everything on exit.

    `run_service` uses it for real processes; tests use it to run services in-process."""
    telemetry = telemetry or setup_telemetry(
        settings.service_name, metrics_port=settings.metrics_port, metrics_host=settings.grpc_host
    )
    async with AsyncExitStack() as stack:
        runtime = ServiceRuntime(
            settings=settings, telemetry=telemetry, grpc=GrpcServer(settings, telemetry), stack=stack
        )
        stack.push_async_callback(runtime._cancel_tasks)
        await setup(runtime)
        port = await runtime.grpc.start()
        watcher: asyncio.Task | None = None
        try:
            await runtime.grpc.set_serving()
            watcher = asyncio.create_task(_watch_stores(runtime.grpc), name="store-health")
            log.info(
                "%s serving",
                settings.service_name,
                extra={"grpc": f"{settings.grpc_host}:{port}", **runtime.endpoints},
            )
            yield runtime
        finally:
            runtime.stopping.set()
            if watcher is not None:
                watcher.cancel()
            log.info("%s stopping: draining for up to %.0fs", settings.service_name, settings.shutdown_grace)
            await runtime.grpc.stop(settings.shutdown_grace)
    telemetry.shutdown()


# How often the health of `cdp.storage` is brought up to date with the stores' state.
STORE_HEALTH_SECONDS = 1.0


async def _watch_stores(server: GrpcServer) -> None:
    """`cdp.storage` reads NOT_SERVING while a store of this process cannot write (a full disk …)."""
    from cdp_kit.storage import health as stores

    shown: bool | None = None
    while True:
        failing = bool(stores.failing())
        if failing != shown:
            status = health_pb2.HealthCheckResponse.NOT_SERVING if failing else health_pb2.HealthCheckResponse.SERVING
            await server.health.set(stores.HEALTH_NAME, status)
            shown = failing
        await asyncio.sleep(STORE_HEALTH_SECONDS)


def stop_bound(settings: ServiceSettings) -> float:
    """Seconds a stopping process may take in all: the calls' grace, the background tasks' grace and
    the engines' drain, with room to spare."""
    return 3 * settings.shutdown_grace + 2.0


async def run_service(settings: ServiceSettings, setup: SetupFn) -> None:
    loop = asyncio.get_running_loop()
    watchdog: threading.Timer | None = None
    held: LoopWatch | None = None
    try:
        async with serving(settings, setup) as runtime:
            if settings.loop_stall_seconds > 0:  # a held loop said while it is held (loopwatch.py)
                held = LoopWatch(loop, threading.get_ident(), settings.loop_stall_seconds, runtime.telemetry.meter)
                held.start()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, runtime.stop)
            await runtime.stopping.wait()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            # A stop that hangs (a drain waiting on a server that is gone, a task that never ends) must not
            # keep the process alive for ever: no supervisor may be left to kill it (`cdpctl up` SIGKILLed
            # ends its children with SIGTERM). A thread, so a blocked event loop cannot hold it up. What is
            # durable stays so: stopping here is no worse than the crash every service already survives.
            watchdog = threading.Timer(stop_bound(settings), _stop_overran, args=(settings,))
            watchdog.daemon = True
            watchdog.start()
    finally:
        if watchdog is not None:
            watchdog.cancel()
        if held is not None:
            held.stop()
    if runtime._failure is not None:
        raise SystemExit(1)


def _stop_overran(settings: ServiceSettings) -> None:
    log.error("%s did not stop within %.0fs; exiting", settings.service_name, stop_bound(settings))
    logging.shutdown()
    os._exit(1)


EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def event_loop_factory(choice: str | None = None) -> Callable[[], asyncio.AbstractEventLoop]:
    """The loop a service runs on: `choice` or CDP_EVENT_LOOP (see the module docstring). uvloop by
    default (bench/bench_profile.py measures every profile benchmark on both); the standard loop when
    uvloop is not installed and nobody asked for it by name."""
    choice = (choice if choice is not None else os.environ.get("CDP_EVENT_LOOP", "")).strip().lower() or "auto"
    if choice not in EVENT_LOOPS:
        raise SettingsError([f"CDP_EVENT_LOOP={choice!r} is not one of {', '.join(EVENT_LOOPS)}"])
    if choice == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SettingsError(
                ["CDP_EVENT_LOOP=uvloop but uvloop is not installed; unset it or use asyncio"]
            ) from None
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run_main(settings_cls: type[S], setup: SetupFn) -> None:
    """Process entry point: settings from the environment (fail fast, every problem named), JSON logs,
    then serve until SIGTERM on the chosen event loop."""
    try:
        settings = load_settings(settings_cls)
        loop_factory = event_loop_factory()
    except SettingsError as exc:
        print(f"{settings_cls.__name__}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.service_name, settings.log_level, settings.log_format)
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(run_service(settings, setup))
    except KeyboardInterrupt:
        pass
    except (Unavailable, Unauthenticated) as exc:
        # What it needs is not there (NATS, the store, another service) or refused it: one line naming what
        # and the way out is the message (its text names addresses and variables, never customer data); a
        # traceback of the start-up would hide it. A supervisor (make up, the kubelet) starts it again.
        log.error("cannot start: %s", exc, extra={"error": type(exc).__name__})
        raise SystemExit(1) from None


__all__ = [
    "PUBLIC",
    "GrpcServer",
    "ServiceRuntime",
    "client_channel",
    "event_loop_factory",
    "run_main",
    "run_service",
    "serving",
]
