"""The restart policy of `cdpctl up`: backoff that doubles, is capped, resets after a stable run, and
gives up only after repeated fast crashes; a child's listening ports are kept for it while it is down."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import sys
import time

import pytest

from cdp_kit.ports import spare_port
from cdpctl.run import _ready
from cdpctl.supervise import (
    Backoff,
    Exited,
    GaveUp,
    PortsTaken,
    Restarted,
    RestartPolicy,
    Stopped,
    Supervisor,
    describe_exit,
)


def test_delays_double_up_to_the_cap_then_give_up_after_repeated_fast_crashes():
    backoff = Backoff(RestartPolicy(first_delay=1, max_delay=4, stable_after=60, give_up_after=5))
    assert [backoff.after_exit(uptime=2) for _ in range(5)] == [1, 2, 4, 4, 4]
    assert backoff.after_exit(uptime=2) is None


def test_a_service_that_stayed_up_a_while_starts_again_at_the_first_delay():
    backoff = Backoff(RestartPolicy(first_delay=1, max_delay=30, stable_after=60, give_up_after=3))
    assert [backoff.after_exit(uptime=1) for _ in range(3)] == [1, 2, 4]
    assert backoff.after_exit(uptime=3600) == 1  # up an hour: this crash is news, not a crash loop
    assert backoff.after_exit(uptime=1) == 2


def test_exits_read_as_an_operator_expects():
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-9) == "killed by SIGKILL"


# ------------------------------------------------------------------------- a port taken while it is down

# A child that listens as a gRPC server does (SO_REUSEADDR, no SO_REUSEPORT) and exits 1 when it cannot.
LISTENER = """
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError as exc:
    print("cannot bind:", exc, flush=True)
    raise SystemExit(1)
s.listen()
print("listening", flush=True)
time.sleep(60)
"""


def _free_port() -> int:
    """A port below the kernel's ephemeral range that no other test worker picks (bind(0) hands out one any
    outgoing connection on the machine may be given before the child listens)."""
    return spare_port("127.0.0.1")


def _client_on(port: int, server: socket.socket) -> socket.socket:
    """An outgoing connection whose local port is `port`, as the kernel gives an ephemeral port: no
    SO_REUSEADDR. Closed with a reset (SO_LINGER 0), so no TIME_WAIT outlives it."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.bind(("127.0.0.1", port))
    client.connect(server.getsockname())
    return client


def _tick_until(supervisor: Supervisor, done, seconds: float = 20.0) -> list:
    events: list = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        events += supervisor.tick()
        if done(events):
            return events
        time.sleep(0.05)
    return events


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _until_listening(supervisor: Supervisor, port: int) -> list:
    """The supervisor's events until its child listens on `port` (a Python start takes seconds on a loaded
    machine: the wait is a guard, and not listening by then fails here, not in a later step)."""
    events = _tick_until(supervisor, lambda _: _listening(port), 60)
    assert _listening(port), "the child did not listen"
    return events


@pytest.fixture
def server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s


def test_a_port_an_outgoing_connection_took_while_the_child_was_down_delays_its_restart_without_a_crash(
    tmp_path, server
):
    # `make up`'s gRPC ports (50051 …) are inside Linux's ephemeral range: while a service is down, a
    # client's outgoing connection may be given its port. Starting the service then fails to bind, crash
    # after crash, until the supervisor gives up and stops the whole platform, for a port that frees
    # itself when that connection ends.
    port = _free_port()
    supervisor = Supervisor(RestartPolicy(first_delay=0.05, max_delay=0.1, give_up_after=2))
    supervisor.start(
        "svc", [sys.executable, "-c", LISTENER, str(port)], dict(os.environ), tmp_path / "svc.log", (port,)
    )
    assert _until_listening(supervisor, port) == []
    supervisor.process("svc").kill()
    supervisor.process("svc").wait()
    client = _client_on(port, server)  # before the supervisor noticed the exit
    events = _tick_until(supervisor, lambda ev: any(isinstance(e, GaveUp) for e in ev), 2.0)
    assert not any(isinstance(e, GaveUp) for e in events), (tmp_path / "svc.log").read_text()
    assert [e.crashes for e in events if isinstance(e, Exited)] == [1]  # the kill, nothing since
    assert [e for e in events if isinstance(e, PortsTaken)] == [PortsTaken("svc", (port,))]  # said once
    client.close()
    events = _tick_until(supervisor, lambda _: _listening(port), 60)
    assert _listening(port), (tmp_path / "svc.log").read_text()
    assert not any(isinstance(e, (Exited, GaveUp)) for e in events)
    supervisor.stop(["svc"], 5)


def test_while_a_child_is_down_no_outgoing_connection_can_be_given_its_port(tmp_path, server):
    port = _free_port()
    supervisor = Supervisor(RestartPolicy(first_delay=2.0))
    supervisor.start(
        "svc", [sys.executable, "-c", LISTENER, str(port)], dict(os.environ), tmp_path / "svc.log", (port,)
    )
    assert _until_listening(supervisor, port) == []
    supervisor.process("svc").kill()
    supervisor.process("svc").wait()
    assert [type(e) for e in supervisor.tick()] == [Exited]
    with pytest.raises(OSError):  # held by the supervisor until the restart
        _client_on(port, server)
    assert _until_listening(supervisor, port)  # the restart, once the hold ended
    supervisor.stop(["svc"], 5)


# --------------------------------------------------------------------------- a restart an operator asks for

