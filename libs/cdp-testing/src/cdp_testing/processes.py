"""Services as real processes (`python -m cdp_<name>`), for fault tests and benchmarks: killable with
SIGKILL and restartable on the same ports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cdp_kit.natsserver import free_port, wait_for_port


class CollectorProcess:
    def __init__(self, nats_url: str, workdir: Path, *, write_key: str, source_id: str = "test", partitions: int = 8):
        self.write_key = write_key
        self.grpc_port = free_port()
        self.http_port = free_port()
        sources = workdir / "sources.json"
        sources.write_text(json.dumps({"sources": [{"id": source_id, "write_key": write_key}]}))
        self.log_path = workdir / "collector.log"
        self.env = {
            **os.environ,
            "CDP_NATS_URL": nats_url,
            "CDP_GRPC_HOST": "127.0.0.1",
            "CDP_GRPC_PORT": str(self.grpc_port),
            "CDP_HTTP_HOST": "127.0.0.1",
            "CDP_HTTP_PORT": str(self.http_port),
            "CDP_AUTH_MODE": "none",
            "CDP_COLLECTOR_SOURCES_FILE": str(sources),
            "CDP_PARTITIONS": str(partitions),
            "CDP_LOG_LEVEL": "WARNING",
        }
        self.proc: subprocess.Popen | None = None

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cdp_collector"], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        # gRPC binds after set-up (bus, HTTP) finished, so once it listens the whole service is up.
        if not wait_for_port("127.0.0.1", self.grpc_port, 30):
            self.stop()
            raise RuntimeError(f"collector did not start; see {self.log_path}:\n{self.log_path.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)

    def __enter__(self) -> CollectorProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
