"""A platform keeps the partition count its streams were made with, against a real nats-server: the
provisioner records it in every partitioned stream and refuses another; a partitioned engine checks it
when it starts (recording it first on a bare server); a stream made before the record keeps the count
what it holds shows."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from nats.js import api
from nats.js.errors import NotFoundError

from cdp_kit.bus import Bus, ensure_stream, events_raw_stream, subjects
from cdp_kit.bus.partition_count import KEY, PARTITIONED, PartitionsMismatch, recorded
from cdp_kit.engine import Effects, EngineSpec, PartitionedEngine
from cdp_kit.errors import Unavailable
from cdp_kit.natsauth import (
    PROVISIONER,
    NatsClientSettings,
)
from cdp_kit.provision import provision, run
from cdp_kit.storage import MemoryStore
from cdp_kit.streamtable import STREAMS


async def counts(js) -> dict[str, int | None]:
    """The count each stream records, of those that exist."""
    found = {}
    for entry in STREAMS:
        try:
            found[entry.name] = recorded((await js.stream_info(entry.name)).config)
        except NotFoundError:
            pass
    return found


async def test_the_provisioner_records_the_count_in_every_partitioned_stream_and_refuses_another(nats_client):
    js = nats_client.jetstream()
    await provision(js, {"CDP_PARTITIONS": "2"})
    made = await counts(js)
    assert {name for name, count in made.items() if count == 2} == set(PARTITIONED)
    assert made[subjects.PRIVACY] is None and made[subjects.DLQ] is None  # not partitioned
    assert await provision(js, {"CDP_PARTITIONS": "2"}) == []  # as it should be: nothing to do

    await js.delete_stream(subjects.CRM)  # a stream to make: a refusal makes nothing
    with pytest.raises(PartitionsMismatch) as refused:
        await provision(js, {"CDP_PARTITIONS": "8"})
    message = str(refused.value)
    assert "was made with CDP_PARTITIONS=2" in message and "the provisioner has CDP_PARTITIONS=8" in message
    assert "global.partitions" in message and "new home" in message  # the way out
    assert await counts(js) == {name: count for name, count in made.items() if name != subjects.CRM}


async def test_an_update_keeps_the_recorded_count(nats_client):
    js = nats_client.jetstream()
    await provision(js, {"CDP_PARTITIONS": "2"})
    # A service on a bare server bringing its stream to a longer retention, and the provisioner doing it.
    longer = await ensure_stream(js, events_raw_stream(max_age=30 * 86_400))
    assert round(longer.config.max_age) == 30 * 86_400 and recorded(longer.config) == 2
    assert await provision(js, {"CDP_PARTITIONS": "2", "CDP_EVENTS_RETENTION_DAYS": "3"})
    info = await js.stream_info(subjects.EVENTS_RAW)
    assert round(info.config.max_age) == 3 * 86_400 and recorded(info.config) == 2


async def legacy_events_raw(js, *, consumers: range = range(0), messages: tuple[int, ...] = ()) -> None:
    """EVENTS_RAW as cdp made it before it recorded the count: no metadata, identity's partition consumers
    and stored events."""
    info = await ensure_stream(js, events_raw_stream())
    assert recorded(info.config) is None
    for p in consumers:
        durable = subjects.partition_durable("identity", p)
        config = api.ConsumerConfig(durable_name=durable, filter_subject=subjects.events_raw(p))
        await js.add_consumer(subjects.EVENTS_RAW, config)
    for p in messages:
        await js.publish(subjects.events_raw(p), b"{}")


async def test_a_stream_made_before_the_record_keeps_the_count_its_consumers_show(nats_client):
    js = nats_client.jetstream()
    await legacy_events_raw(js, consumers=range(8))
    with pytest.raises(PartitionsMismatch) as refused:
        await provision(js, {"CDP_PARTITIONS": "2"})  # the new default of a new home, on an old platform
    message = str(refused.value)
    assert "stream EVENTS_RAW records no partition count" in message
    assert "made with 8 partitions" in message and "identity-p0 … identity-p7" in message
    assert "the provisioner has CDP_PARTITIONS=2" in message and "CDP_PARTITIONS=8" in message
    assert recorded((await js.stream_info(subjects.EVENTS_RAW)).config) is None
    with pytest.raises(PartitionsMismatch, match="made with 8 partitions"):
        await provision(js, {"CDP_PARTITIONS": "16"})  # more is another split too

    await provision(js, {"CDP_PARTITIONS": "8"})
    assert set((await counts(js)).values()) == {8, None}


async def test_a_stream_made_before_the_record_holding_a_higher_partition_refuses_fewer(nats_client):
    js = nats_client.jetstream()
    await legacy_events_raw(js, messages=(0, 5))
    with pytest.raises(PartitionsMismatch, match=r"at least 6 partitions \(messages on events.raw.5\)"):
        await provision(js, {"CDP_PARTITIONS": "2"})
    await provision(js, {"CDP_PARTITIONS": "8"})  # at least 6: 8 may be what it was made with
    assert recorded((await js.stream_info(subjects.EVENTS_RAW)).config) == 8


async def test_an_empty_stream_made_before_the_record_takes_the_count(nats_client):
    js = nats_client.jetstream()
    await legacy_events_raw(js)
    await provision(js, {"CDP_PARTITIONS": "2"})
    assert recorded((await js.stream_info(subjects.EVENTS_RAW)).config) == 2


async def test_a_count_that_is_not_one_is_refused_by_name(nats_client):
    with pytest.raises(ValueError, match=r"CDP_PARTITIONS='two' is invalid: must be a whole number"):
        await provision(nats_client.jetstream(), {"CDP_PARTITIONS": "two"})


# --- a partitioned engine at start --------------------------------------------------------------------


class Nothing:
    """An engine's logic that applies nothing: only its start matters here."""

    def decode(self, delivery):
        return delivery.data

    async def apply(self, partition, items):
        return Effects([], [])

    async def recover(self, partition):
        pass


