"""cdpctl models train / drift / quality against a scoring service that trains (in-process, real
nats-server, `CDP_SCORING_TRAINING_STORE` on the workspace's profile store, as `cdpctl up` sets it): the
run happens in the service, its phases print as they end, and the live version's drift and realised
quality read back. (Where the service cannot train, `models train` runs locally: test_models_train.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from pathlib import Path

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


@pytest.fixture(scope="module")
def population(tmp_path_factory) -> Path:
    """A profile store holding 400 simulated customers, written once: each test gets a copy of its own."""
    path = tmp_path_factory.mktemp("population") / "profile.db"

    async def write() -> None:
        async with open_store(f"sqlite:///{path}") as store:
            await write_population(store, simulate(400, 29), list(COMPUTED_TRAITS.values()))

    asyncio.run(write())
    return path


@pytest.fixture
async def platform(nats_server, tmp_path, population):
    ws = Workspace(tmp_path / "home")
    ws.prepare(())
    shutil.copy(population, ws.data_dir / "profile.db")
    profile_store = f"sqlite:///{ws.data_dir / 'profile.db'}"
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


class Canned(scoring_pb2_grpc.ScoringServiceServicer):
    """A scoring service that answers GetModelQuality and GetDrift with what it was given."""

    def __init__(self, quality: scoring_pb2.ModelQuality | None = None, drift=None) -> None:
        self.quality, self.drift = quality, drift

    async def GetModelQuality(self, request, context) -> scoring_pb2.ModelQuality:
        return self.quality

    async def GetDrift(self, request, context) -> scoring_pb2.GetDriftResponse:
        return self.drift


@contextlib.asynccontextmanager
async def canned_platform(tmp_path, servicer: Canned):
    """A workspace whose run file points at `servicer` as the scoring service."""
    server = grpc.aio.server()
    scoring_pb2_grpc.add_ScoringServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        ws = Workspace(tmp_path / "home")
        ws.prepare(())
        ws.write_run({"pid": os.getpid(), "services": {"scoring": {"grpc": f"127.0.0.1:{port}"}}})
        yield ws
    finally:
        await server.stop(None)


def table_rows(shown: str) -> dict[str, str]:
    """A printed table's rows by their first cell."""
    return {line.split("│")[1].strip(): line for line in shown.splitlines() if line.count("│") >= 3}


async def test_quality_says_when_and_why_the_figures_were_computed_and_that_they_are_stale(tmp_path):
    """Labels arrived after the figures: the text output says what computed them, on how many labelled rows,
    and since when (and why) they are stale, as --json does."""
    reply = scoring_pb2.ModelQuality(
        model="fraud_risk",
        version="1.1.0",
        trigger="label window closed",
        labelled_rows=412,
        stale_trigger="label event Chargeback",
    )
    reply.training.update({"auc": 0.95, "holdout_rows": 8000})
    reply.realised.update({"rows": 412, "auc": 0.91, "label": {"kind": "label_event"}, "cutoff": "2025-05-31"})
    reply.computed_at.FromJsonString("2026-12-04T10:00:00Z")
    reply.stale_since.FromJsonString("2026-12-04T10:20:30Z")
    async with canned_platform(tmp_path, Canned(quality=reply)) as ws:
        shown = (await cdpctl(ws, "models", "quality", "fraud_risk")).output
        document = json.loads((await cdpctl(ws, "models", "quality", "fraud_risk", "--json")).output)
    rows = table_rows(shown)
    assert "412" in rows["labelled rows"] and "8000" in rows["labelled rows"]
    assert "2026-12-04 10:00:00" in rows["computed (UTC)"] and "label window closed" in rows["trigger"]
    assert "2026-12-04 10:20:30" in rows["stale since (UTC)"] and "label event Chargeback" in rows["stale since (UTC)"]
    assert document["labelledRows"] == "412" and document["staleTrigger"] == "label event Chargeback"


async def test_drift_names_the_values_compared_against_the_aged_reference(tmp_path):
    drift = scoring_pb2.ModelDrift(model="churn_risk", version="1.1.0", role=scoring_pb2.ROLE_LIVE, status="ok")
    drift.values.add(name="sessions_30d", kind="feature", psi=0.08)
    drift.values.add(name="days_since_signup", kind="feature", psi=0.12, aged=True)
    drift.values.add(name="churn_risk", kind="score", psi=0.05, aged=True)
    drift.values.add(name="orders_90d", kind="feature", psi=0.01)
    async with canned_platform(tmp_path, Canned(drift=scoring_pb2.GetDriftResponse(models=[drift]))) as ws:
        shown = (await cdpctl(ws, "models", "drift")).output
        (document,) = json.loads((await cdpctl(ws, "models", "drift", "--json")).output)
    row = table_rows(shown)["churn_risk"]
    assert "feature days_since_signup 0.120 (aged), feature sessions_30d" in row  # worst first, aged marked
    assert row.rstrip("│ ").endswith("days_since_signup, churn_risk")  # the aged column
    assert [v["name"] for v in document["values"] if v.get("aged")] == ["days_since_signup", "churn_risk"]
