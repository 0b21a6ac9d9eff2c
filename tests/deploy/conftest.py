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


class Scenarios(dict):
    """The scenarios of SCENARIOS rendered when a test first asks for one, and kept for the session: the
    first two asked for each alone, then at the third miss every other one in one batch.

    Rendering all nine is ~2.5 s of CPU, one ~0.2 s, and each `helm batch` process ~0.15 s more: a worker
    whose deploy modules read one or two scenarios (test_dockerfile, test_skaffold, test_chart_privacy_hash_key
    alone do) renders those, and one that reads more pays two processes more than rendering all at once."""

    def __missing__(self, name: str) -> Rendered:
        names = [name] if len(self) < 2 else [name, *(n for n in SCENARIOS if n != name and n not in self)]
        results = run_helm([request("template", SCENARIOS[n]) for n in names])
        for n, result in zip(names, results, strict=True):
            if not result["ok"]:
                raise AssertionError(f"scenario {n!r} failed to render: {result['error']}")
            # libyaml's loader (~3x faster than the pure-Python one; the same documents for these manifests)
            objects = [doc for doc in yaml.load_all(result["manifest"], Loader=yaml.CSafeLoader) if doc]
            self[n] = Rendered(n, effective_values(SCENARIOS[n]), objects)
        return self[name]


@pytest.fixture(scope="session")
def rendered() -> dict[str, Rendered]:
    return Scenarios()
