"""The whole platform as `make up` runs it, for end-to-end tests, kill tests and the pipeline benchmark.

`RunningPlatform` starts `cdpctl up` in a workspace of its own (CDP_HOME under a temporary folder, a HOME
of its own so the user's `~/.cdp/current.json` is never touched), waits until every service is SERVING
and reads `run.json`: where each service and companion listens, the write key and the admin token. The
supervisor inside `cdpctl up` restarts a service that dies, exactly as it would for a user, so a test that
SIGKILLs a service (`kill`) then waits for the restart (`wait_restarted`) exercises the real recovery path;
`kill_nats` / `wait_nats_restarted` do the same for nats-server, which the supervisor starts again on the
same port and store.

`connect_nats` connects to that nats-server as cdpctl does (the operator's user from run.json's URL, and
under `cdpctl up --tls` cdpctl's certificate from run.json's "tls": the server refuses a client without
one). A test reaching the bus through run.json uses it (or `nats_tls`) rather than `nats.connect(url)`.

`cdpctl(...)` runs a cdpctl command against it in the test's own process (click's CliRunner, `--home`
the workspace), as a shell would run it: exit code, stdout, stderr. A command is a few calls to the
services; an interpreter of its own (Python, grpc, the protobufs, rich: ~0.3 s of CPU) cost more than the
command. A test that is about cdpctl as a program (its console, its signals) runs `CDPCTL` instead.

`stop()` ends it as Ctrl-C does (SIGINT to `cdpctl up`, which terminates its children), and falls back to
SIGKILL of the whole process group, so a failed test never leaves services behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import ssl

    import nats.aio.client

CDPCTL = str(Path(sys.executable).parent / "cdpctl")


class PlatformError(RuntimeError):
    pass


class RunningPlatform:
    def __init__(
        self,
        workdir: Path,
        *,
        env: dict[str, str] | None = None,
        startup_timeout: float = 120.0,
        restart_limit: int | None = None,
        companions: bool = True,
    ) -> None:
        self.workdir = Path(workdir)
        self.home = self.workdir / "cdp-home"
        user_home = self.workdir / "user"
        user_home.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "CDP_HOME": str(self.home),
            "HOME": str(user_home),
            "PYTHONUNBUFFERED": "1",
            # Never the conventional ports: other platforms may be starting at the same moment (parallel tests).
            "CDP_UP_PORTS": "any",
            **(env or {}),
        }
        self.startup_timeout = startup_timeout
        self.restart_limit = restart_limit  # crashes in a row the supervisor allows (None: its default)
        # False: `--no-companions`, for a test of the services and the bus alone (the channel servers and the
        # four CRM emulators are five processes, ~2 s of CPU to start: a fifth of a platform's start).
        self.companions = companions
        self.log_path = self.workdir / "cdpctl-up.log"
        self.proc: subprocess.Popen | None = None
        self.run: dict = {}

    # ------------------------------------------------------------------------------------ lifecycle

    def start(self) -> RunningPlatform:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    CDPCTL,
                    "up",
                    "--startup-timeout",
                    str(self.startup_timeout),
                    *(["--restart-limit", str(self.restart_limit)] if self.restart_limit is not None else []),
                    *([] if self.companions else ["--no-companions"]),
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.startup_timeout + 30
        run_file = self.home / "run.json"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PlatformError(f"cdpctl up exited ({self.proc.returncode}):\n{self.log_tail()}")
            if run_file.exists():
                try:
                    self.run = json.loads(run_file.read_text())
                    return self
                except json.JSONDecodeError:
                    pass  # being written
            time.sleep(0.3)
        self.stop()
        raise PlatformError(f"platform not up after {self.startup_timeout + 30:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        # Services run in sessions of their own: make sure none outlives a failed stop. Only a process of
        # this platform (its environment names this workspace): after a clean stop a pid in run.json may
        # already belong to another process (pids wrap every few minutes on a busy machine).
        for entry in [*self.run.get("services", {}).values(), *self.run.get("companions", {}).values()]:
            pid = entry.get("pid")
            if isinstance(pid, int) and self._is_ours(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

    def _is_ours(self, pid: int) -> bool:
        """Whether `pid` is a process this platform started: its environment carries this CDP_HOME."""
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:  # gone, or not ours to read
            return False
        return f"CDP_HOME={self.home}".encode() in environ.split(b"\0")

    def __enter__(self) -> RunningPlatform:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------ cdpctl

    def cdpctl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        """`cdpctl --home <this workspace> *args` in this process. Not from a running event loop (its
        commands run their own): an async test calls it through `asyncio.to_thread`."""
        from click.testing import CliRunner

        from cdpctl.cli import main

        result = CliRunner().invoke(
            main,
            ["--home", str(self.home), *args],
            input=input,
            env={"HOME": self.env["HOME"], "CDP_HOME": str(self.home)},
            catch_exceptions=False,
        )
        return subprocess.CompletedProcess(["cdpctl", *args], result.exit_code, result.stdout, result.stderr)

    # ------------------------------------------------------------------------------------ what runs where

    def refresh(self) -> dict:
        self.run = json.loads((self.home / "run.json").read_text())
        return self.run

    def service(self, name: str) -> dict:
        return self.run["services"][name]

    def companion(self, name: str) -> dict:
        return self.run["companions"][name]

    def grpc_address(self, name: str) -> str:
        return self.service(name)["grpc"]

    @property
    def nats_url(self) -> str:
        return self.run["nats"]

    @property
    def nats_tls(self) -> ssl.SSLContext | None:
        """What a NATS connection through run.json presents: cdpctl's certificate and the CA under
        `cdpctl up --tls` (nats-server requires a client certificate then), else None (plain TCP)."""
        from cdp_kit.natsauth import client_tls_context

        return client_tls_context(self.run.get("tls"))

    async def connect_nats(self, **options: Any) -> nats.aio.client.Client:
        """A connection to the platform's nats-server as cdpctl's (operator) user, over TLS when it runs so."""
        import nats

        return await nats.connect(self.nats_url, tls=self.nats_tls, **options)

    @property
    def write_key(self) -> str:
        return self.run["write_key"]

    @property
    def admin_token(self) -> str:
        return Path(self.run["admin_token_file"]).read_text().strip()

    @property
    def admin_metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.admin_token}")]

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def service_logs(self) -> dict[str, Path]:
        return {name: Path(info["log"]) for name, info in self.run.get("services", {}).items()}

    # ------------------------------------------------------------------------------------ faults

    def kill(self, name: str) -> int:
        """SIGKILL a service or companion, as a crash would; returns the pid that was killed."""
        pid = (self.run["services"].get(name) or self.run["companions"][name])["pid"]
        os.kill(pid, signal.SIGKILL)
        return pid

    def wait_restarted(self, name: str, old_pid: int, timeout: float = 90.0) -> None:
        """Until the supervisor has started `name` again and it is SERVING (companions: listening)."""
        from cdp_kit.natsserver import wait_for_port

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.refresh()
            entry = self.run["services"].get(name) or self.run["companions"][name]
            if entry["pid"] != old_pid:
                if name in self.run["services"]:
                    if self.health(name) == "SERVING":
                        return
                elif all(wait_for_port("127.0.0.1", port, 0.2) for port in entry["ports"].values()):
                    return
            time.sleep(0.3)
        raise PlatformError(f"{name} was not restarted within {timeout:.0f} s:\n{self.log_tail()}")

    def kill_nats(self) -> int:
        """SIGKILL nats-server, as a crashed node would; returns the pid that was killed."""
        pid = self.run["nats_pid"]
        os.kill(pid, signal.SIGKILL)
        return pid

    def wait_nats_restarted(self, old_pid: int, timeout: float = 60.0) -> None:
        """Until the supervisor has started nats-server again (a new pid, its port listening)."""
        from urllib.parse import urlsplit

        from cdp_kit.natsserver import wait_for_port

        where = urlsplit(self.nats_url)  # run.json's URL carries the operator's user and password
        host, port = where.hostname or "127.0.0.1", where.port
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.refresh()
            if self.run.get("nats_pid") not in (None, old_pid) and wait_for_port(host, int(port), 0.2):
                return
            time.sleep(0.3)
        raise PlatformError(f"nats-server was not restarted within {timeout:.0f} s:\n{self.log_tail()}")

    def health(self, name: str) -> str:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        # With `cdpctl up --tls` the gRPC port wants a client certificate; the plaintext health-only port
        # (run.json's "health") answers the same question without one.
        address = self.service(name).get("health") or self.grpc_address(name)
        try:
            with grpc.insecure_channel(address) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as exc:
            return exc.code().name
