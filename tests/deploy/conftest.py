"""Session fixtures for the deploy tests: the chart rendered once per scenario."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import kubernetes_validate.utils
import pytest
import yaml

# --import-mode=importlib keeps test directories off sys.path; the tests share chart_support.py.
sys.path.insert(0, str(Path(__file__).parent))

from chart_support import SCENARIOS, Rendered, effective_values, request, run_helm

# kubernetes_validate reads its JSON schema files again for every object it validates (the strict
# definitions file alone is ~1.3 MB): read once per file, the 816 validations of test_chart take ~1/3 the
# CPU. The schemas are only read, never changed, by its validator.
kubernetes_validate.utils.schema_contents = functools.cache(kubernetes_validate.utils.schema_contents)


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
        # libyaml's loader (~3x faster than the pure-Python one; the same documents for these manifests)
        objects = [doc for doc in yaml.load_all(result["manifest"], Loader=yaml.CSafeLoader) if doc]
        out[name] = Rendered(name, effective_values(SCENARIOS[name]), objects)
    return out
