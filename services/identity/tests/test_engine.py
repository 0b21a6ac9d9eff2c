"""The engine's write-behind against a real nats-server and the memory store: a write that loses a
version race to another replica fails its batch, and the retry applies on the store's state."""

from __future__ import annotations

import pytest

from cdp_identity.domain.rules import MergeRules
from cdp_identity.engine import PERSONS, IdentityEngine
from cdp_kit.bus import Bus, identity_stream
from cdp_kit.storage import VersionConflict, open_store


@pytest.fixture
async def engine(nats_server):
    async with open_store("memory://") as store, Bus.connect(nats_server.url, name="engine-test") as bus:
        await bus.ensure_streams(identity_stream())
        engine = IdentityEngine(MergeRules.default(), store, bus.publisher, partitions=4, telemetry=bus.telemetry)
        await engine.start()
        yield engine


async def test_a_lost_write_race_fails_the_batch_and_the_retry_sees_the_other_write(engine):
    first, _ = await engine.resolve([("user_id", "u1"), ("email", "a@example.com")], request_id="r1", at=1_000)
    person = first.person
    # Another replica changes the same person behind this one's cache.
    record = await engine.store.get(PERSONS, person)
    changed = {**record.doc, "drops": [{"identifier": "x", "reason": "other-replica", "event_id": "e", "at": 1}]}
    await engine.store.put(PERSONS, person, changed, expected_version=record.version)

    with pytest.raises(VersionConflict):
        await engine.resolve([("user_id", "u1"), ("anonymous_id", "a1")], request_id="r2", at=2_000)
    retried, _ = await engine.resolve([("user_id", "u1"), ("anonymous_id", "a1")], request_id="r2", at=2_000)

    assert retried.person == person
    stored = (await engine.store.get(PERSONS, person)).doc
    assert {key for key, _at, _owner in stored["ids"]} == {"user_id:u1", "email:a@example.com", "anonymous_id:a1"}
    assert stored["drops"][0]["reason"] == "other-replica", "the other replica's write survives"


async def test_writes_queue_in_order_and_all_become_durable(engine):
    for i in range(50):
        await engine.resolve([("user_id", "u1"), ("anonymous_id", f"a{i}")], request_id=f"r{i}", at=1_000 + i)
    stored = (await engine.store.get(PERSONS, (await engine.canonical(engine.graph.person_of("user_id:u1"))))).doc
    assert len(stored["ids"]) == 51
