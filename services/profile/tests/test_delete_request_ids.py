"""A request id names one deletion. A support engineer reused one for another person: every service
acknowledged, the answer was the first person's stored result - success - and the second person was
still there. A repeat must name the same person (or one merged into it) and the same mode; anything else
is refused, naming the request id, and deletes nothing."""

from __future__ import annotations

import time

import pytest

from cdp.events.v1 import events_pb2
from cdp_kit.errors import AlreadyExists


def identify(message_id: str, person: str, user_id: str) -> events_pb2.ResolvedEvent:
    event = events_pb2.Event(message_id=message_id, source_id="t", type=events_pb2.EVENT_TYPE_IDENTIFY, user_id=user_id)
    event.traits.update({"plan": "pro"})
    event.timestamp.FromNanoseconds(int(time.time() * 1e9))
    event.received_at.CopyFrom(event.timestamp)
    return events_pb2.ResolvedEvent(event=event, person_id=person, identifiers=[f"user_id:{user_id}"])


@pytest.fixture
async def engine(running_engine, tmp_path):
    async with running_engine(
        f"sqlite:///{tmp_path / 'profile.db'}", hash_key="request-ids-test-key-0123456789", name="request-ids"
    ) as engine:
        await engine.feed(identify("e-a", "p-a", "u-a"), identify("e-b", "p-b", "u-b"))
        yield engine


async def test_a_request_id_used_for_one_person_is_refused_for_another_and_deletes_nothing(engine):
    first = await engine.delete("p-a", suppress=False, request_id="ticket-1")
    assert first["person_id"] == "p-a"
    with pytest.raises(AlreadyExists) as refused:
        await engine.delete("p-b", suppress=False, request_id="ticket-1")
    assert "ticket-1" in refused.value.message and "p-a" in refused.value.message
    assert "new request id" in refused.value.message
    assert (await engine.profile("p-b")).person_id == "p-b"  # still there: nothing was deleted


async def test_a_repeat_with_another_mode_is_refused_and_the_same_repeat_answers_the_same(engine):
    first = await engine.delete("p-a", suppress=False, request_id="ticket-2")
    with pytest.raises(AlreadyExists) as refused:
        await engine.delete("p-a", suppress=True, request_id="ticket-2")
    assert "without suppression" in refused.value.message
    assert await engine.delete("p-a", suppress=False, request_id="ticket-2") == first
