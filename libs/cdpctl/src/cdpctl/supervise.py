"""How `cdpctl up` keeps a service running: restart with exponential backoff, as a process supervisor does.

A service that exits is started again after 1 s, then 2 s, 4 s … (capped) if it keeps crashing; once it
has stayed up for `stable_after` seconds the next crash starts again at 1 s. After `give_up_after`
crashes in a row, each sooner than `stable_after`, restarting is pointless (a bad configuration, a
corrupt store): the supervisor gives up and the platform stops, with the service's last log lines.

`Supervisor` runs the children (services and companions) by that policy; `cdpctl up` turns what it
reports (`Exited`, `Restarted`, `PortsTaken`, `GaveUp`) into console lines and run.json.

A child's listening ports are kept for it while it is down. `make up`'s gRPC ports (50051 …) lie inside
Linux's ephemeral range (32768-60999), so while a service is down any outgoing connection on the machine
may be given its port as the local end, and the service started again cannot bind it: crash after crash
until the supervisor gives up and stops the platform, for a port that frees itself when that connection
ends (on loopback the kernel even reuses such a port for the next connection to the same place). So from
the moment the supervisor sees a child exit until it starts it again it holds each of its ports with a
bound socket that does not listen (a bound port is never handed out as an ephemeral one; a caller gets
"connection refused" as from nothing), and closes them just before the start. A port taken before the
supervisor noticed the exit delays the start, without counting a crash, until it is free (`PortsTaken`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cdp_kit.children import die_with_parent


@dataclass(frozen=True)
class RestartPolicy:
    first_delay: float = 1.0
    max_delay: float = 30.0
    stable_after: float = 60.0
    give_up_after: int = 5


@dataclass
class Backoff:
    policy: RestartPolicy = RestartPolicy()
    # Crashes in a row, each after less than `stable_after` seconds up.
    fast_crashes: int = 0

    def after_exit(self, uptime: float) -> float | None:
        """Seconds to wait before starting the service again, or None to give up."""
        if uptime >= self.policy.stable_after:
            self.fast_crashes = 0
        self.fast_crashes += 1
        if self.fast_crashes > self.policy.give_up_after:
            return None
        return min(self.policy.max_delay, self.policy.first_delay * 2 ** (self.fast_crashes - 1))


def describe_exit(returncode: int) -> str:
    """`exit code 3`, or `killed by SIGKILL` for a process a signal ended (a negative Popen returncode)."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def spawn(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start a child with its output appended to `log_path`. The log and whatever the child creates (its
    stores, its own files) are its owner's only: a service's log and store hold what users sent."""
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "ab") as log:
        # Own session (a terminal's Ctrl-C reaches cdpctl alone, which stops them in order), and SIGTERM
        # from the kernel if cdpctl dies without stopping them (SIGKILL): no orphan keeps a port.
        return subprocess.Popen(
            argv,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            umask=0o077,
            preexec_fn=die_with_parent(),  # noqa: PLW1509 (a prctl and a getppid only: cdp_kit.children)
        )


# What `Supervisor.tick` reports.
@dataclass(frozen=True)
class Exited:
    name: str
    how: str  # describe_exit
    delay: float  # seconds until it is started again
    crashes: int  # in a row, this one included


@dataclass(frozen=True)
class GaveUp:
    name: str
    how: str
    crashes: int


@dataclass(frozen=True)
class Restarted:
    name: str
    pid: int


@dataclass(frozen=True)
class Stopped:
    """`name` stopped as asked (`Supervisor.restart`): it starts again at once, and no crash is counted.
    `killed`: it had not stopped within the grace it was given, so it was SIGKILLed."""

    name: str
    how: str
    killed: bool = False


@dataclass(frozen=True)
class PortsTaken:
    """`name` is due to start again but another socket has `ports`: it starts once they are free."""

    name: str
    ports: tuple[int, ...]


# run.json: a child's entry while the supervisor restarts it, from its crash until it answers again
# (`cdpctl status` shows it as `restarting (crash n of N)` rather than DOWN).
RESTARTING = "restarting"


def restart_started(entry: dict, event: Exited, policy: RestartPolicy) -> None:
    """Record on a child's run.json entry that it crashed and is being restarted: which crash in a row."""
    entry[RESTARTING] = {"crash": event.crashes, "of": policy.give_up_after}


def restart_finished(entry: dict) -> None:
    """The child answers again: no restart in progress."""
    entry.pop(RESTARTING, None)


def restart_asked(entry: dict, request: str) -> None:
    """Record on a child's run.json entry that an operator asked for its restart (`cdpctl restart`):
    `request` names the ask, so the command that made it knows when its own restart is done."""
    entry[RESTARTING] = {"requested": request}


def restart_label(entry: dict) -> str | None:
    """`restarting (crash n of N)` (or `restarting (asked)`) while a restart is recorded on the entry,
    else None."""
    note = entry.get(RESTARTING)
    if not isinstance(note, dict):
        return None
    if "requested" in note:
        return "restarting (asked)"
    return f"restarting (crash {note.get('crash', '?')} of {note.get('of', '?')})"


# How often a start waiting for its ports looks again.
PORT_RECHECK_SECONDS = 0.5


