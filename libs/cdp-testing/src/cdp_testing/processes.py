"""Services as real processes (`python -m cdp_<name>`), for fault tests and benchmarks: killable with
SIGKILL and restartable on the same ports."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import nats
from nats.js import JetStreamContext

from cdp_kit.bus import profiles_stream
from cdp_kit.bus.streams import ensure_stream
from cdp_kit.natsserver import free_port, wait_for_port


class ServiceProcess:
    """One service process with its own log file; gRPC binds after set-up finished, so once the port
    listens the whole service is up."""

    def __init__(self, name: str, module: str, workdir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.module = module
        self.grpc_port = free_port()
        self.log_path = workdir / f"{name}.log"
        self.env = {
            **os.environ,
            "CDP_GRPC_HOST": "127.0.0.1",
            "CDP_GRPC_PORT": str(self.grpc_port),
            "CDP_AUTH_MODE": "none",
            "CDP_LOG_LEVEL": "WARNING",
            **env,
        }
        self.proc: subprocess.Popen | None = None

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def logged_count(self, text: str) -> int:
        """How many times `text` is in the process's log so far (every start's)."""
        return self.log_path.read_text().count(text) if self.log_path.exists() else 0

    async def logged(self, text: str, count: int = 1, timeout: float = 60) -> None:
        """Until `text` is in the log `count` times; fails after `timeout` seconds, naming the log."""
        deadline = time.monotonic() + timeout
        while self.logged_count(text) < count:
            assert time.monotonic() < deadline, (
                f"{text!r} not logged {count} times in {timeout:g} s; see {self.log_path}"
            )
            await asyncio.sleep(0.1)

    def start(self, timeout: float = 30) -> None:
        first = self.proc is None
        for _attempt in range(3):
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", self.module], env=self.env, stdout=log, stderr=subprocess.STDOUT
                )
            if _listens(self.proc, self.grpc_port, timeout):
                return
            exited = self.proc.poll() is not None
            self.stop()
            # The port was free when it was picked, and another test's process took it before this one
            # bound it (then something else answers on it): a first start tries new ports.
            if not (first and exited):
                break
            self._new_ports()
        raise RuntimeError(f"{self.name} did not start; see {self.log_path}:\n{self.log_path.read_text()[-2000:]}")

    def _new_ports(self) -> None:
        self.grpc_port = free_port()
        self.env["CDP_GRPC_PORT"] = str(self.grpc_port)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@asynccontextmanager
async def started_on_profiles(service: ServiceProcess, nats_url: str) -> AsyncIterator[JetStreamContext]:
    """A crash test's frame for a service that consumes `profiles.changed`: PROFILES made as the
    provisioner makes it, `service` started, and a JetStream context to feed it. On the way out the process
    is stopped (whatever the test did to it meanwhile: kills, restarts) and the connection closed."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await ensure_stream(js, profiles_stream())
        service.start()
        yield js
    finally:
        service.stop()
        await nc.close()


def _listens(proc: subprocess.Popen, port: int, timeout: float) -> bool:
    """Whether `proc` itself listens on `port` within `timeout` (a port that answers may be another
    process's, which took it between the pick and this one's bind): False as soon as `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if wait_for_port("127.0.0.1", port, 0.1) and _owned_by(proc.pid, port):
            return True
        time.sleep(0.02)
    return False


def _owned_by(pid: int, port: int) -> bool:
    """Whether the socket listening on 127.0.0.1:`port` is one of `pid`'s (Linux: /proc); True where /proc
    cannot tell."""
    try:
        inodes = set()
        for path in ("/proc/net/tcp", "/proc/net/tcp6"):  # gRPC listens on 127.0.0.1 through an IPv6 socket
            with open(path) as table:
                for line in table.readlines()[1:]:
                    fields = line.split()
                    local, state, inode = fields[1], fields[3], fields[9]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{inode}]")
        if not inodes:
            return False
        fds = Path(f"/proc/{pid}/fd")
        return any(os.readlink(fd) in inodes for fd in fds.iterdir())
    except OSError:
        return True


class CollectorProcess(ServiceProcess):
    def __init__(self, nats_url: str, workdir: Path, *, write_key: str, source_id: str = "test", partitions: int = 8):
        self.write_key = write_key
        self.http_port = free_port()
        sources = workdir / "sources.json"
        sources.write_text(json.dumps({"sources": [{"id": source_id, "write_key": write_key}]}))
        super().__init__(
            "collector",
            "cdp_collector",
            workdir,
            {
                "CDP_NATS_URL": nats_url,
                "CDP_HTTP_HOST": "127.0.0.1",
                "CDP_HTTP_PORT": str(self.http_port),
                "CDP_COLLECTOR_SOURCES_FILE": str(sources),
                "CDP_PARTITIONS": str(partitions),
            },
        )

    def _new_ports(self) -> None:
        super()._new_ports()
        self.http_port = free_port()
        self.env["CDP_HTTP_PORT"] = str(self.http_port)


class IdentityProcess(ServiceProcess):
    def __init__(self, nats_url: str, workdir: Path, *, store_url: str, partitions: int = 8, **env: str):
        super().__init__(
            "identity",
            "cdp_identity",
            workdir,
            {"CDP_NATS_URL": nats_url, "CDP_STORE_URL": store_url, "CDP_PARTITIONS": str(partitions), **env},
        )


class ProfileProcess(ServiceProcess):
    def __init__(self, nats_url: str, workdir: Path, *, store_url: str, partitions: int = 8, **env: str):
        super().__init__(
            "profile",
            "cdp_profile",
            workdir,
            {"CDP_NATS_URL": nats_url, "CDP_STORE_URL": store_url, "CDP_PARTITIONS": str(partitions), **env},
        )


class ScoringProcess(ServiceProcess):
    def __init__(self, nats_url: str, workdir: Path, *, store_url: str, partitions: int = 8, **env: str):
        super().__init__(
            "scoring",
            "cdp_scoring",
            workdir,
            {
                "CDP_NATS_URL": nats_url,
                "CDP_STORE_URL": store_url,
                "CDP_PARTITIONS": str(partitions),
                "CDP_SCORING_MODEL_STORE": str(workdir / "models"),
                **env,
            },
        )


class SegmentationProcess(ServiceProcess):
    def __init__(self, nats_url: str, workdir: Path, *, store_url: str, partitions: int = 8, **env: str):
        super().__init__(
            "segmentation",
            "cdp_segmentation",
            workdir,
            {
                "CDP_NATS_URL": nats_url,
                "CDP_STORE_URL": store_url,
                "CDP_PARTITIONS": str(partitions),
                "CDP_SEGMENTATION_SNAPSHOT_SECONDS": "1",
                **env,
            },
        )
