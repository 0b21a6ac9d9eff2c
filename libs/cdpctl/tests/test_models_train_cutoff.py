"""cdpctl models train with a cut-off too late for its evaluation slice, through a scoring service that
trains (in-process, real nats-server, the workspace's profile store): the refusal names the cutoff given,
the label window and the latest cutoff that works with the data held. A day-2 trial ran `models train
fraud_risk --cutoff 04:15:00Z` (a 10-minute label window) at 04:26 and was told `cutoff` ... "75 s after
it": a figure about the evaluation slice's cut-off (cutoff + the window), which nobody had given."""

from __future__ import annotations

import asyncio
import os

import pytest
from click.testing import CliRunner

from cdp_kit.service import serving
from cdp_kit.storage import open_store
from cdp_scoring.__main__ import setup
from cdp_scoring.settings import ScoringSettings
from cdp_training.learn import iso
from cdp_training.platformdata import write_population
from cdp_training.pointintime import observed_until, read_profiles
from cdp_training.simulator import simulate
from cdp_training.traits import COMPUTED_TRAITS
from cdpctl.cli import main
from cdpctl.platform import Workspace

DAY = 86_400.0


@pytest.fixture
async def platform(nats_server, tmp_path):
    """A workspace whose profile store holds 300 simulated customers; (workspace, its last event's time)."""
    ws = Workspace(tmp_path / "home")
    ws.prepare(())
    profile_store = f"sqlite:///{ws.data_dir / 'profile.db'}"
    async with open_store(profile_store) as store:
        await write_population(store, simulate(300, 31), list(COMPUTED_TRAITS.values()))
        end = observed_until(await read_profiles(store))
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
        ws.write_run(
            {
                "pid": os.getpid(),
                "nats": nats_server.url,
                "admin_token_file": str(ws.admin_token_file),
                "services": {"scoring": {"grpc": f"127.0.0.1:{runtime.grpc.port}"}},
            }
        )
        yield ws, end


async def test_a_cutoff_too_late_for_the_evaluation_slice_is_refused_naming_the_latest_that_works(platform):
    ws, end = platform
    cutoff = iso(end - 45 * DAY)  # purchase_propensity: 30d labels close before the end, the evaluation's after
    args = ["--home", str(ws.root), "models", "train", "purchase_propensity", "--cutoff", cutoff]
    result = await asyncio.to_thread(CliRunner().invoke, main, args, catch_exceptions=False)
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "INVALID_ARGUMENT" in text and "cutoff" in text
    assert cutoff in text and "30d" in text
    assert f"the latest cutoff that works now is {iso(end - 60 * DAY)}" in text