def hold_port(port: int, host: str = "127.0.0.1") -> socket.socket | None:
    """A bound, non-listening socket on `port` (SO_REUSEADDR, as servers bind: the sockets a dead
    listener left in TIME_WAIT do not stop it), or None when another socket has the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        return None
    return sock


@dataclass
class _Child:
    command: list[str]
    env: dict[str, str]
    log: Path
    ports: tuple[int, ...]
    backoff: Backoff
    process: subprocess.Popen
    started: float
    restart_at: float | None = None
    held: list[socket.socket] = field(default_factory=list)  # its ports, while it is down
    waiting_for_ports: bool = False
    stop_by: float | None = None  # asked to stop (`Supervisor.restart`): SIGKILLed if still running then

    def hold_ports(self) -> tuple[int, ...]:
        """Hold every port of the child not held yet; the ports another socket has."""
        held = {sock.getsockname()[1] for sock in self.held}
        taken = []
        for port in self.ports:
            if port in held:
                continue
            sock = hold_port(port)
            if sock is None:
                taken.append(port)
            else:
                self.held.append(sock)
        return tuple(taken)

    def release_ports(self) -> None:
        for sock in self.held:
            with contextlib.suppress(OSError):
                sock.close()
        self.held.clear()


@dataclass
class Supervisor:
    """The children `cdpctl up` keeps running, each restarted by `policy` when it exits."""

    policy: RestartPolicy = RestartPolicy()
    clock: Callable[[], float] = time.monotonic
    _children: dict[str, _Child] = field(default_factory=dict)

    def start(
        self, name: str, command: list[str], env: dict[str, str], log: Path, ports: tuple[int, ...] = ()
    ) -> subprocess.Popen:
        """Start `name`; `ports` are the ports it listens on."""
        process = spawn(command, env, log)
        self._children[name] = _Child(command, env, log, tuple(ports), Backoff(self.policy), process, self.clock())
        return process

    def process(self, name: str) -> subprocess.Popen:
        return self._children[name].process

    @property
    def names(self) -> list[str]:
        return list(self._children)

    def ports_taken(self, name: str) -> tuple[int, ...]:
        """Of the ports of `name` (down), those another socket has; the others are held for it meanwhile."""
        return self._children[name].hold_ports()

    def start_again(self, name: str) -> subprocess.Popen:
        """Start `name` again at once, as it was first started: it exited while starting for a reason not its
        own (`cdpctl up`: a port taken), so no crash is counted."""
        child = self._children[name]
        child.release_ports()
        child.process = spawn(child.command, child.env, child.log)
        child.started = self.clock()
        return child.process

    def restart(self, name: str, grace: float) -> None:
        """Stop `name` (SIGTERM: it drains as on any stop; SIGKILL after `grace` seconds) and start it
        again at once: an operator's restart, not a crash, so its backoff is left as it was. One already
        down (crashed, waiting to start again) starts at once. `tick` reports `Stopped`, then `Restarted`."""
        child = self._children[name]
        now = self.clock()
        if child.restart_at is not None:
            child.restart_at = now
            return
        if child.stop_by is None and child.process.poll() is None:
            child.process.terminate()
        child.stop_by = now + grace

    def tick(self) -> list[Exited | GaveUp | Restarted | PortsTaken | Stopped]:
        """Notice exits and start again those whose delay has passed; what happened, in order. After a
        `GaveUp` the caller stops the platform."""
        events: list[Exited | GaveUp | Restarted | PortsTaken | Stopped] = []
        now = self.clock()
        for name, child in self._children.items():
            if child.stop_by is not None:
                killed = False
                if child.process.poll() is None:
                    if now < child.stop_by:
                        continue
                    child.process.kill()
                    child.process.wait()
                    killed = True
                child.stop_by = None
                child.hold_ports()
                child.restart_at = now  # started below, in this same tick
                events.append(Stopped(name, describe_exit(child.process.returncode), killed))
            if child.restart_at is not None:
                taken = child.hold_ports()  # any freed since the exit
                if now < child.restart_at:
                    continue
                if taken:
                    # Not the child's fault: no crash counted, no start that could only fail to bind.
                    if not child.waiting_for_ports:
                        events.append(PortsTaken(name, taken))
                    child.waiting_for_ports = True
                    child.restart_at = now + PORT_RECHECK_SECONDS
                    continue
                child.restart_at = None
                child.waiting_for_ports = False
                child.release_ports()
                child.process = spawn(child.command, child.env, child.log)
                child.started = self.clock()
                events.append(Restarted(name, child.process.pid))
                continue
            if child.process.poll() is None:
                continue
            how = describe_exit(child.process.returncode)
            delay = child.backoff.after_exit(now - child.started)
            if delay is None:
                events.append(GaveUp(name, how, child.backoff.fast_crashes))
                return events
            child.hold_ports()
            child.restart_at = now + delay
            events.append(Exited(name, how, delay, child.backoff.fast_crashes))
        return events

    def stop(self, order: list[str], grace: float, on_kill: Callable[[str], None] | None = None) -> None:
        """SIGTERM every child in `order`, then wait up to `grace` seconds in all; one still running is
        SIGKILLed (`on_kill` names it first)."""
        for name in order:
            self._children[name].release_ports()
            if self._children[name].process.poll() is None:
                self._children[name].process.terminate()
        deadline = self.clock() + grace
        for name in order:
            child = self._children[name]
            try:
                child.process.wait(max(0.1, deadline - self.clock()))
            except subprocess.TimeoutExpired:
                if on_kill is not None:
                    on_kill(name)
                child.process.kill()
                child.process.wait()
