"""Services as real processes (`python -m cdp_<name>`), for fault tests and benchmarks: killable with
SIGKILL and restartable on the same ports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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

    def start(self, timeout: float = 30) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        if not wait_for_port("127.0.0.1", self.grpc_port, timeout):
            self.stop()
            raise RuntimeError(f"{self.name} did not start; see {self.log_path}:\n{self.log_path.read_text()[-2000:]}")

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
