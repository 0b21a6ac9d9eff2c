"""Shared, small simulated data for the training pipeline tests (built once per session: the profile pass
is the slow part)."""

from __future__ import annotations

import pytest

from cdp_training.dataset import PopulationFields, population_fields
from cdp_training.simulator import Population, simulate
from cdp_training.traits import COMPUTED_TRAITS


@pytest.fixture(scope="session")
def population() -> Population:
    # many fraudsters, so a few hundred people show both kinds
    return simulate(400, 11, fraud_rate=0.2)


@pytest.fixture(scope="session")
def fields(population: Population) -> PopulationFields:
    return population_fields(population, list(COMPUTED_TRAITS.values()), workers=1)
