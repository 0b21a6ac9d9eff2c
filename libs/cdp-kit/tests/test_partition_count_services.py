"""A service process started with another CDP_PARTITIONS than its platform's streams record stops at once:
one JSON log line naming both counts, exit code 1 (the run_main path), under its own NATS user and on a
bare nats-server alike. Identity stands for every partitioned service (they share the kit's engine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from cdp_kit.natsauth import (
    NatsClientSettings,
)
from cdp_kit.provision import run


def identity(nats_url: str, partitions: int, **env: str) -> subprocess.CompletedProcess:
    return service("cdp_identity", nats_url, partitions, **env)


def service(module: str, nats_url: str, partitions: int, **env: str) -> subprocess.CompletedProcess:
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CDP_")},
        "CDP_NATS_URL": nats_url,
        "CDP_STORE_URL": "memory://",
        "CDP_AUTH_MODE": "none",
        "CDP_GRPC_HOST": "127.0.0.1",
        "CDP_GRPC_PORT": "0",
        "CDP_LOG_FORMAT": "json",
        "CDP_PARTITIONS": str(partitions),
        **env,
    }
    return subprocess.run([sys.executable, "-m", module], env=environ, capture_output=True, text=True, timeout=90)


def refusal(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 1, done.stdout + done.stderr
    lines = [json.loads(line) for line in (done.stdout + done.stderr).splitlines() if line.startswith("{")]
    errors = [line for line in lines if line.get("level") in ("ERROR", "error")]
    assert len(errors) == 1, lines
    assert "Traceback" not in done.stderr
    return errors[0]


async def test_a_service_with_another_count_than_a_bare_servers_streams_stops(nats_server):
    await run(nats_server.url, environ={"CDP_PARTITIONS": "2"}, security=NatsClientSettings())
    line = refusal(identity(nats_server.url, 4))
    assert "was made with CDP_PARTITIONS=2" in line["msg"]
    assert "this service has CDP_PARTITIONS=4" in line["msg"]


async def test_the_collector_with_another_count_stops_before_it_routes_an_event(nats_server, tmp_path):
    """The collector has no partitioned engine, but it picks each event's partition by its count."""
    await run(nats_server.url, environ={"CDP_PARTITIONS": "2"}, security=NatsClientSettings())
    sources = tmp_path / "sources.json"
    sources.write_text(json.dumps({"sources": [{"id": "web", "write_key": "wk_partitions_test"}]}))
    line = refusal(
        service("cdp_collector", nats_server.url, 8, CDP_COLLECTOR_SOURCES_FILE=str(sources), CDP_HTTP_PORT="0")
    )
    assert "was made with CDP_PARTITIONS=2" in line["msg"] and "this service has CDP_PARTITIONS=8" in line["msg"]


async def test_profile_with_another_count_stops_under_leased_ownership_too(nats_server):
    """Under leases partitions start in the background: the count is checked before, so the service stops
    rather than logging a refusal per partition and running on."""
    await run(nats_server.url, environ={"CDP_PARTITIONS": "2"}, security=NatsClientSettings())
    line = refusal(service("cdp_profile", nats_server.url, 4, CDP_OWNERSHIP="nats", CDP_IDENTITY_ADDRESS="127.0.0.1:1"))
    assert "was made with CDP_PARTITIONS=2" in line["msg"] and "this service has CDP_PARTITIONS=4" in line["msg"]


async def test_a_service_with_another_count_stops_under_its_own_nats_user(secured, tmp_path):
    await run(secured.operator_url, environ={"CDP_PARTITIONS": "2"}, security=NatsClientSettings())
    line = refusal(identity(secured.url, 8, CDP_NATS_CREDENTIALS_FILE=str(tmp_path / "identity.json")))
    assert "was made with CDP_PARTITIONS=2" in line["msg"]
    assert "this service has CDP_PARTITIONS=8" in line["msg"]
