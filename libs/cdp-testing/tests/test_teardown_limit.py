"""The teardown of a failed test has a limit (`cdp_testing.plugin`): pytest-timeout stops its timer when a
test fails, and an event loop's teardown waiting for a task that ignored its cancellation hung a whole run."""

pytest_plugins = ["pytester"]

HANGS = """
import asyncio


async def stubborn():
    while True:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            pass  # swallowed: the loop's teardown waits for this task for ever


async def test_fails_and_leaves_a_stubborn_task():
    asyncio.get_running_loop().create_task(stubborn(), name="stubborn-loop")
    assert False


async def test_passes():
    pass
"""


def test_a_failed_tests_teardown_that_hangs_ends_naming_the_task(pytester):
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\nteardown_timeout = 2\n"
    )
    pytester.makepyfile(test_hangs=HANGS)
    # Bounded: before the limit the run never ended (pytester raises TimeoutExpired).
    result = pytester.runpytest_subprocess("-p", PLUGIN, "-p", "no:cacheprovider", "--timeout", "30", timeout=60)
    result.assert_outcomes(failed=1, passed=1, errors=1)
    result.stdout.fnmatch_lines(["*teardown of test_hangs.py::test_fails_and_leaves_a_stubborn_task hung for 2s*"])
    result.stdout.fnmatch_lines(["*stubborn-loop: test_hangs.py:* stubborn*"])


PLUGIN = "cdp_testing.plugin"
