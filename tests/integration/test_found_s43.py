"""Found by the on-call helper (stop 43), on a running `make up` platform.

nats-server restarted on an empty JetStream store (its store lost or wiped, a crash on a fresh volume): the
supervisor started it again at once, on the same port, but made no stream: the streams are made only by
the provisioner, which `cdpctl up` ran at its start and before a crashed service starts again. Every
service stayed up and reconnected, and the collector answered every event 503 for as long as the platform
ran, with nothing saying why but "no stream accepts this subject". The supervisor now provisions again
each time it has started nats-server again (bounded, as before a service's restart): the streams, the
ownership bucket and their settings are back within seconds, and events are accepted again."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time

import pytest
from nats.js.errors import NotFoundError

from cdp_kit.streamtable import needed
from cdp_testing.platform_run import CDPCTL, RunningPlatform


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    with RunningPlatform(tmp_path_factory.mktemp("s43"), companions=False) as running:
        yield running


async def _missing(platform: RunningPlatform) -> list[str]:
    nc = await platform.connect_nats()
    try:
        js = nc.jetstream()
        missing = []
        for name in needed():
            try:
                await js.stream_info(name)
            except NotFoundError:
                missing.append(name)
        return missing
    finally:
        await nc.close()


@pytest.mark.timeout(300)
def test_nats_server_restarted_on_an_empty_store_gets_its_streams_back(platform):
    assert asyncio.run(_missing(platform)) == []
    store = platform.home / "nats" / "jetstream"
    assert store.is_dir(), sorted(p.name for p in (platform.home / "nats").iterdir())
    shutil.rmtree(store)  # the store lost under a running server, which then dies
    platform.wait_nats_restarted(platform.kill_nats())

    deadline = time.monotonic() + 60
    while missing := asyncio.run(_missing(platform)):
        assert time.monotonic() < deadline, f"streams still missing after nats-server's restart: {missing}"
        time.sleep(1.0)

    send = [CDPCTL, "send", "identify", "--user-id", "zoe", "--traits", '{"first_name": "Zoe"}']
    deadline = time.monotonic() + 60
    while (result := subprocess.run(send, env=platform.env, capture_output=True, text=True, timeout=60)).returncode:
        assert time.monotonic() < deadline, f"the collector still refuses: {result.stdout}{result.stderr}"
        time.sleep(1.0)
    # And it goes through: identity and profile resume on their recreated streams (checkpoint rewinds).
    shown = [CDPCTL, "profile", "user_id", "zoe", "--wait", "60"]
    result = subprocess.run(shown, env=platform.env, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0 and "personId" in result.stdout, result.stdout + result.stderr + platform.log_tail()
