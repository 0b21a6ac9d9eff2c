"""pytest plugin loaded for every test (`-p cdp_testing.plugin`): shared fixtures, and how `--dist loadscope`
packs modules onto xdist workers (`cdp_testing.scheduling`: longest first)."""

from __future__ import annotations

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
