"""The dispatchers' consumers take CDP_ORCHESTRATION_ACK_WAIT, as the engine's does, and their breakers
CDP_ORCHESTRATION_BREAKER_TIMEOUTS / CDP_ORCHESTRATION_BREAKER_PROBE_SECONDS: the service started as it
runs (`__main__.setup`) on a real nats-server, the consumer's config read back from the server. And a
batch that takes longer than the ack wait is not redelivered to another replica while it is being sent."""

from __future__ import annotations

import asyncio

import pytest

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_kit.bus import (
    Bus,
    OutMessage,
    dead_letter_stream,
    events_resolved_stream,
    partition_for,
    profiles_stream,
    segments_stream,
    subjects,
)
from cdp_kit.service import serving
from cdp_kit.settings import SettingsError, load_settings
from cdp_kit.storage import open_store
from cdp_orchestration import streams
from cdp_orchestration.__main__ import setup
from cdp_orchestration.channels import Channel, Outcome
from cdp_orchestration.dispatch import BREAKER_AFTER, PROBE_EVERY, SENDS, dispatcher
from cdp_orchestration.settings import OrchestrationSettings
from cdp_testing.waiting import eventually

from .conftest import dispatched


async def test_the_ack_wait_and_breaker_settings_reach_the_dispatchers(nats_server, tmp_path):
    async with Bus.connect(nats_server.url, name="upstream") as bus:
        await bus.ensure_streams(events_resolved_stream(), segments_stream(), profiles_stream())
    settings = OrchestrationSettings(
        nats_url=nats_server.url,
        grpc_host="127.0.0.1",
        grpc_port=0,
        auth_mode="none",
        partitions=2,
        shutdown_grace=1.0,
        store_url=f"sqlite:///{tmp_path / 'orchestration.db'}",
        ack_wait=7.0,
        breaker_timeouts=2,
        breaker_probe_seconds=1.5,
    )
    async with serving(settings, setup) as runtime:
        js = runtime.parts["bus"].js

        async def consumer():  # the in-app dispatcher's (in-app needs no provider)
            try:
                return await js.consumer_info(subjects.ACTIONS, "orchestration-dispatch-inapp")
            except Exception:
                return None

        info = await eventually(consumer)
        assert info.config.ack_wait == 7.0
        handler = runtime.parts["dispatchers"]["inapp"].handler.__self__
        assert (handler.breakers.after, handler.breakers.probe_every) == (2, 1.5)


def test_the_breaker_settings_are_read_from_the_environment_and_checked():
    base = {"CDP_NATS_URL": "nats://127.0.0.1:4222", "CDP_AUTH_MODE": "none"}
    defaults = load_settings(OrchestrationSettings, base)
    assert (defaults.breaker_timeouts, defaults.breaker_probe_seconds) == (BREAKER_AFTER, PROBE_EVERY) == (3, 5.0)
    assert not [p for p in defaults.validate() if "BREAKER" in p or "ACK_WAIT" in p]
    given = load_settings(
        OrchestrationSettings,
        {**base, "CDP_ORCHESTRATION_BREAKER_TIMEOUTS": "4", "CDP_ORCHESTRATION_BREAKER_PROBE_SECONDS": "12.5"},
    )
    assert (given.breaker_timeouts, given.breaker_probe_seconds) == (4, 12.5)
    with pytest.raises(SettingsError) as refused:
        load_settings(
            OrchestrationSettings,
            {
                **base,
                "CDP_ORCHESTRATION_BREAKER_TIMEOUTS": "0",
                "CDP_ORCHESTRATION_BREAKER_PROBE_SECONDS": "0",
                "CDP_ORCHESTRATION_ACK_WAIT": "0",
            },
        )
    for name in ("BREAKER_TIMEOUTS=0", "BREAKER_PROBE_SECONDS=0", "ACK_WAIT=0"):
        assert f"CDP_ORCHESTRATION_{name} is invalid" in str(refused.value), name


class SlowInbox(Channel):
    """A provider that takes longer to answer than the consumer's ack wait."""

    name = "inapp"

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, action) -> Outcome:
        self.sent.append(action.action_id)
        await asyncio.sleep(2.5)
        return Outcome.accepted()


async def test_a_batch_slower_than_the_ack_wait_is_not_sent_again_by_another_replica(nats_server, tmp_path):
    async with (
        Bus.connect(nats_server.url, name="dispatch-replicas") as bus,
        open_store(f"sqlite:///{tmp_path}/d.db") as store,
    ):
        await streams.ensure_streams(bus.js)
        await bus.ensure_streams(dead_letter_stream())
        channel = SlowInbox()
        # Two replicas' dispatchers on one durable consumer, with an ack wait of 1 s.
        runners = [dispatcher(bus, store, channel, ack_wait=1.0) for _ in range(2)]
        await runners[0].provision()
        tasks = [asyncio.create_task(runner.run()) for runner in runners]
        try:
            message = pb.ActionMessage(action_id="act-slow", person_id="ada", channel="inapp", content={"body": "hi"})
            subject = subjects.actions("inapp", partition_for("ada", 2))
            [stored] = await bus.publisher.publish_batch([OutMessage(subject, message.SerializeToString(), "act-slow")])
            assert stored.ok

            async def recorded():
                found = await store.get(SENDS, "act-slow")
                return found is not None and found.doc["status"] == "accepted"

            await eventually(recorded, timeout=20)
            await eventually(lambda: dispatched(bus, "inapp"))  # acknowledged: nothing is delivered again
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        assert channel.sent == ["act-slow"]
