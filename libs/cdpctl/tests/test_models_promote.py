"""cdpctl models promote / rollback against a real scoring service (in-process, real nats-server): what is
live now and what was, every version's role, and the service's refusals as it gives them. A day-2 trial
rolled a model back by editing `live_version` in a definitions export and importing it with --replace."""

from __future__ import annotations

import asyncio
import json
import os

import grpc
import pytest
from click.testing import CliRunner

from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from cdp_kit.service import serving
from cdp_scoring.__main__ import setup
from cdp_scoring.settings import ScoringSettings
from cdp_testing.onnx_models import logistic_model
from cdpctl.cli import main
from cdpctl.platform import Workspace


@pytest.fixture
async def platform(nats_server, tmp_path):
    """A scoring service holding churn_risk 1.0.0 (live) and 2.0.0 (deployed beside it, inactive)."""
    settings = ScoringSettings(
        nats_url=nats_server.url,
        grpc_host="127.0.0.1",
        grpc_port=0,
        auth_mode="none",
        partitions=2,
        shutdown_grace=1.0,
        store_url=f"sqlite:///{tmp_path / 'scoring.db'}",
        model_store=str(tmp_path / "models"),
        ship_models=False,
    )
    ws = Workspace(tmp_path / "home")
    ws.prepare(())
    async with serving(settings, setup) as runtime:
        address = f"127.0.0.1:{runtime.grpc.port}"
        ws.write_run(
            {
                "pid": os.getpid(),
                "nats": nats_server.url,
                "admin_token_file": str(ws.admin_token_file),
                "services": {"scoring": {"grpc": address}},
            }
        )
        async with grpc.aio.insecure_channel(address) as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            await stub.DeployModel(scoring_pb2.DeployModelRequest(onnx=logistic_model(version="1.0.0")))
            await stub.DeployModel(
                scoring_pb2.DeployModelRequest(onnx=logistic_model(version="2.0.0", weights=[1.0, 0.25]))
            )
            yield ws, stub


async def cdpctl(ws: Workspace, *args: str):
    return await asyncio.to_thread(CliRunner().invoke, main, ["--home", str(ws.root), *args], catch_exceptions=False)


async def roles(stub) -> dict[str, str]:
    model = await stub.GetModel(scoring_pb2.GetModelRequest(name="churn_risk"))
    return {v.spec.version: scoring_pb2.Role.Name(v.role) for v in model.versions}


async def test_promote_then_rollback_say_what_is_live_now_and_what_was(platform):
    ws, stub = platform
    listed = json.loads((await cdpctl(ws, "models", "--json")).output)
    assert {v["spec"]["version"]: v["role"] for v in listed[0]["versions"]} == {
        "1.0.0": "ROLE_LIVE",
        "2.0.0": "ROLE_INACTIVE",
    }

    promoted = await cdpctl(ws, "models", "promote", "churn_risk", "2.0.0")
    assert promoted.exit_code == 0, promoted.output
    assert "churn_risk: live 2.0.0 (was 1.0.0)" in promoted.output
    assert "2.0.0 live, 1.0.0 inactive" in promoted.output
    assert await roles(stub) == {"2.0.0": "ROLE_LIVE", "1.0.0": "ROLE_INACTIVE"}

    rolled = await cdpctl(ws, "models", "rollback", "churn_risk", "--json")
    assert rolled.exit_code == 0, rolled.output
    document = json.loads(rolled.output)
    assert (document["live"], document["was"], document["changed"]) == ("1.0.0", "2.0.0", True)
    assert {v["version"]: v["role"] for v in document["versions"]} == {"2.0.0": "inactive", "1.0.0": "live"}
    assert await roles(stub) == {"2.0.0": "ROLE_INACTIVE", "1.0.0": "ROLE_LIVE"}


async def test_promoting_the_live_version_says_nothing_changed(platform):
    ws, stub = platform
    result = await cdpctl(ws, "models", "promote", "churn_risk", "1.0.0")
    assert result.exit_code == 0, result.output
    assert "churn_risk: 1.0.0 was already live; nothing changed" in result.output
    assert await roles(stub) == {"1.0.0": "ROLE_LIVE", "2.0.0": "ROLE_INACTIVE"}


async def test_refusals_are_printed_as_the_service_gives_them(platform):
    ws, stub = platform
    unknown = await cdpctl(ws, "models", "promote", "churn_risk", "9.9.9")
    assert unknown.exit_code == 1
    assert "NOT_FOUND" in unknown.output and "no version '9.9.9' (versions: 1.0.0, 2.0.0)" in unknown.output

    nothing_before = await cdpctl(ws, "models", "rollback", "churn_risk")
    assert nothing_before.exit_code == 1
    assert "FAILED_PRECONDITION" in nothing_before.output and "no earlier live version" in nothing_before.output

    empty = await cdpctl(ws, "models", "promote", "churn_risk", "", "--json")
    assert empty.exit_code == 1
    assert json.loads(empty.output)["error"]["fields"] == [{"field": "version", "description": "is required"}]
    assert await roles(stub) == {"1.0.0": "ROLE_LIVE", "2.0.0": "ROLE_INACTIVE"}
