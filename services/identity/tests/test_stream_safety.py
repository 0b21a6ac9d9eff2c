"""One bad message among good ones, with a real nats-server and the service's own `setup`: the bad one
is dead-lettered alone with a reason naming the field, every good one is resolved and published on
`events.resolved`; and nothing identity logs on the way (bad input, a merge, a privacy deletion)
holds an identifier value."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from google.protobuf import struct_pb2

from cdp.events.v1 import events_pb2
from cdp.identity.v1 import identity_pb2, identity_pb2_grpc
from cdp.privacy.v1 import privacy_pb2
from cdp_identity.__main__ import setup
from cdp_identity.settings import IdentitySettings
from cdp_kit.bus import rawevents
from cdp_kit.bus.consumer import DLQ_DETAIL, DLQ_PART, DLQ_REASON, REPLAY_PREFIX
from cdp_kit.service import serving


def identify(message_id: str, **fields: str) -> events_pb2.Event:
    return events_pb2.Event(message_id=message_id, type=events_pb2.EVENT_TYPE_IDENTIFY, **fields)


def deeply_nested(message_id: str, depth: int) -> events_pb2.Event:
    """Decodes on its own, but not once identity wraps it into a ResolvedEventBatch (two levels more)."""
    event = identify(message_id, user_id="nested-user")
    level = event.properties
    for _ in range(depth):
        level = level.fields["a"].struct_value
    level.fields["leaf"].string_value = "x"
    return event


def far_future(message_id: str) -> events_pb2.Event:
    event = identify(message_id, user_id="time-traveller")
    event.timestamp.seconds = 2**62  # as milliseconds past the signed 64-bit range the store holds
    return event


def huge(message_id: str, max_payload: int) -> events_pb2.Event:
    """Fits the bus as it is, but not once resolved (with its person and identifiers around it)."""
    event = identify(message_id, user_id="big-spender")
    event.properties.update({"blob": "x" * (max_payload - 600)})
    return event


# name -> (the poison event for a server's max_payload, the dead letter's reason, the field it names)
POISON = {
    "nul_in_identifier": (lambda _: identify("poison", user_id="evil\x00user"), "invalid_identifier", "user_id"),
    "nesting_too_deep": (lambda _: deeply_nested("poison", 32), "invalid_event", "event"),
    "timestamp_out_of_range": (lambda _: far_future("poison"), "invalid_event", "timestamp"),
    "too_large": (lambda max_payload: huge("poison", max_payload), "too_large", "event"),
}


class Service:
    def __init__(self, settings: IdentitySettings) -> None:
        self._serving = serving(settings, setup)

    async def __aenter__(self) -> Service:
        self.runtime = await self._serving.__aenter__()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.runtime.grpc.port}")
        self.stub = identity_pb2_grpc.IdentityServiceStub(self.channel)
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.channel.close()
        await self._serving.__aexit__(None, None, None)

    @property
    def runner(self):
        return self.runtime.parts["runners"][0]

    async def person(self, kind: str, value: str) -> str:
        request = identity_pb2.LookupRequest(identifier=identity_pb2.Identifier(type=kind, value=value))
        return (await self.stub.Lookup(request)).person_id


@pytest.fixture
async def service(nats_server):
    settings = IdentitySettings(
        nats_url=nats_server.url,
        grpc_host="127.0.0.1",
        grpc_port=0,
        auth_mode="none",
        store_url="memory://",
        partitions=1,
        batch_size=50,
        shutdown_grace=1.0,
    )
    async with Service(settings) as running:
        yield running


async def until(condition, what: str, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def publish_batch(js, events: list[events_pb2.Event]) -> None:
    """Published back to back, so the partition's consumer fetches them as one batch."""
    for event in events:
        await js.publish("events.raw.0", event.SerializeToString(), headers={"Nats-Msg-Id": event.message_id})


async def resolved_event_ids(js) -> set[str]:
    subscription = await js.pull_subscribe("events.resolved.>", stream="EVENTS_RESOLVED")
    found: set[str] = set()
    try:
        while True:
            for msg in await subscription.fetch(100, timeout=0.5):
                batch = events_pb2.ResolvedEventBatch.FromString(msg.data)
                found.update(resolved.event.message_id for resolved in batch.events)
                await msg.ack()
    except TimeoutError:
        return found
    finally:
        await subscription.unsubscribe()


