"""`make test` hands out modules longest first, and the fuzz folder's modules (one shared platform) to one
worker: a small suite run under pytest-xdist as `make test` runs it, with a duration table of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from cdp_testing.scheduling import longest_first, unit_of

RECORDING_TEST = """
import json, os, time
def test_{name}():
    with open({log!r}, "a") as out:
        out.write(json.dumps([os.environ["PYTEST_XDIST_WORKER"], {module!r}, time.monotonic()]) + "\\n")
"""


def test_units_are_modules_except_the_shared_fuzz_folder():
    assert unit_of("services/x/tests/test_a.py::TestA::test_one") == "services/x/tests/test_a.py"
    assert unit_of("tests/fuzz/test_http.py::test_x[1]") == unit_of("tests/fuzz/test_grpc.py::test_y") == "tests/fuzz/"


def test_unmeasured_units_go_first_then_the_longest_and_tests_keep_their_order():
    ids = ["a.py::t1", "a.py::t2", "b.py::t1", "new.py::t1", "c.py::t1", "c.py::t2", "c.py::t3"]
    table = {"a.py": 1.0, "b.py": 30.0, "c.py": 5.0}
    assert longest_first(ids, table) == [
        "new.py::t1",
        "b.py::t1",
        "c.py::t1",
        "c.py::t2",
        "c.py::t3",
        "a.py::t1",
        "a.py::t2",
    ]


def test_two_workers_run_the_longest_modules_first_and_the_fuzz_folder_on_one_worker(tmp_path):
    log = tmp_path / "ran.jsonl"
    # Test counts say the opposite of the durations: xdist's own order (most tests first) would run the
    # long one-test modules last.
    modules = {"test_long.py": (1, 300.0), "test_medium.py": (2, 100.0), "test_short.py": (6, 1.0)}
    modules.update({f"test_quick{i}.py": (5, 0.5) for i in range(4)})
    modules.update({"tests/fuzz/test_f1.py": (3, 2.0), "tests/fuzz/test_f2.py": (3, 2.0)})
    for module, (count, _seconds) in modules.items():
        path = tmp_path / module
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(RECORDING_TEST.format(name=f"t{i}", log=str(log), module=module) for i in range(count)))
    table = tmp_path / "durations.json"
    table.write_text(json.dumps({module: seconds for module, (_count, seconds) in modules.items()}))
    # Only the plugins this needs (xdist and ours): every installed one would be imported by three processes.
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "xdist", "-p", "cdp_testing.plugin", "-p", "no:cacheprovider"]
    result = subprocess.run(
        [*pytest, "-n", "2", "--dist", "loadscope", "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path)],
        cwd=tmp_path,
        env={**os.environ, "CDP_TEST_DURATIONS": str(table), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    ran = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(ran) == sum(count for count, _seconds in modules.values())
    # Each worker met its modules in descending expected duration (units as xdist handed them out).
    for worker in {w for w, _m, _t in ran}:
        sequence = [unit_of(m) for w, m, _t in sorted(ran, key=lambda r: r[2]) if w == worker]
        units = list(dict.fromkeys(sequence))
        expected = [sum(s for m, (_c, s) in modules.items() if unit_of(m) == u) for u in units]
        assert expected == sorted(expected, reverse=True), (worker, units)
    # The two longest started first, one on each worker.
    first = {w: next(m for w2, m, _t in sorted(ran, key=lambda r: r[2]) if w2 == w) for w in {w for w, _m, _t in ran}}
    assert sorted(first.values()) == ["test_long.py", "test_medium.py"]
    assert len({w for w, m, _t in ran if m.startswith("tests/fuzz/")}) == 1
