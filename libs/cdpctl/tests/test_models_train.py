"""cdpctl models train against a real scoring service (in-process, real nats-server) and a profile store
in the workspace: the candidate is registered in shadow beside live with its record, and stays there with
the reason when it does not beat live by the margin."""

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
from cdp_scoring.modelstore import SHIPPED
from cdp_scoring.settings import ScoringSettings
from cdp_training.learn import iso
from cdp_training.platformdata import write_population
from cdp_training.simulator import simulate
from cdp_training.traits import COMPUTED_TRAITS
from cdpctl.cli import main
from cdpctl.platform import Workspace

DAY = 86_400.0


@pytest.fixture
async def platform(nats_server, tmp_path):
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
    population = simulate(600, 23)
    async with open_store(f"sqlite:///{ws.data_dir / 'profile.db'}") as store:
        await write_population(store, population, list(COMPUTED_TRAITS.values()))
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
            yield ws, population, scoring_pb2_grpc.ScoringServiceStub(channel)


async def test_a_candidate_that_does_not_beat_live_stays_in_shadow_with_its_record(platform, tmp_path):
    ws, population, stub = platform
    await stub.DeployModel(scoring_pb2.DeployModelRequest(onnx=(SHIPPED / "churn_risk.onnx").read_bytes()))
    label = tmp_path / "label.json"
    label.write_text(json.dumps({"kind": "no_activity", "window": "30d"}))
    args = ["--home", str(ws.root), "models", "train", "churn_risk", "--cutoff", iso(population.cutoff - 30 * DAY)]
    args += ["--label", str(label), "--margin", "0.5"]
    result = await asyncio.to_thread(CliRunner().invoke, main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["role"] == "shadow" and summary["decision"]["promote"] is False

    model = await stub.GetModel(scoring_pb2.GetModelRequest(name="churn_risk"))
    assert model.live_version == "1.1.0"
    candidate = next(v for v in model.versions if v.spec.version == summary["version"])
    assert candidate.role == scoring_pb2.ROLE_SHADOW
    training = candidate.spec.training
    assert "stays in shadow" in training["promotion"]["reason"]
    assert training["promotion"]["live_version"] == "1.1.0"  # live scored by the service on the same rows
    assert training["rows"] > 500 and training["data_hash"] and training["feature_importances"]
    assert candidate.spec.quality["live_on_holdout"]["auc"] > 0.6
