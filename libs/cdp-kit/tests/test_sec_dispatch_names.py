"""Orchestration's dispatchers are granted on ACTIONS by name, like every other consumer: the names the
service uses (one per channel it can run) are the ones granted, and any other consumer of ACTIONS is
refused under orchestration's NATS user. Real nats-server, orchestration's real permissions."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from types import SimpleNamespace

import nats.errors
import pytest

from cdp_kit.bus import Bus, ConsumerSpec, subjects
from cdp_kit.natsauth import ACTION_CHANNELS, ROLES, dispatch_durable
from cdp_kit.natsserver import NatsServer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_natsauth import Users, violations


@pytest.fixture
def users(tmp_path):
    server = NatsServer(store_dir=tmp_path / "nats")
    users = Users(server, tmp_path / "secrets")
    server.config = users.config()
    server.start()
    try:
        asyncio.run(users.provision())  # the streams, as `cdpctl up` makes them: no service's user may
        yield users
    finally:
        server.close()


def test_the_granted_dispatcher_names_are_the_ones_orchestration_uses():
    from cdp_orchestration.channels.wire import CHANNELS
    from cdp_orchestration.dispatch import dispatcher

    assert set(ACTION_CHANNELS) == set(CHANNELS)
    bus = SimpleNamespace(js=None, telemetry=SimpleNamespace(meter=None))
    bus.consumer = lambda spec, handler: SimpleNamespace(spec=spec)
    for channel in CHANNELS:
        runner = dispatcher(bus, store=None, channel=SimpleNamespace(name=channel))
        assert runner.spec.stream == subjects.ACTIONS and runner.spec.durable == dispatch_durable(channel)
    granted = {c.name for c in ROLES["orchestration"].consumers if c.stream == subjects.ACTIONS}
    assert granted == {dispatch_durable(channel) for channel in CHANNELS}


async def test_orchestration_keeps_its_dispatchers_and_no_other_consumer_of_actions(users):
    async with Bus.connect(users.server.url, name="orchestration", security=users.security("orchestration")) as bus:
        for channel in ACTION_CHANNELS:
            spec = ConsumerSpec(
                stream=subjects.ACTIONS,
                durable=dispatch_durable(channel),
                filter_subjects=(subjects.actions_of(channel),),
            )
            await bus.js.add_consumer(subjects.ACTIONS, spec.config())
        assert violations(users.server) == []
        # A consumer by any other name: a spy on every action (addresses, rendered messages) refused.
        for name, filter_subject in (("orchestration-spy", "actions.>"), ("x", subjects.actions_of("email"))):
            spy = ConsumerSpec(stream=subjects.ACTIONS, durable=name, filter_subjects=(filter_subject,))
            with pytest.raises(nats.errors.TimeoutError):
                await bus.js.add_consumer(subjects.ACTIONS, spy.config(), timeout=1)
    assert len(violations(users.server)) == 2
