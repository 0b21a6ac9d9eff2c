"""The NATS roles of orchestration and the CRM connector, on the paths `make up`'s short story does not
reach: durable timers scheduled, fired and cancelled, an action dispatched, read back and erased, and
the connector's input sourced from the streams it follows - each under the service's own user, with no
permission violation."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from cdp_crm import streams as crm_streams
from cdp_kit.bus import (
    Bus,
    ConsumerSpec,
    OutMessage,
    dead_letter_stream,
    privacy_stream,
    profiles_stream,
    segments_stream,
    subjects,
)
from cdp_kit.natsauth import ROLES, NatsClientSettings, authorization_config, new_password, write_credentials
from cdp_kit.natsserver import NatsServer
from cdp_kit.provision import as_operator
from cdp_orchestration import streams as orchestration_streams
from cdp_orchestration.dispatch import erase_action


@pytest.fixture
def server(tmp_path):
    passwords = {name: new_password() for name in ROLES}
    for name, password in passwords.items():
        write_credentials(tmp_path / f"{name}.json", name, password)
    operator = new_password()
    nats = NatsServer(store_dir=tmp_path / "nats", config=authorization_config(passwords, operator_password=operator))
    with nats:
        # The streams, as `cdpctl up` makes them before the services start: no service's user may.
        asyncio.run(as_operator(nats.url, operator))
        yield nats, tmp_path


def as_user(server, name: str):
    nats, folder = server
    return Bus.connect(nats.url, name=name, security=NatsClientSettings(credentials_file=Path(folder) / f"{name}.json"))


def violations(server) -> list[str]:
    nats, _folder = server
    return [line for line in nats.log_path.read_text().splitlines() if " Violation - Subject " in line]


async def consume(bus: Bus, stream: str, durable: str, subject: str, count: int, timeout: float = 15.0) -> list:
    """What a durable consumer of `bus`'s user receives, up to `count` messages."""
    seen: list = []

    async def handle(batch):
        seen.extend(d.msg for d in batch)

    runner = bus.consumer(ConsumerSpec(stream=stream, durable=durable, filter_subjects=(subject,)), handle)
    task = asyncio.create_task(runner.run())
    deadline = time.monotonic() + timeout
    try:
        while len(seen) < count:
            assert time.monotonic() < deadline, f"{durable} got {len(seen)} of {count}"
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return seen


async def test_orchestration_schedules_fires_dispatches_and_erases_as_its_own_user(server):
    async with as_user(server, "orchestration") as bus:
        await bus.ensure_streams(dead_letter_stream())
        await bus.ensure_read_streams(privacy_stream())
        await orchestration_streams.ensure_streams(bus.js)
        at = time.time() + 1
        results = await bus.publisher.publish_batch(
            [
                orchestration_streams.schedule(0, "t-fires", at, {"timer": "t-fires"}),
                orchestration_streams.schedule(0, "t-cancelled", at + 600, {"timer": "t-cancelled"}),
                orchestration_streams.cancel(0, "t-cancelled"),
                OutMessage(subjects.actions("email", 0), b"an email", "action-1"),
            ]
        )
        assert all(r.ok for r in results), [r.error for r in results]
        # The server fires the timer into orchestration.in.0 (sourced); the engine's consumer reads it.
        (fired,) = await consume(
            bus, subjects.ORCHESTRATION, subjects.partition_durable("orchestration", 0), subjects.orchestration_in(0), 1
        )
        assert b"t-fires" in fired.data
        # A channel dispatcher takes the action; a privacy deletion reads it back and erases it.
        (action,) = await consume(
            bus, subjects.ACTIONS, "orchestration-dispatch-email", subjects.actions_of("email"), 1
        )
        seq = action.metadata.sequence.stream
        assert (await bus.js.get_msg(subjects.ACTIONS, seq)).data == b"an email"
        await erase_action(bus.js, seq)
    assert violations(server) == []


async def test_the_crm_connector_sources_and_consumes_its_input_as_its_own_user(server):
    async with as_user(server, "crm") as crm:
        await crm.ensure_streams(profiles_stream(), segments_stream(), privacy_stream(), dead_letter_stream())
        await crm_streams.ensure_streams(crm.js)
        async with as_user(server, "profile") as profile:
            (result,) = await profile.publisher.publish_batch(
                [OutMessage(subjects.profiles_changed(0), b"a change", "change-1")]
            )
            assert result.ok, result.error
        (sourced,) = await consume(crm, subjects.CRM, subjects.partition_durable("crm", 0), subjects.crm_in(0), 1)
        assert sourced.data == b"a change"
    assert violations(server) == []
