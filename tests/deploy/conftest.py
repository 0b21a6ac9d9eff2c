"""Session fixtures for the deploy tests: the chart rendered once per scenario."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

# --import-mode=importlib keeps test directories off sys.path; the tests share chart_support.py.
sys.path.insert(0, str(Path(__file__).parent))

from chart_support import SCENARIOS, Rendered, effective_values, request, run_helm


def pytest_collection_modifyitems(items):
    # Whichever deploy test runs first on a fresh clone also builds the Python 3.12 environment
    # holding the Helm SDK (a ~70 MB wheel); the suite's 120 s default is too tight for that.
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(900))


@pytest.fixture(scope="session")
def helm_batch():
    return run_helm


@pytest.fixture(scope="session")
def rendered() -> dict[str, Rendered]:
    names = list(SCENARIOS)
    results = run_helm([request("template", SCENARIOS[name]) for name in names])
    out = {}
    for name, result in zip(names, results, strict=True):
        if not result["ok"]:
            raise AssertionError(f"scenario {name!r} failed to render: {result['error']}")
        objects = [doc for doc in yaml.safe_load_all(result["manifest"]) if doc]
        out[name] = Rendered(name, effective_values(SCENARIOS[name]), objects)
    return out
