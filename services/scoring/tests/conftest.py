"""What the scoring service's tests share: the settings of one in-process replica on the test's
nats-server, with its store and model directory in the test's temporary folder and no shipped models
(a test deploys what it scores). Keyword overrides change any setting."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
from typing import Any

import pytest

from cdp_scoring.settings import ScoringSettings


def settings(nats_server, tmp_path, **overrides: Any) -> ScoringSettings:
    values: dict[str, Any] = dict(
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
    return ScoringSettings(**(values | overrides))


@pytest.fixture(scope="session")
def platform_store(tmp_path_factory, worker_id) -> str:
    """The URL of the profile service's store (SQLite) of a platform that ran for 20 months: 400 simulated
    customers, as `cdp_training.platformdata` writes them (every computed trait). Writing is ~6 ms of CPU
    a person (the profile domain), so it is written once a run, by the first xdist worker to ask, in the
    directory every worker's own sits in (the others wait on its lock): test_training_runs and
    test_shipped_clusters read the same file. Readers only: a test that writes copies it first."""
    from cdp_kit.storage import open_store
    from cdp_training.platformdata import write_population
    from cdp_training.simulator import simulate
    from cdp_training.traits import COMPUTED_TRAITS

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if worker_id != "master" else base  # this run's, never a past run's
    directory = shared / "scoring-platform-400-21"  # a directory: the database and its WAL move together
    with open(shared / "scoring-platform-400-21.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not directory.exists():
            partial = shared / "scoring-platform-400-21.partial"  # renamed once whole: a worker dying leaves none
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()

            async def write() -> None:
                async with open_store(f"sqlite:///{partial / 'profile.db'}") as store:
                    await write_population(store, simulate(400, 21), list(COMPUTED_TRAITS.values()))

            asyncio.run(write())
            os.replace(partial, directory)
    return f"sqlite:///{directory / 'profile.db'}"
