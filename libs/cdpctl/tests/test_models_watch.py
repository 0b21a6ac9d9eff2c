"""cdpctl models train / drift / quality against a scoring service that trains (in-process, real
nats-server, `CDP_SCORING_TRAINING_STORE` on the workspace's profile store, as `cdpctl up` sets it): the
run happens in the service, its phases print as they end, and the live version's drift and realised
quality read back. (Where the service cannot train, `models train` runs locally: test_models_train.py.)"""

from __future__ import annotations

import asyncio
import json
import os

import grpc
import pytest
from click.testing import CliRunner

from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from cdp_kit.service import serving
from cdp_kit.storage import open_store
from cdp_scoring.__main__ import setup
from cdp_scoring.settings import ScoringSettings
from cdp_training.platformdata import write_population
from cdp_training.simulator import simulate
from cdp_training.traits import COMPUTED_TRAITS
from cdpctl.cli import main
from cdpctl.platform import Workspace


@pytest.fixture
async def platform(nats_server, tmp_path):
    ws = Workspace(tmp_path / "home")
    ws.prepare(())
    profile_store = f"sqlite:///{ws.data_dir / 'profile.db'}"
    async with open_store(profile_store) as store:
        await write_population(store, simulate(400, 29), list(COMPUTED_TRAITS.values()))
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
        training_store=profile_store,
    )
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
            yield ws, scoring_pb2_grpc.ScoringServiceStub(channel)


async def cdpctl(ws: Workspace, *args: str):
    result = await asyncio.to_thread(CliRunner().invoke, main, ["--home", str(ws.root), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


async def test_train_runs_in_the_service_and_the_live_version_is_watched(platform):
    ws, stub = platform
    result = await cdpctl(ws, "models", "train", "purchase_propensity")
    lines = result.output.strip().splitlines()
    assert any("training_set:" in line for line in lines) and any("fitting:" in line for line in lines)
    summary = json.loads(lines[-1])
    assert summary["role"] == "live" and "first version" in summary["decision"]["reason"]
    model = await stub.GetModel(scoring_pb2.GetModelRequest(name="purchase_propensity"))
    assert model.live_version == summary["version"]

    drift = json.loads((await cdpctl(ws, "models", "drift", "--json")).output)
    assert [(d["model"], d["version"], d["status"]) for d in drift] == [
        ("purchase_propensity", summary["version"], "too_few_rows")  # nothing scored since it went live
    ]

    shown = (await cdpctl(ws, "models", "quality", "purchase_propensity", "--refresh")).output
    assert "realised" in shown and "auc" in shown and "reliability" in shown
    document = json.loads((await cdpctl(ws, "models", "quality", "purchase_propensity", "--json")).output)
    assert document["version"] == summary["version"]
    assert document["realised"]["auc"] > 0.6 and document["training"]["auc"] > 0.6


async def test_a_bad_cutoff_is_named(platform):
    ws, _ = platform
    result = await asyncio.to_thread(
        CliRunner().invoke,
        main,
        ["--home", str(ws.root), "models", "train", "churn_risk", "--cutoff", "soon"],
        catch_exceptions=False,
    )
    assert result.exit_code == 1 and "INVALID_ARGUMENT" in result.output and "cutoff" in result.output
