"""cdpctl against real services: collector, identity and profile in-process on a real nats-server, with
a cdpctl workspace whose run file points at them (as `cdpctl up` writes it)."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from click.testing import CliRunner, Result

from cdpctl.cli import main
from cdpctl.platform import Workspace

WRITE_KEY = "wk_cdpctl_test_0001"


@dataclass
class Cli:
    home: Path
    nats_url: str
    http: str = ""

    async def run(self, *args: str, stdin: str | None = None) -> Result:
        """cdpctl as a user runs it (its commands run their own event loop: off this one)."""
        runner = CliRunner()
        return await asyncio.to_thread(
            runner.invoke, main, ["--home", str(self.home), *args], input=stdin, catch_exceptions=False
        )

    async def send(self, *events: dict) -> None:
        async with aiohttp.ClientSession() as session:
            body = {"batch": list(events), "writeKey": WRITE_KEY}
            async with session.post(f"{self.http}/v1/batch", json=body) as response:
                assert response.status == 200, await response.text()


def workspace(tmp_path: Path, nats_url: str, services: dict[str, str]) -> Path:
    ws = Workspace(tmp_path / "home")
    ws.prepare(())
    ws.write_run(
        {
            "pid": os.getpid(),
            "nats": nats_url,
            "write_key": WRITE_KEY,
            "admin_token_file": str(ws.admin_token_file),
            "services": {name: {"grpc": address} for name, address in services.items()},
        }
    )
    return ws.root


@pytest.fixture
def bus_cli(nats_server, tmp_path) -> Cli:
    return Cli(workspace(tmp_path, nats_server.url, {}), nats_server.url)


@pytest.fixture
async def people_cli(nats_server, tmp_path):
    # The services are imported here: the bus commands' tests need none of them.
    from cdp_collector.__main__ import setup as collector_setup
    from cdp_collector.settings import CollectorSettings
    from cdp_identity.__main__ import setup as identity_setup
    from cdp_identity.settings import IdentitySettings
    from cdp_kit.service import serving
    from cdp_profile.__main__ import setup as profile_setup
    from cdp_profile.settings import ProfileSettings

    sources = tmp_path / "sources.json"
    sources.write_text(json.dumps({"sources": [{"id": "web", "write_key": WRITE_KEY}]}))
    common = dict(
        nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=0, auth_mode="none", partitions=2, shutdown_grace=1.0
    )
    collector = CollectorSettings(**common, sources_file=sources, http_host="127.0.0.1", http_port=0)
    identity = IdentitySettings(**common, store_url=f"sqlite:///{tmp_path / 'identity.db'}", batch_size=100)
    async with serving(collector, collector_setup) as c, serving(identity, identity_setup) as i:
        identity_address = f"127.0.0.1:{i.grpc.port}"
        profile = ProfileSettings(
            **common, store_url=f"sqlite:///{tmp_path / 'profile.db'}", identity_address=identity_address
        )
        async with serving(profile, profile_setup) as p:
            services = {"identity": identity_address, "profile": f"127.0.0.1:{p.grpc.port}"}
            yield Cli(
                workspace(tmp_path, nats_server.url, services), nats_server.url, f"http://127.0.0.1:{c.ports['http']}"
            )


@pytest.fixture
async def orchestration_cli(nats_server, tmp_path):
    """The orchestration service in-process (no channel providers: in-app only), and cdpctl pointed at it."""
    from cdp_kit.service import serving
    from cdp_orchestration.__main__ import setup
    from cdp_orchestration.settings import OrchestrationSettings

    settings = OrchestrationSettings(
        nats_url=nats_server.url,
        grpc_host="127.0.0.1",
        grpc_port=0,
        auth_mode="none",
        partitions=2,
        shutdown_grace=1.0,
        store_url=f"sqlite:///{tmp_path / 'orchestration.db'}",
        answer_timeout=15.0,
    )
    async with serving(settings, setup) as runtime:
        services = {"orchestration": f"127.0.0.1:{runtime.grpc.port}"}
        yield Cli(workspace(tmp_path, nats_server.url, services), nats_server.url)
