"""pytest plugin loaded for every test (`-p cdp_testing.plugin`): shared fixtures, and how `--dist loadscope`
packs modules onto xdist workers (`cdp_testing.scheduling`: longest first)."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import AsyncIterator, Iterator

import pytest

from cdp_kit.natsserver import NatsServer


@pytest.hookimpl(optionalhook=True, tryfirst=True)  # pytest-xdist's hook, before its own loadscope
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") == "loadscope":
        from cdp_testing.scheduling import make_scheduler

        return make_scheduler(config, log)
    return None


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    # Workers see `--dist no`: tell them their collection is handed out longest first.
    node.workerinput["cdp_longest_first"] = node.config.getvalue("dist") == "loadscope"


@pytest.hookimpl(trylast=True)  # after any other reordering
def pytest_collection_modifyitems(config, items):
    if getattr(config, "workerinput", {}).get("cdp_longest_first"):
        from cdp_testing.scheduling import sort_collection

        sort_collection(items)


def pytest_addoption(parser):
    parser.addini(
        "teardown_timeout",
        "seconds a test's teardown may take when pytest-timeout no longer bounds it (after the test failed); "
        "0: no limit",
        default="60",
    )


def _pending_tasks() -> list[str]:
    """Each task of the running event loop not done yet: its name and the chain of awaits it is suspended
    in (file, line and function: code, never values)."""
    loop = asyncio._get_running_loop()
    if loop is None:
        return []
    pending = []
    for task in asyncio.all_tasks(loop):
        chain, coro = [], task.get_coro()
        while coro is not None and len(chain) < 8:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame is None:
                break
            chain.append(f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno} {frame.f_code.co_name}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        pending.append(f"{task.get_name()}: {' -> '.join(chain) or '?'}")
    return sorted(pending)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item):
    """A test's teardown with a limit, also after the test failed.

    pytest-timeout stops its timer as soon as a test fails (its `pytest_exception_interact`, meant for pdb;
    `signal` and `thread` methods alike), so a failed test's teardown has no limit: an event loop's teardown
    (asyncio.Runner cancels each task left once, then waits for all of them) waiting for a task that
    ignored its cancellation hung a whole `make test` at 99 %. So when no timer is armed the teardown gets
    `teardown_timeout` seconds (ini, 60 by default); past them the loop's pending tasks are named with where
    each waits, the wait is broken (an error raised in the loop once a second until it lets go: one that
    lands in a task's step ends that task instead) and the teardown fails with that list."""
    limit = float(item.config.getini("teardown_timeout"))
    if (
        limit <= 0
        or not hasattr(signal, "SIGALRM")
        or threading.current_thread() is not threading.main_thread()
        or signal.getitimer(signal.ITIMER_REAL)[0] > 0  # pytest-timeout's timer still runs: it bounds this
    ):
        return (yield)
    hung: list[str] = []

    def message() -> str:
        tasks = "\n  ".join(hung)
        return (
            f"teardown of {item.nodeid} hung for {limit:g}s; tasks of its event loop that did not "
            f"end when cancelled:\n  {tasks}"
        )

    def on_alarm(signum, frame):
        if asyncio._get_running_loop() is None:
            return  # not in an event loop (or out of it already): nothing to break
        if not hung:
            hung.extend(_pending_tasks() or ["(none pending)"])
        pytest.fail(message(), pytrace=False)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit, 1.0)
    try:
        result = yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if hung:  # the error ended the stuck tasks rather than the wait: the teardown went on, but it hung
        pytest.fail(message(), pytrace=False)
    return result


@pytest.fixture
def nats_server(tmp_path) -> Iterator[NatsServer]:
    """A real nats-server with JetStream on a free port and a temporary store."""
    server = NatsServer(store_dir=tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def nats_client(nats_server: NatsServer) -> AsyncIterator:
    import nats

    nc = await nats.connect(nats_server.url, max_reconnect_attempts=2, reconnect_time_wait=0.1)
    try:
        yield nc
    finally:
        await nc.close()
