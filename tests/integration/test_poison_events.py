"""One bad event must cost only itself: collector → identity → profile with a real nats-server.

The promise under test, whichever door a poison event comes in by:
- at the edge it is refused on its own, with an error naming its field path, and the rest of its batch
  is stored;
- behind the edge (something published onto `events.raw.<p>` that the collector would not have
  accepted) it becomes exactly one dead letter naming the problem, and every good event of its batch and
  partition reaches its profile exactly once;
- nothing the collector accepted is dead-lettered later: an event is refused at the door or stored.

Each test collects every broken promise before failing, so one run tells the whole story.
"""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest
from google.protobuf import json_format

from cdp.collector.v1 import collector_pb2
from cdp.events.v1 import events_pb2
from cdp_collector.domain import MAX_DEPTH, parse_request
from cdp_collector.settings import CollectorSettings
from cdp_kit.bus import Bus, OutMessage, dead_letter_stream, ensure_stream, events_raw_stream, partition_for

from .conftest import PARTITIONS, Chain, nested, running_chain

BYSTANDERS = 100
POISON_AT = 50  # the poison's index in the batch: bystanders before and after it
# The ordered consumers retry a failing batch in place for about 21 s before dead-lettering it: wait a
# little longer for the outcome to be final, so a batch lost to one poison shows as dead letters and
# missing bystanders rather than as a profile read from memory before its write failed.
SETTLE = 30.0


def deepest_accepted() -> int:
    """The deepest nesting the collector accepts (the event object is level 1), from its settings if
    they carry one, else from its domain constant."""
    return getattr(CollectorSettings, "max_depth", None) or MAX_DEPTH


def bystander(n: int) -> dict:
    """An innocent user's only event: a track or an identify."""
    if n % 2:
        return {
            "type": "identify",
            "messageId": f"by-{n}",
            "userId": f"bystander-{n}",
            "traits": {"email": f"bystander{n}@example.com", "plan": "free"},
        }
    return {
        "type": "track",
        "event": "Viewed",
        "messageId": f"by-{n}",
        "userId": f"bystander-{n}",
        "properties": {"n": n},
    }


def batch_with(poison: dict) -> list[dict]:
    events = [bystander(n) for n in range(BYSTANDERS)]
    events.insert(POISON_AT, poison)
    return events


# A poison event per shape, and the field path its refusal must name. "Properties nested 32 deep": 32
# levels inside properties, so the event nests 34 (event 1, properties 2), beyond what a consumer can
# decode once identity has wrapped the event in a ResolvedEventBatch.
DEEP = nested(33)
EDGE_POISONS = {
    "nul-in-userId": (
        {"type": "track", "event": "Poisoned", "messageId": "poison-1", "userId": "poison\u0000user"},
        f"batch[{POISON_AT}].userId",
    ),
    "nul-in-traits.email": (
        {
            "type": "identify",
            "messageId": "poison-1",
            "userId": "poison-user",
            "traits": {"email": "poison\u0000@example.com"},
        },
        f"batch[{POISON_AT}].traits.email",
    ),
    "nul-in-context.device.id": (
        {
            "type": "track",
            "event": "Poisoned",
            "messageId": "poison-1",
            "userId": "poison-user",
            "context": {"device": {"id": "device\u0000poison"}},
        },
        f"batch[{POISON_AT}].context.device.id",
    ),
    "nul-in-messageId": (
        {"type": "track", "event": "Poisoned", "messageId": "poison\u00001", "userId": "poison-user"},
        f"batch[{POISON_AT}].messageId",
    ),
    "properties-32-deep": (
        {
            "type": "track",
            "event": "Poisoned",
            "messageId": "poison-1",
            "userId": "poison-user",
            "properties": DEEP,
        },
        f"batch[{POISON_AT}].properties",
    ),
}


async def settle(chain: Chain, problems: list[str]) -> None:
    """Until identity and profile have handled every message for good: acknowledged or dead-lettered."""
    outstanding = await chain.settled(timeout=SETTLE)
    if outstanding:
        problems.append(f"the pipeline had not settled after {SETTLE:.0f} s: {outstanding}")


def describe(letters: list) -> str:
    return "\n    ".join(str(letter) for letter in letters[:5])


async def bystanders_and_dead_letters(chain: Chain, problems: list[str], *, poison_user: str | None) -> None:
    """Every bystander on its profile, no dead letter; and a poison the edge let through stored too."""
    await settle(chain, problems)
    users = [f"bystander-{n}" for n in range(BYSTANDERS)]
    arrived = await chain.profiles_when(users, lambda p: p.event_count >= 1, timeout=5.0)
    missing = [u for u in users if u not in arrived]
    if missing:
        problems.append(f"{len(missing)} of {BYSTANDERS} bystanders never reached their profile: {missing[:8]}…")
    if poison_user is not None:
        stored = await chain.profiles_when([poison_user], lambda p: p.event_count >= 1, timeout=1.0)
        if not stored:
            problems.append("the edge accepted the poison event but it never reached its profile")
    letters = await chain.dead_letters()
    if letters:
        problems.append(f"{len(letters)} dead letters (expected none); first:\n    {describe(letters)}")