# A child that listens, and ignores SIGTERM when told to (a service wedged in its drain).
STUBBORN = """
import signal, socket, sys, time
if sys.argv[2] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
time.sleep(60)
"""


def _stubborn(tmp_path, supervisor: Supervisor, ignore_term: bool) -> tuple[int, int]:
    port = _free_port()
    argv = [sys.executable, "-c", STUBBORN, str(port), "ignore" if ignore_term else "obey"]
    supervisor.start("svc", argv, dict(os.environ), tmp_path / "svc.log", (port,))
    assert _until_listening(supervisor, port) == []
    return port, supervisor.process("svc").pid


def test_an_asked_restart_starts_the_child_again_at_once_and_counts_no_crash(tmp_path):
    # A crash would wait 30 s, and a second one in a row would stop the platform.
    supervisor = Supervisor(RestartPolicy(first_delay=30.0, give_up_after=1))
    port, first = _stubborn(tmp_path, supervisor, ignore_term=False)
    pids = [first]
    for _ in range(3):
        supervisor.restart("svc", grace=10)
        events = _tick_until(supervisor, lambda ev: any(isinstance(e, Restarted) for e in ev), 60)
        assert [type(e) for e in events] == [Stopped, Restarted], events
        assert events[0] == Stopped("svc", "killed by SIGTERM", killed=False)
        assert events[1].pid == supervisor.process("svc").pid not in pids
        pids.append(events[1].pid)
        assert _until_listening(supervisor, port) == []
    # None of those counted: a crash now is the first in a row, restarted after the first delay.
    supervisor.process("svc").kill()
    supervisor.process("svc").wait()
    assert supervisor.tick() == [Exited("svc", "killed by SIGKILL", 30.0, 1)]
    supervisor.stop(["svc"], 5)


def test_a_child_that_does_not_stop_within_the_grace_is_killed_and_started_again(tmp_path):
    supervisor = Supervisor(RestartPolicy(first_delay=30.0))
    port, first = _stubborn(tmp_path, supervisor, ignore_term=True)
    supervisor.restart("svc", grace=0.5)
    events = _tick_until(supervisor, lambda ev: any(isinstance(e, Restarted) for e in ev), 60)
    assert events[0] == Stopped("svc", "killed by SIGKILL", killed=True), events
    assert isinstance(events[1], Restarted) and events[1].pid != first
    assert _until_listening(supervisor, port) == []
    supervisor.stop(["svc"], 1)


def test_an_asked_restart_of_a_child_waiting_out_its_crash_delay_starts_it_at_once(tmp_path):
    supervisor = Supervisor(RestartPolicy(first_delay=30.0))
    port, _ = _stubborn(tmp_path, supervisor, ignore_term=False)
    supervisor.process("svc").kill()
    supervisor.process("svc").wait()
    assert [type(e) for e in supervisor.tick()] == [Exited]  # due again in 30 s
    supervisor.restart("svc", grace=10)
    events = _tick_until(supervisor, lambda ev: any(isinstance(e, Restarted) for e in ev), 60)
    assert [type(e) for e in events] == [Restarted], events
    assert _until_listening(supervisor, port) == []
    supervisor.stop(["svc"], 5)


# ------------------------------------------------------------------- a port taken while it is starting

# A child that listens as a cdp service does, and says so as cdp_kit.service does when it cannot.
SERVICE = LISTENER.replace(
    'print("cannot bind:", exc, flush=True)',
    'print("RuntimeError: cannot bind 127.0.0.1:%s (CDP_GRPC_HOST/CDP_GRPC_PORT): the port is in use" % sys.argv[1])',
)


def _listens(port: int):
    async def ready(_name: str) -> bool:
        return _listening(port)

    return ready


async def test_a_service_that_lost_its_port_while_starting_starts_again_once_the_port_is_free(tmp_path, server):
    """`make up` picks the gRPC ports (50051 ..., inside the ephemeral range) and holds them until each service
    starts; while a service starts (seconds), any outgoing connection on the machine may be given its port.
    The service then exited at start, and `cdpctl up` stopped the whole platform (seen in a fresh-clone run:
    orchestration, 50056, "the port is in use"). Now it waits for the port and starts the service again."""
    port = _free_port()
    client = _client_on(port, server)  # given the port between its pick and the service's bind
    log = tmp_path / "svc.log"
    supervisor = Supervisor()
    supervisor.start("svc", [sys.executable, "-c", SERVICE, str(port)], dict(os.environ), log, (port,))
    try:
        waiting = asyncio.create_task(_ready(["svc"], supervisor, {"svc": log}, _listens(port), 60, asyncio.Event()))
        deadline = time.monotonic() + 60
        while supervisor.process("svc").poll() is None:
            assert time.monotonic() < deadline, "the child never tried its port"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        assert not waiting.done(), "the platform gave up on a port taken by someone else"
        client.close()
        assert await asyncio.wait_for(waiting, 60) is None
        assert _listening(port)
    finally:
        supervisor.stop(["svc"], 5)


async def test_a_service_that_fails_to_start_for_another_reason_still_stops_the_platform_at_once(tmp_path):
    port = _free_port()
    log = tmp_path / "svc.log"
    supervisor = Supervisor()
    supervisor.start("svc", [sys.executable, "-c", "raise SystemExit('bad settings')"], dict(os.environ), log, (port,))
    try:
        assert (
            await asyncio.wait_for(_ready(["svc"], supervisor, {"svc": log}, _listens(port), 60, asyncio.Event()), 30)
            == 1
        )
    finally:
        supervisor.stop(["svc"], 5)