@pytest.mark.parametrize("poison", sorted(POISON))
async def test_one_poison_event_is_dead_lettered_alone_and_its_neighbours_are_resolved(service, nats_client, poison):
    js = nats_client.jetstream()
    dead_letters = await js.subscribe("dlq.EVENTS_RAW.identity-p0", stream="DLQ")
    make, reason, field = POISON[poison]
    event = make(nats_client.max_payload)
    good = [identify(f"good-{i}", user_id=f"user-{i}", anonymous_id=f"anon-{i}") for i in range(20)]
    await publish_batch(js, [*good[:10], event, *good[10:]])

    await until(lambda: service.runner.handled + service.runner.dead_lettered >= 21, "the batch handled")
    assert (service.runner.handled, service.runner.dead_lettered) == (20, 1)
    letter = await dead_letters.next_msg(timeout=5)
    assert letter.data == event.SerializeToString()
    assert letter.headers[DLQ_REASON] == reason
    assert letter.headers[DLQ_DETAIL].startswith(f"{field}: ")
    for i in range(20):
        assert await service.person("anonymous_id", f"anon-{i}") == await service.person("user_id", f"user-{i}")
    assert await resolved_event_ids(js) == {e.message_id for e in good}


@pytest.mark.parametrize("poison", sorted(set(POISON) - {"too_large"}))
async def test_one_poison_event_in_a_message_of_several_is_dead_lettered_alone(service, nats_client, poison):
    """The collector's form for a request's events on one partition (cdp_kit.bus.rawevents): the poison
    event is the message's 11th of 21. It alone is dead-lettered (its own bytes, the part it was, the
    reason and field); the other twenty are resolved and the message acknowledged. (`too_large` cannot
    ride in a message of several: the message would be over the server's limit, and the collector sends
    an event that large alone, the test above's form.)"""
    js = nats_client.jetstream()
    dead_letters = await js.subscribe("dlq.EVENTS_RAW.identity-p0", stream="DLQ")
    make, reason, field = POISON[poison]
    event = make(nats_client.max_payload)
    good = [identify(f"good-{i}", user_id=f"user-{i}", anonymous_id=f"anon-{i}") for i in range(20)]
    parts = [e.SerializeToString() for e in [*good[:10], event, *good[10:]]]
    await js.publish(
        "events.raw.0", rawevents.join(parts), headers={"Nats-Msg-Id": "eb_test", rawevents.EVENTS_HEADER: "21"}
    )

    await until(lambda: service.runner.handled + service.runner.dead_lettered >= 2, "the message handled")
    assert (service.runner.handled, service.runner.dead_lettered) == (1, 1)
    letter = await dead_letters.next_msg(timeout=5)
    assert letter.data == event.SerializeToString()
    assert letter.headers[DLQ_PART] == "10" and letter.headers[DLQ_REASON] == reason
    assert letter.headers[DLQ_DETAIL].startswith(f"{field}: ")
    for i in range(20):
        assert await service.person("anonymous_id", f"anon-{i}") == await service.person("user_id", f"user-{i}")
    assert await resolved_event_ids(js) == {e.message_id for e in good}


async def test_a_message_marked_as_several_that_is_not_a_batch_is_dead_lettered_whole(service, nats_client):
    js = nats_client.jetstream()
    dead_letters = await js.subscribe("dlq.EVENTS_RAW.identity-p0", stream="DLQ")
    good = identify("good-0", user_id="user-0")
    await js.publish("events.raw.0", b"\x12\x03abc", headers={"Nats-Msg-Id": "eb_bad", rawevents.EVENTS_HEADER: "1"})
    await publish_batch(js, [good])
    await until(lambda: service.runner.handled + service.runner.dead_lettered >= 2, "both handled")
    letter = await dead_letters.next_msg(timeout=5)
    assert letter.headers[DLQ_REASON] == "invalid_event" and DLQ_PART not in letter.headers
    assert letter.headers[DLQ_DETAIL].startswith("event: not a cdp.events.v1.EventBatch")
    assert await resolved_event_ids(js) == {"good-0"}