@pytest.mark.parametrize("shape", EDGE_POISONS)
async def test_a_poison_event_through_the_edge_costs_only_itself(chain, shape):
    poison, field = EDGE_POISONS[shape]
    problems: list[str] = []
    status, answer = await chain.post(*batch_with(poison))
    rejected = answer.get("rejected") or []
    accepted_poison = not any(r.get("index") == POISON_AT for r in rejected)
    if accepted_poison:
        problems.append(f"the collector accepted the poison event ({status} {answer})")
    else:
        refusal = next(r for r in rejected if r.get("index") == POISON_AT)
        if len(rejected) > 1:
            problems.append(f"bystanders were refused too: {[r for r in rejected if r is not refusal][:3]}")
        if not refusal["field"].startswith(field):
            problems.append(f"the refusal names {refusal['field']!r}, not {field!r}: {refusal}")
        if status not in (200, 207, 400) or answer.get("accepted") != BYSTANDERS:
            problems.append(f"the bystanders were not all accepted with the refusal: {status} {answer}")
    # Every poison shape but the 32-deep one is invalid anywhere: accepted, it must at least not cost
    # the bystanders anything; the deep one, if accepted, must be stored.
    poison_user = poison.get("userId") if accepted_poison and shape == "properties-32-deep" else None
    await bystanders_and_dead_letters(chain, problems, poison_user=poison_user)
    assert not problems, f"poison {shape}:\n  " + "\n  ".join(problems)


async def test_a_poison_event_through_grpc_costs_only_itself(chain):
    """CollectorService.Collect: properties nested 32 deep (the event 34 levels) among 100 bystanders."""
    events = []
    for n in range(BYSTANDERS):
        event = events_pb2.Event(
            message_id=f"by-{n}", type=events_pb2.EVENT_TYPE_TRACK, event="Viewed", user_id=f"bystander-{n}"
        )
        event.properties.update({"n": n})
        events.append(event)
    poison = events_pb2.Event(
        message_id="poison-1", type=events_pb2.EVENT_TYPE_TRACK, event="Poisoned", user_id="poison-user"
    )
    poison.properties.update(DEEP)
    events.insert(POISON_AT, poison)
    problems: list[str] = []
    response = await chain.collect(*events)
    result = response.results[POISON_AT]
    if result.status != collector_pb2.EVENT_STATUS_REJECTED:
        problems.append(f"Collect accepted the poison event (status {result.status}, {result.error})")
    elif not result.error.field.startswith(f"events[{POISON_AT}].properties"):
        problems.append(f"the refusal names {result.error.field!r}, not events[{POISON_AT}].properties…")
    if response.accepted != BYSTANDERS:
        problems.append(f"{response.accepted} accepted, not the {BYSTANDERS} bystanders")
    poison_user = "poison-user" if result.status == collector_pb2.EVENT_STATUS_ACCEPTED else None
    await bystanders_and_dead_letters(chain, problems, poison_user=poison_user)
    assert not problems, "poison over gRPC:\n  " + "\n  ".join(problems)


# --- behind the edge ----------------------------------------------------------------------------------

GOOD = 60
RAW_PARTITION = 0


def users_on(partition: int, count: int, prefix: str) -> list[str]:
    """User ids whose events all land on events.raw.<partition>."""
    out, n = [], 0
    while len(out) < count:
        candidate = f"{prefix}-{n}"
        if partition_for(candidate, PARTITIONS) == partition:
            out.append(candidate)
        n += 1
    return out


def collected(*items: dict) -> list[events_pb2.Event]:
    """Events exactly as the collector makes them from Segment JSON (server times, source id)."""
    body = orjson.dumps({"batch": list(items)})
    parsed = parse_request("batch", body, received_at=datetime.now(UTC), source_id="web")
    assert all(parsed.events), parsed.errors
    return list(parsed.events)  # type: ignore[arg-type]


def raw_message(event: events_pb2.Event, payload: bytes | None = None) -> OutMessage:
    """The collector's envelope (ingest.py): one message per event on events.raw.<p(user)>, deduplicated
    by <source>:<messageId>."""
    key = event.user_id or event.anonymous_id
    return OutMessage(
        subject=f"events.raw.{partition_for(key, PARTITIONS) if key else RAW_PARTITION}",
        payload=event.SerializeToString() if payload is None else payload,
        msg_id=f"{event.source_id}:{event.message_id}",
    )


def poisoned(shape: str, poison_user: str) -> tuple[OutMessage, tuple[str, ...]]:
    """A message the collector should never have stored, on RAW_PARTITION, and words its dead letter's
    reason or detail must name the problem by (any of them)."""
    (event,) = collected(
        {"type": "identify", "messageId": "poison-1", "userId": poison_user, "traits": {"plan": "free"}}
    )
    if shape == "undecodable":
        message = raw_message(event, payload=b"\x0a\xff\xff\xff\xff\x0f not an event")
        return message, ("invalid_event", "decode", "not a cdp.events.v1.Event")
    if shape == "nul-in-user_id":
        event.user_id = poison_user + "\x00"
        message = raw_message(event)
        message.subject = f"events.raw.{RAW_PARTITION}"
        return message, ("user_id", "NUL")
    if shape == "nul-in-traits.email":
        event.traits.update({"email": "poison\x00@example.com"})
        return raw_message(event), ("email", "NUL")
    if shape == "properties-32-deep":
        event.properties.update(DEEP)
        return raw_message(event), ("depth", "deep", "nest", "recursion", "decode")
    raise AssertionError(shape)


