"""How `make test` packs the test modules onto its workers (pytest-xdist `--dist loadscope`).

Two rules on top of xdist's loadscope:

- Longest first. xdist hands a worker its next module when the worker is nearly done with what it has;
  by default it orders modules by their number of tests, which puts the modules with one or two long
  tests (a whole platform killed under load, a story end to end) last, and one worker then runs the last
  of them alone while the other core idles. Here modules go out in the order of their measured duration
  (`durations.json`, longest first: longest-processing-time-first scheduling), so the long ones overlap
  each other at the start and the short ones fill both workers evenly at the end. Only the relative sizes
  matter, so a table measured on a busy machine serves. A module missing from the table (a new one) goes
  before all of them: it may be long, and a long module last is what leaves a core idle, while a short
  one early costs nothing. Within a module the tests keep their collected order.
- One unit per shared fixture. The modules of a folder in `SHARED_SESSION_FOLDERS` share a session
  fixture that is expensive to start (tests/fuzz: a whole platform); they go to one worker together,
  so it starts once rather than once per worker. Every other module is one unit (its classes too, unlike
  xdist's loadscope, which splits classes apart: a module-scoped fixture then starts once).

CDP_TEST_DURATIONS names another table (a JSON object: module path -> seconds). Refresh the table after
adding slow tests: `pytest -n auto --dist loadscope --junitxml=report.xml` and
`python -m cdp_testing.scheduling report.xml`.
"""

from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

TABLE = Path(__file__).with_name("durations.json")
ROOT = Path(__file__).resolve().parents[4]  # the checkout: libs/cdp-testing/src/cdp_testing/
SHARED_SESSION_FOLDERS = ("tests/fuzz/",)


def load_table(path: Path = TABLE) -> dict[str, float]:
    try:
        return {str(module): float(seconds) for module, seconds in json.loads(path.read_text()).items()}
    except (OSError, ValueError):
        return {}


def unit_of(nodeid: str) -> str:
    """The scheduling unit of a test: its module, or the shared-fixture folder holding it."""
    module = nodeid.split("::", 1)[0]
    for folder in SHARED_SESSION_FOLDERS:
        if module.startswith(folder):
            return folder
    return module


def longest_first(nodeids: list[str], table: dict[str, float]) -> list[str]:
    """`nodeids` grouped by unit: units holding a module missing from `table` first, then the others in
    descending expected duration; tests keep their order within a unit, and ties keep collection order."""
    first_seen: dict[str, int] = {}
    expected: dict[str, float] = defaultdict(float)
    counted_modules: set[str] = set()
    for index, nodeid in enumerate(nodeids):
        unit, module = unit_of(nodeid), nodeid.split("::", 1)[0]
        first_seen.setdefault(unit, index)
        if module in table:
            if module not in counted_modules:
                counted_modules.add(module)
                expected[unit] += table[module]
        else:
            expected[unit] = float("inf")  # unmeasured: first (see the module docstring)
    order = {nodeid: index for index, nodeid in enumerate(nodeids)}
    return sorted(nodeids, key=lambda n: (-expected[unit_of(n)], first_seen[unit_of(n)], order[n]))


def make_scheduler(config, log):
    """An xdist scheduler for `--dist loadscope` following the two rules above. Each worker has already
    sorted its collection longest first (`sort_collection`): xdist sends tests as indexes into the
    workers' lists, so the order is made there, and the scheduler only keeps it (no reordering by count)."""
    from xdist.scheduler import LoadScopeScheduling

    class LongestFirstScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

        def schedule(self) -> None:
            self.config.option.loadscopereorder = False
            super().schedule()

    return LongestFirstScheduling(config, log)


def sort_collection(items: list) -> None:
    """Sort a worker's collected items longest unit first, in place (see `longest_first`)."""
    table = load_table(Path(os.environ.get("CDP_TEST_DURATIONS") or TABLE))
    by_id = {item.nodeid: item for item in items}
    items[:] = [by_id[nodeid] for nodeid in longest_first(list(by_id), table)]


def table_from_junit(report: Path, root: Path = ROOT) -> dict[str, float]:
    """Seconds per test module (setup, call and teardown of its tests) from a `--junitxml` report."""
    seconds: dict[str, float] = defaultdict(float)
    for case in ET.parse(report).getroot().iter("testcase"):
        module = _module_path(case.get("classname", ""), root)
        if module is not None:
            seconds[module] += float(case.get("time") or 0.0)
    return {module: round(total, 1) for module, total in sorted(seconds.items())}


def _module_path(classname: str, root: Path) -> str | None:
    # "libs.cdp-kit.tests.test_x.TestClass" -> libs/cdp-kit/tests/test_x.py (the longest prefix that is a file).
    parts = classname.split(".")
    for end in range(len(parts), 0, -1):
        candidate = "/".join(parts[:end]) + ".py"
        if (root / candidate).is_file():
            return candidate
    return None


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m cdp_testing.scheduling REPORT.xml  (a pytest --junitxml report)")
    measured = table_from_junit(Path(sys.argv[1]))
    TABLE.write_text(json.dumps(measured, indent=1, sort_keys=True) + "\n")
    print(f"{len(measured)} modules, {sum(measured.values()):.0f} s in all -> {TABLE}")
