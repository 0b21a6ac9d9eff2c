"""Shared, module-scoped fixtures: a generated population and a matcher fitted on it (fitting once keeps
the folder fast)."""

from __future__ import annotations

import pytest

from cdp_identity.matching import DEFAULT_PERSON_CONFIG, Matcher
from cdp_testing.people import generate_population


@pytest.fixture(scope="session")
def population() -> tuple[list[dict], dict[str, str]]:
    return generate_population(3000, duplicates_rate=0.3, seed=11)


@pytest.fixture(scope="session")
def fitted(population) -> tuple[Matcher, object]:
    records, _ = population
    matcher = Matcher(DEFAULT_PERSON_CONFIG)
    report = matcher.fit(records)
    return matcher, report