def identity_engine(bus: Bus, partitions: int) -> PartitionedEngine:
    spec = EngineSpec(
        service="identity",
        stream=subjects.EVENTS_RAW,
        subject_prefix=subjects.EVENTS_RAW_PREFIX,
        partitions=partitions,
        fetch_timeout=0.1,
    )
    return PartitionedEngine(Nothing(), spec, bus=bus, store=MemoryStore())


async def test_on_a_bare_server_the_first_engine_records_its_count_and_one_with_another_stops(nats_server):
    async with Bus.connect(nats_server.url, name="identity") as bus:
        await bus.ensure_read_streams(events_raw_stream())  # made by whoever started first, without a count
        first = identity_engine(bus, 2)
        ownership = await first.start()
        assert recorded((await bus.js.stream_info(subjects.EVENTS_RAW)).config) == 2
        assert sorted(first.owned()) == [0, 1]
        await ownership.stop()
        await first.close()

        other = identity_engine(bus, 4)
        with pytest.raises(PartitionsMismatch) as refused:
            await other.start()
        assert isinstance(refused.value, Unavailable)  # run_main: one log line, exit 1
        message = str(refused.value)
        assert "stream EVENTS_RAW was made with CDP_PARTITIONS=2" in message
        assert "this service has CDP_PARTITIONS=4" in message
        assert not other.owned()
        # Taking a partition directly (profile: its ownership calls start_partition) is refused too.
        with pytest.raises(PartitionsMismatch):
            await identity_engine(bus, 4).start_partition(0)


def login(server, name: str) -> NatsClientSettings:
    return NatsClientSettings(credentials_file=server.secrets / f"{name}.json")


async def test_under_its_own_user_an_engine_with_another_count_stops(secured):
    await run(secured.url, environ={"CDP_PARTITIONS": "2"}, security=login(secured, PROVISIONER))
    async with Bus.connect(secured.url, name="identity", security=login(secured, "identity")) as bus:
        with pytest.raises(PartitionsMismatch, match=r"made with CDP_PARTITIONS=2.*has CDP_PARTITIONS=8"):
            await identity_engine(bus, 8).start()
        engine = identity_engine(bus, 2)
        ownership = await engine.start()
        assert sorted(engine.owned()) == [0, 1]
        await ownership.stop()
        await engine.close()
    assert " Violation " not in secured.log_path.read_text()


async def test_under_its_own_user_a_stream_without_a_record_waits_for_the_provisioner(secured):
    operator = secured.operator_url
    async with Bus.connect(operator, name="cdpctl", security=NatsClientSettings()) as old:
        await legacy_events_raw(old.js, consumers=range(2))  # an old platform's stream, made for 2
    async with Bus.connect(secured.url, name="identity", security=login(secured, "identity")) as bus:
        with pytest.raises(PartitionsMismatch, match=r"EVENTS_RAW records no partition count.*provisioner"):
            await identity_engine(bus, 2).start()
    # With CDP_NATS_PROVISION_WAIT (the chart's Job runs beside the services) it waits for the record; the
    # provisioner's own user reads the consumers' names, and records what they show.
    waiting = dataclasses.replace(login(secured, "identity"), provision_wait=30.0)
    async with Bus.connect(secured.url, name="identity", security=waiting) as bus:
        engine = identity_engine(bus, 2)
        checked = asyncio.create_task(engine.check_partitions())
        await asyncio.sleep(0.5)
        assert not checked.done()
        await run(secured.url, environ={"CDP_PARTITIONS": "2"}, security=login(secured, PROVISIONER))
        await asyncio.wait_for(checked, 10)
        info = await bus.js.stream_info(subjects.EVENTS_RAW)
        assert info.config.metadata[KEY] == "2"
    assert " Violation " not in secured.log_path.read_text()


async def test_an_engine_on_a_stream_not_made_yet_starts(nats_server):
    async with Bus.connect(nats_server.url, name="identity") as bus:
        await identity_engine(bus, 2).check_partitions()  # EVENTS_RAW does not exist: nothing to check
        with pytest.raises(NotFoundError):
            await bus.js.stream_info(subjects.EVENTS_RAW)