# Every identifier value the flow below sends; none may appear in a log record.
VALUES = [
    "ada@example.com",
    "ada-7731",
    "ada-laptop-anon",
    "evil\x00user",
    "mallory@example.com",
    "nobody@example.com",
    "ghost-device",
    "bob-1",
]


def logged_text(records: list[logging.LogRecord]) -> str:
    """Everything a log handler could write: the message, its arguments, extras and the exception."""
    lines = []
    for record in records:
        lines.append(record.getMessage())
        lines.extend(repr(value) for name, value in vars(record).items() if name not in ("msg", "args"))
        if record.exc_info and record.exc_info[1] is not None:
            lines.append(repr(record.exc_info[1]))
            lines.append(str(record.exc_info[1]))
    return "\n".join(lines).lower()


async def test_no_identifier_value_reaches_the_logs(service, nats_client, caplog):
    caplog.set_level(logging.DEBUG)
    js = nats_client.jetstream()
    anonymous = identify("ada-anon", anonymous_id="ada-laptop-anon")
    signup = identify("ada-signup", user_id="ada-7731", anonymous_id="ada-laptop-anon")
    signup.traits.CopyFrom(struct_pb2.Struct())
    signup.traits.update({"email": "ada@example.com"})
    poison = identify("poison", user_id="evil\x00user")
    await publish_batch(js, [identify("bob", user_id="bob-1"), anonymous, poison, signup])
    await until(lambda: service.runner.handled + service.runner.dead_lettered >= 4, "the batch handled")
    ada = await service.person("user_id", "ada-7731")
    assert await service.person("anonymous_id", "ada-laptop-anon") == ada  # merged

    # Bad and unknown input through the API.
    calls = [
        service.stub.Resolve(
            identity_pb2.ResolveRequest(identifiers=[identity_pb2.Identifier(type="user_id", value="evil\x00user")])
        ),
        service.stub.Resolve(
            identity_pb2.ResolveRequest(identifiers=[identity_pb2.Identifier(type="email", value="mallory@example")])
        ),
        service.stub.Lookup(
            identity_pb2.LookupRequest(identifier=identity_pb2.Identifier(type="email", value="nobody@example.com"))
        ),
        service.stub.SetQuarantine(
            identity_pb2.SetQuarantineRequest(
                identifier=identity_pb2.Identifier(type="device_id", value="ghost-device"), quarantined=True
            )
        ),
    ]
    codes = []
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call
        codes.append(error.value.code())
    assert codes == [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.NOT_FOUND,
    ]

    await js.publish(
        "privacy.deleted",
        privacy_pb2.PrivacyDeleted(request_id="req-1", person_id=ada).SerializeToString(),
        headers={"Nats-Msg-Id": "privacy:req-1"},
    )
    privacy = service.runtime.parts["privacy_runner"]
    await until(lambda: privacy.handled >= 1, "the privacy deletion")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await service.person("user_id", "ada-7731")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND

    text = logged_text(caplog.records)
    assert "dead-lettered" in text and "privacy deletion applied" in text  # the flow was logged at all
    assert [value for value in VALUES if value.lower() in text] == []


async def test_an_event_sent_back_from_the_dead_letters_is_named_by_its_own_id(service, nats_client):
    """`cdpctl dlq --replay` sends a dead letter back with an id of its own (`replay:<stream>:<consumer>:
    <seq>`). The merge it causes names the event as the collector did (`<source>:<messageId>`), which an
    operator can follow to the profile's timeline, not the replay's id."""
    js = nats_client.jetstream()
    first = identify("first", user_id="returning-user", source_id="web")
    second = identify("later", anonymous_id="returning-laptop", source_id="web")
    back = identify("signin", user_id="returning-user", anonymous_id="returning-laptop", source_id="web")
    await publish_batch(js, [first, second])
    await js.publish(
        "events.raw.0", back.SerializeToString(), headers={"Nats-Msg-Id": f"{REPLAY_PREFIX}EVENTS_RAW:identity-p0:7"}
    )
    await until(lambda: service.runner.handled >= 3, "the three events handled")
    person = await service.person("user_id", "returning-user")
    assert person == await service.person("anonymous_id", "returning-laptop")
    graph = await service.stub.GetGraph(identity_pb2.GetGraphRequest(person_id=person))
    assert [m.cause.event_id for m in graph.merges] == ["web:signin"]
