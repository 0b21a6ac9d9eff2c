"""`ResolvedEvent.identifiers` lists the event's identifiers the graph gives its person, and no other: an
identifier identity left out of the event's linking (a user id or an email another person holds) travels
in `dropped` only, so the profile that reads `identifiers` never lists it on a person it does not resolve
to. Against a real nats-server: what the engine publishes is read back from EVENTS_RESOLVED."""

from __future__ import annotations

import pytest
from google.protobuf import struct_pb2

from cdp.events.v1 import events_pb2
from cdp_identity.domain.rules import MergeRules
from cdp_identity.engine import IdentityEngine
from cdp_kit.bus import Bus, events_resolved_stream, identity_stream
from cdp_kit.storage import open_store


class Delivery:
    """An events.raw message as the consumer runner hands it over."""

    def __init__(self, event: events_pb2.Event, seq: int) -> None:
        self.data = event.SerializeToString()
        self.msg_id = f"web:{event.message_id}"
        self.headers = {"Nats-Msg-Id": self.msg_id}  # one event: not marked as several
        self.subject = "events.raw.0"
        self.stream_seq = seq

    def reject(self, reason: str, detail: str = "") -> None:
        raise AssertionError(f"rejected: {reason} {detail}")


class Platform:
    def __init__(self, engine: IdentityEngine, bus: Bus) -> None:
        self.engine = engine
        self.bus = bus
        self.seq = 0

    async def send(self, *events: events_pb2.Event) -> list[Delivery]:
        batch = []
        for event in events:
            self.seq += 1
            batch.append(Delivery(event, self.seq))
        await self.engine.handle(batch)
        return batch

    async def resolved(self) -> dict[str, events_pb2.ResolvedEvent]:
        """Every resolved event on EVENTS_RESOLVED by message id."""
        info = await self.bus.js.stream_info("EVENTS_RESOLVED")
        out = {}
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            message = await self.bus.js.get_msg("EVENTS_RESOLVED", seq)
            for item in events_pb2.ResolvedEventBatch.FromString(message.data).events:
                out[item.event.message_id] = item
        return out


@pytest.fixture
async def platform(nats_server):
    async with open_store("memory://") as store, Bus.connect(nats_server.url, name="identifiers-test") as bus:
        await bus.ensure_streams(identity_stream(), events_resolved_stream())
        engine = IdentityEngine(MergeRules.default(), store, bus.publisher, partitions=1, telemetry=bus.telemetry)
        await engine.start()
        yield Platform(engine, bus)


def event(message_id: str, kind: int = events_pb2.EVENT_TYPE_TRACK, **fields) -> events_pb2.Event:
    return events_pb2.Event(message_id=message_id, type=kind, source_id="web", event="Bought", **fields)


def traits(**values) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(values)
    return out


def dropped(item: events_pb2.ResolvedEvent) -> list[tuple[str, str, str]]:
    return [(d.type, d.value, d.reason) for d in item.dropped]


async def test_an_alias_of_a_known_user_id_lists_only_the_new_user_id(platform):
    await platform.send(
        event("old-1", user_id="old-r6"),
        event("alias-1", events_pb2.EVENT_TYPE_ALIAS, user_id="new-r6", previous_id="old-r6"),
        event("new-1", user_id="new-r6"),
    )
    resolved = await platform.resolved()
    old, alias, new = resolved["old-1"], resolved["alias-1"], resolved["new-1"]
    assert alias.person_id == new.person_id != old.person_id, "one user id per person: the old one stays apart"
    assert dropped(alias) == [("user_id", "old-r6", "limit:user_id")]
    assert list(alias.identifiers) == ["user_id:new-r6"], "the refused previous id is not the new person's"
    assert list(old.identifiers) == ["user_id:old-r6"]
    assert list(new.identifiers) == ["user_id:new-r6"]


async def test_an_email_another_user_holds_is_not_listed_on_the_second_user(platform):
    await platform.send(
        event("a-1", events_pb2.EVENT_TYPE_IDENTIFY, user_id="ada", traits=traits(email="shared@example.com")),
        event("b-1", events_pb2.EVENT_TYPE_IDENTIFY, user_id="bob", traits=traits(email="shared@example.com")),
    )
    resolved = await platform.resolved()
    ada, bob = resolved["a-1"], resolved["b-1"]
    assert ada.person_id != bob.person_id
    assert list(ada.identifiers) == ["user_id:ada", "email:shared@example.com"]
    assert dropped(bob) == [("email", "shared@example.com", "limit:user_id")]
    assert list(bob.identifiers) == ["user_id:bob"]


async def test_an_identifier_left_out_but_the_persons_own_stays_listed(platform):
    """A quarantined device links nobody, yet an event carrying only it resolves to its owner: it is the
    owner's, so it stays on their event; on another person's event it is left out."""
    device = events_pb2.Context(device=events_pb2.Device(id="tablet-1"))
    await platform.send(event("mum-1", user_id="mum", context=device))
    assert await platform.engine.set_quarantine("device_id", "tablet-1", True)
    await platform.send(event("tablet-only", context=device), event("dad-1", user_id="dad", context=device))
    resolved = await platform.resolved()
    mum, tablet, dad = resolved["mum-1"], resolved["tablet-only"], resolved["dad-1"]
    assert tablet.person_id == mum.person_id != dad.person_id
    assert dropped(tablet) == [("device_id", "tablet-1", "quarantined")]
    assert list(tablet.identifiers) == ["device_id:tablet-1"]
    assert dropped(dad) == [("device_id", "tablet-1", "quarantined")]
    assert list(dad.identifiers) == ["user_id:dad"]


async def test_a_batch_resolved_again_read_only_lists_the_same_identifiers(platform):
    """A redelivered batch (its write landed, its acknowledgement lost) is resolved read-only, without
    drops: what it lists is still what the graph gives the person."""
    batch = await platform.send(
        event("old-1", user_id="old-r6"),
        event("alias-1", events_pb2.EVENT_TYPE_ALIAS, user_id="new-r6", previous_id="old-r6"),
    )
    first = await platform.resolved()
    published: list[events_pb2.ResolvedEvent] = []
    real = platform.engine.publisher

    class Tap:  # sees what the replay publishes (JetStream drops it as a repeat of the first)
        async def publish_batch(self, messages):
            for message in messages:
                published.extend(events_pb2.ResolvedEventBatch.FromString(message.payload).events)
            return await real.publish_batch(messages)

    platform.engine.publisher = Tap()
    await platform.engine.handle(batch)
    again = {item.event.message_id: item for item in published}
    assert again["alias-1"].person_id == first["alias-1"].person_id
    assert list(again["alias-1"].identifiers) == ["user_id:new-r6"]
    assert list(again["old-1"].identifiers) == ["user_id:old-r6"]