@pytest.mark.parametrize("shape", ["undecodable", "nul-in-user_id", "nul-in-traits.email", "properties-32-deep"])
async def test_a_poison_message_behind_the_edge_is_one_dead_letter(nats_server, tmp_path, shape):
    good_users = users_on(RAW_PARTITION, GOOD, "good")
    (poison_user,) = users_on(RAW_PARTITION, 1, "poison")
    good = collected(
        *(
            {"type": "track", "event": "Viewed", "messageId": f"g-{n}", "userId": user, "properties": {"n": n}}
            for n, user in enumerate(good_users)
        )
    )
    poison, words = poisoned(shape, poison_user)
    messages = [raw_message(e) for e in good]
    messages.insert(GOOD // 2, poison)
    assert {m.subject for m in messages} == {f"events.raw.{RAW_PARTITION}"}
    # Published before identity starts, so its first fetch takes them all as one batch.
    async with Bus.connect(nats_server.url, name="test-producer") as bus:
        await ensure_stream(bus.js, events_raw_stream())
        await ensure_stream(bus.js, dead_letter_stream())
        results = await bus.publisher.publish_batch(messages)
        assert all(r.ok for r in results)

    async with running_chain(nats_server.url, tmp_path) as chain:
        problems: list[str] = []
        await settle(chain, problems)
        arrived = await chain.profiles_when(good_users, lambda p: p.event_count >= 1, timeout=5.0)
        missing = [u for u in good_users if u not in arrived]
        if missing:
            problems.append(f"{len(missing)} of {GOOD} good events never reached their profile: {missing[:8]}…")
        for user, profile in arrived.items():
            events = await chain.timeline(profile.person_id)
            if profile.event_count != 1 or len(events) != 1:
                problems.append(f"{user}: {profile.event_count} events counted, {len(events)} on the timeline")
                break
        letters = await chain.dead_letters()
        if len(letters) != 1:
            problems.append(f"{len(letters)} dead letters, expected exactly one; first:\n    {describe(letters)}")
        elif not any(word.lower() in f"{letters[0].reason} {letters[0].detail}".lower() for word in words):
            problems.append(f"the dead letter does not name the problem (any of {words}): {letters[0]}")
        elif problems:
            problems.append(f"the one dead letter: {letters[0]}")
        assert not problems, f"poison {shape} on events.raw.{RAW_PARTITION}:\n  " + "\n  ".join(problems)


# --- the deepest accepted event -----------------------------------------------------------------------


async def test_the_deepest_event_the_edge_accepts_is_stored_whole(chain):
    """Accepted means stored: an event nested as deep as the collector allows reaches the profile with its
    properties intact, over HTTP and over gRPC, and one level deeper is refused at the door by path."""
    limit = deepest_accepted()
    deepest = nested(limit - 1)  # under properties, itself level 2
    problems: list[str] = []

    status, answer = await chain.post(
        {"type": "track", "event": "Deep", "messageId": "deep-http", "userId": "deep-http", "properties": deepest}
    )
    if status != 200:
        problems.append(f"HTTP refused an event {limit} levels deep: {status} {answer}")
    grpc_event = events_pb2.Event(
        message_id="deep-grpc", type=events_pb2.EVENT_TYPE_TRACK, event="Deep", user_id="deep-grpc"
    )
    grpc_event.properties.update(deepest)
    result = (await chain.collect(grpc_event)).results[0]
    if result.status != collector_pb2.EVENT_STATUS_ACCEPTED:
        problems.append(f"Collect refused an event {limit} levels deep: {result.error}")

    await settle(chain, problems)
    for user in ("deep-http", "deep-grpc"):
        found = await chain.profiles_when([user], lambda p: p.event_count >= 1, timeout=5.0)
        if not found:
            problems.append(f"{user}: the accepted {limit}-deep event never reached its profile")
            continue
        (event,) = await chain.timeline(found[user].person_id)
        if json_format.MessageToDict(event.properties) != deepest:
            problems.append(f"{user}: the properties on the timeline are not the ones sent")

    status, answer = await chain.post(
        {
            "type": "track",
            "event": "Deeper",
            "messageId": "deeper",
            "userId": "deeper",
            "properties": nested(limit),
        }
    )
    fields = [r.get("field", "") for r in answer.get("rejected") or []]
    if status != 400 or not fields or not fields[0].startswith("batch[0].properties.a"):
        problems.append(f"an event {limit + 1} levels deep was not refused by path: {status} {answer}")

    letters = await chain.dead_letters()
    if letters:
        problems.append(f"{len(letters)} dead letters (expected none); first: {letters[0]}")
    assert not problems, f"deepest accepted nesting ({limit} levels):\n  " + "\n  ".join(problems)
