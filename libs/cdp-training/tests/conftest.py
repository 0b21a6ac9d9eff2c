"""Shared, small simulated data for the training pipeline tests. The profile pass is the slow part (every
event through the profile domain), and it gives the same result on every worker: what it makes is built
once a run, by the first xdist worker to ask, and read by the others (`_once`)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from cdp_kit.storage import open_store
from cdp_training.dataset import PopulationFields, population_fields
from cdp_training.platformdata import write_population
from cdp_training.pointintime import StoredProfile, read_profiles
from cdp_training.simulator import Population, simulate
from cdp_training.traits import COMPUTED_TRAITS


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory, worker_id) -> Path:
    """A directory every worker of this run sees: the parent of the workers' own temporary directories
    under xdist (that one run's), the session's own without it (never a past run's)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if worker_id != "master" else base


def _once(shared: Path, name: str, make: Callable[[Path], None]) -> Path:
    """`shared/name`, made by `make(path)` if no worker made it yet (the others wait on its lock). It is made
    under another name and renamed, so a worker that dies making it leaves nothing behind the name."""
    path = shared / name
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            partial = shared / f"{name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            partial.unlink(missing_ok=True)
            make(partial)
            os.replace(partial, path)
    return path


@pytest.fixture(scope="session")
def population() -> Population:
    # many fraudsters, so a few hundred people show both kinds
    return simulate(400, 11, fraud_rate=0.2)


@pytest.fixture(scope="session")
def fields(population: Population, shared_dir: Path) -> PopulationFields:
    def make(path: Path) -> None:
        path.write_bytes(pickle.dumps(population_fields(population, list(COMPUTED_TRAITS.values()), workers=1)))

    return pickle.loads(_once(shared_dir, "fields-400-11.pickle", make).read_bytes())


@pytest.fixture(scope="session")
def platform_store(shared_dir: Path) -> Callable[[int, int], tuple[Population, str]]:
    """`platform_store(size, seed)`: the simulated population and the URL of a profile store (SQLite) holding
    it as the profile service writes it (`write_population`, every computed trait).

    Writing is ~6 ms of CPU a person (the profile domain); reading it back a tenth of that: test_clusters,
    test_monitoring and test_found_s42_training read the same 500 people, on whichever workers they land.
    Callers only read the file; one that writes must copy it first."""

    def stored(size: int, seed: int) -> tuple[Population, str]:
        def make(directory: Path) -> None:  # a directory: the database and its WAL move together
            directory.mkdir()

            async def write() -> None:
                async with open_store(f"sqlite:///{directory / 'profile.db'}") as store:
                    await write_population(store, simulate(size, seed), list(COMPUTED_TRAITS.values()))

            asyncio.run(write())

        directory = _once(shared_dir, f"platform-{size}-{seed}", make)
        return simulate(size, seed), f"sqlite:///{directory / 'profile.db'}"  # simulating is milliseconds

    return stored


def profiles_in(url: str) -> list[StoredProfile]:
    """Every profile in the store at `url`, as a training run reads them."""

    async def read() -> list[StoredProfile]:
        async with open_store(url) as store:
            return await read_profiles(store)

    return asyncio.run(read())
