"""Instances and per-person arbiter state as plain JSON-able dicts, for the service to store and read back.

`instance_record(instance)` / `instance_from_record(record)` and `person_record(state)` /
`person_from_record(record)` round-trip exactly (a property the tests check): what the service stores is
what the domain gets back after a restart. The records hold only str, int, float, bool, None, lists and
dicts with str keys, so orjson, BSON and SQLite JSON all take them as they are. Each carries a format
number (`"v"`) so a later layout can read an older one.

User data the records carry (an instance's entry properties, a person's profile fields) may hold any key
an event sent, and a document store refuses some as field names (MongoDB reserves a leading '$', which
Mixpanel-style properties such as "$browser" or a trait {"$set": ...} have): such data is kept as JSON text
(`user_data`), read back by `user_data_from`. Before, one such key failed the write of the person's batch:
the partition was held through redeliveries and the event dead-lettered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from cdp_orchestration.domain.arbiter import Held, PersonState, ProposedAction, Sent
from cdp_orchestration.domain.instance import Instance, Status, Step, Timer

FORMAT = 1


def _reserved_key_in(value: Any) -> bool:
    """Whether `value` holds, at any depth, an object key a document store refuses as a field name."""
    kind = type(value)
    if kind is dict:
        return any(
            type(key) is not str or key[:1] == "$" or "\x00" in key or _reserved_key_in(item)
            for key, item in value.items()
        )
    if kind is list:
        return any(_reserved_key_in(item) for item in value)
    return False


def user_data(data: Mapping[str, Any]) -> dict[str, Any] | str:
    """`data` as a record keeps it: a copy, or its JSON text when it holds a key the store refuses."""
    data = dict(data)
    return orjson.dumps(data).decode() if _reserved_key_in(data) else data


def user_data_from(stored: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """What `user_data` kept (or a record written before it, which holds the dict itself)."""
    if isinstance(stored, str):
        return orjson.loads(stored)
    return dict(stored or {})


def instance_record(instance: Instance) -> dict[str, Any]:
    return {
        "v": FORMAT,
        "id": instance.id,
        "journey_id": instance.journey_id,
        "version": instance.version,
        "person_id": instance.person_id,
        "status": instance.status.value,
        "node": instance.node,
        "entered_at": instance.entered_at,
        "trigger_at": instance.trigger_at,
        "visits": dict(instance.visits),
        "timers": [[t.id, t.at, t.node_id, t.kind] for t in instance.timers],
        "pending": list(instance.pending),
        "variants": dict(instance.variants),
        "goal_until": instance.goal_until,
        "converted_at": instance.converted_at,
        "ended_at": instance.ended_at,
        "end_reason": instance.end_reason,
        "entry": user_data(instance.entry),
        "steps": [[s.node_id, s.at, s.outcome] for s in instance.steps],
    }


def instance_from_record(record: Mapping[str, Any]) -> Instance:
    _check(record, "instance")
    return Instance(
        id=record["id"],
        journey_id=record["journey_id"],
        version=record["version"],
        person_id=record["person_id"],
        status=Status(record["status"]),
        node=record["node"],
        entered_at=record["entered_at"],
        trigger_at=record.get("trigger_at"),  # absent from records written before it was kept
        visits=dict(record["visits"]),
        timers=tuple(Timer(*timer) for timer in record["timers"]),
        pending=tuple(record["pending"]),
        variants=dict(record["variants"]),
        goal_until=record["goal_until"],
        converted_at=record["converted_at"],
        ended_at=record["ended_at"],
        end_reason=record["end_reason"],
        entry=user_data_from(record["entry"]),
        steps=tuple(Step(*step) for step in record["steps"]),
    )


_ACTION_FIELDS = ProposedAction.__dataclass_fields__


def _action_record(action: ProposedAction) -> dict[str, Any]:
    return {name: getattr(action, name) for name in _ACTION_FIELDS}


def _held_record(held: Held) -> dict[str, Any]:
    record = {"action": _action_record(held.action), "until": held.until, "approved": held.approved}
    if held.profile:  # rare: only while the profile catches up
        record["profile"] = True
    return record


def _held(record: Mapping[str, Any]) -> Held:
    return Held(ProposedAction(**record["action"]), record["until"], record["approved"], record.get("profile", False))


def person_record(state: PersonState) -> dict[str, Any]:
    return {
        "v": FORMAT,
        "person_id": state.person_id,
        "sent": [[s.at, s.channel, s.action_id] for s in state.sent],
        "deferred": [_held_record(h) for h in state.deferred],
        "awaiting": [_held_record(h) for h in state.awaiting],
        "last_seen": dict(state.last_seen),
    }


def person_from_record(record: Mapping[str, Any]) -> PersonState:
    _check(record, "person state")
    return PersonState(
        person_id=record["person_id"],
        sent=tuple(Sent(*sent) for sent in record["sent"]),
        deferred=tuple(_held(h) for h in record["deferred"]),
        awaiting=tuple(_held(h) for h in record["awaiting"]),
        last_seen=dict(record["last_seen"]),
    )


def _check(record: Mapping[str, Any], what: str) -> None:
    if record.get("v") != FORMAT:
        raise ValueError(f"{what} record format {record.get('v')!r} is not {FORMAT}; this build reads {FORMAT}")
