"""A service sets up its streams and consumers at start through JetStream API requests. nats-py gives each
request 5 s; a machine that stalls longer (CI's 4 test workers on 2 cores; an audit froze nats-server for
7 s) failed the start with a bare TimeoutError. Setup is idempotent: a request not answered in time is
asked again, for a bounded time, with a line naming the stream or consumer - and a server that refuses
the request, or has gone for good, is still an error that says so at once."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from cdp_kit.bus import Bus, ConsumerSpec, StreamSpec, partition_count, subjects
from cdp_kit.bus.setup import SetupUnanswered, answered, consumer_exists
from cdp_kit.errors import Unavailable

# Longer than nats-py's 5 s request timeout: what the audit forced.
STALL_SECONDS = 7.0


def _stream() -> StreamSpec:
    return StreamSpec(name=subjects.EVENTS_RAW, subjects=subjects.STREAM_SUBJECTS[subjects.EVENTS_RAW])


async def _handler(deliveries) -> None:  # never called: the consumer is only provisioned
    return None


async def test_setup_survives_a_server_stalled_longer_than_a_request_timeout(nats_server, caplog):
    caplog.set_level(logging.INFO, logger="cdp.bus")
    async with Bus.connect(nats_server.url, name="test", connect_timeout=10) as bus:
        runner = bus.consumer(
            ConsumerSpec(stream=subjects.EVENTS_RAW, durable="test-p0", filter_subjects=(subjects.events_raw(0),)),
            _handler,
        )

        async def start() -> None:  # what a service's setup does, in its order
            await bus.ensure_streams(_stream())
            await partition_count.check(bus.js, 1, [subjects.EVENTS_RAW], record=True)
            await runner.provision()

        with nats_server.paused():
            starting = asyncio.create_task(start())
            await asyncio.sleep(STALL_SECONDS)
        await starting  # raised nats.errors.TimeoutError before

        info = await bus.js.consumer_info(subjects.EVENTS_RAW, "test-p0")
        assert info.config.filter_subject == subjects.events_raw(0)
        assert partition_count.recorded((await bus.js.stream_info(subjects.EVENTS_RAW)).config) == 1
    asked_again = [r.getMessage() for r in caplog.records if "asking again" in r.getMessage()]
    assert asked_again and all(subjects.EVENTS_RAW in line for line in asked_again), asked_again


async def test_a_request_the_server_refuses_is_an_error_at_once_naming_the_refusal(secured, caplog):
    # The collector's NATS user may not look up profile's stream: nats-server refuses the request (a
    # permissions violation) and never answers it. Asking again would not help: not asked again.
    from cdp_kit.natsauth import NatsClientSettings

    caplog.set_level(logging.INFO, logger="cdp.bus")
    security = NatsClientSettings(credentials_file=secured.secrets / "collector.json")
    async with Bus.connect(secured.url, name="collector", connect_timeout=10, security=security) as bus:
        with pytest.raises(SetupUnanswered) as refused:
            await answered(bus.js, "stream PROFILES", lambda: bus.js.stream_info(subjects.PROFILES))
    assert "NATS refused a request setting up stream PROFILES" in str(refused.value)
    assert "permissions violation" in str(refused.value).lower()
    assert isinstance(refused.value, Unavailable)  # the service stops with this line (run_main)
    assert not [r for r in caplog.records if "asking again" in r.getMessage()]


async def test_a_server_silent_for_longer_than_the_patience_is_an_error_naming_the_stream(nats_server):
    async with Bus.connect(nats_server.url, name="test", connect_timeout=10) as bus:
        with nats_server.paused(), pytest.raises(SetupUnanswered) as silent:
            # A patience shorter than one request's timeout: given up after the first unanswered request.
            await answered(bus.js, "stream EVENTS_RAW", lambda: bus.js.stream_info(subjects.EVENTS_RAW), patience=0.1)
    assert "JetStream did not answer while setting up stream EVENTS_RAW" in str(silent.value)
    assert "asked 1 times" in str(silent.value)


async def test_whether_a_consumer_exists_is_told_after_a_server_stall(nats_server, caplog):
    # Profile looks up the consumer an older release drained merges with, creating none; the look-up, asked
    # while nats-server stalls, was a bare TimeoutError that stopped the start.
    caplog.set_level(logging.INFO, logger="cdp.bus")
    async with Bus.connect(nats_server.url, name="test", connect_timeout=10) as bus:
        await bus.ensure_streams(_stream())
        await bus.js.add_consumer(subjects.EVENTS_RAW, durable_name="old-durable")
        with nats_server.paused():
            found = asyncio.create_task(consumer_exists(bus.js, subjects.EVENTS_RAW, "old-durable"))
            deadline = time.monotonic() + 60
            while "asking again" not in caplog.text and not found.done():  # stalled past one request's 5 s
                assert time.monotonic() < deadline, "the look-up was neither answered nor asked again"
                await asyncio.sleep(0.1)
        assert await asyncio.wait_for(found, 60) is True
        assert "consumer old-durable of stream EVENTS_RAW" in caplog.text
        assert await consumer_exists(bus.js, subjects.EVENTS_RAW, "never-made") is False
