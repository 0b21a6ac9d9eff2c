"""Protobuf <-> what the store holds: instances, approvals, decisions, inbox messages, journey definitions,
and the request checks every RPC shares (required fields, page sizes and tokens)."""

from __future__ import annotations

import base64
import math
from typing import Any

import orjson
import yaml
from google.protobuf import json_format

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_kit.errors import InvalidArgument
from cdp_kit.timestamps import set_seconds
from cdp_orchestration.domain.document import JourneyInvalid, Problem, load_yaml
from cdp_orchestration.domain.lifecycle import State

JOURNEY_STATE = {
    State.DRAFT: pb.JOURNEY_STATE_DRAFT,
    State.ACTIVE: pb.JOURNEY_STATE_ACTIVE,
    State.PAUSED: pb.JOURNEY_STATE_PAUSED,
    State.ARCHIVED: pb.JOURNEY_STATE_ARCHIVED,
}
STATE_OF_PB = {v: k for k, v in JOURNEY_STATE.items()}
APPROVAL_STATE = {
    "pending": pb.APPROVAL_STATE_PENDING,
    "approved": pb.APPROVAL_STATE_APPROVED,
    "rejected": pb.APPROVAL_STATE_REJECTED,
    "expired": pb.APPROVAL_STATE_EXPIRED,
}
APPROVAL_OF_PB = {v: k for k, v in APPROVAL_STATE.items()}
DECISION_KIND = {
    "sent": pb.DECISION_KIND_SENT,
    "deferred": pb.DECISION_KIND_DEFERRED,
    "superseded": pb.DECISION_KIND_SUPERSEDED,
    "capped": pb.DECISION_KIND_CAPPED,
    "suppressed": pb.DECISION_KIND_SUPPRESSED,
    "no_consent": pb.DECISION_KIND_NO_CONSENT,
    "awaiting_approval": pb.DECISION_KIND_AWAITING_APPROVAL,
    "expired": pb.DECISION_KIND_EXPIRED,
    "rejected": pb.DECISION_KIND_REJECTED,
    "withdrawn": pb.DECISION_KIND_WITHDRAWN,
    "failed": pb.DECISION_KIND_FAILED,  # the arbiter said send; its template or address failed (the reason)
    "not_entered": pb.DECISION_KIND_NOT_ENTERED,  # no action: a trigger did not enter the person (`apply.py`)
}
MAX_PAGE = 1000
DEFAULT_PAGE = 100
MAX_DEFINITION = 512 * 1024


def whole_numbers(value: Any) -> Any:
    """Struct numbers are doubles: 1.0 where the author wrote 1. Only where a double holds the whole number
    exactly (below 2**53): a larger one stays a double (JSON cannot carry an integer past 64 bits)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [whole_numbers(v) for v in value]
    return value


def _non_finite(value: Any, path: str) -> str | None:
    """The path of the first NaN or infinity in a Struct / Value / ListValue tree, if any."""
    kind = (
        value.WhichOneof("kind") if hasattr(value, "WhichOneof") and "kind" in value.DESCRIPTOR.oneofs_by_name else None
    )
    if kind == "number_value":
        return None if math.isfinite(value.number_value) else path
    if kind == "struct_value":
        value = value.struct_value
    elif kind == "list_value":
        for i, item in enumerate(value.list_value.values):
            if (found := _non_finite(item, f"{path}[{i}]")) is not None:
                return found
        return None
    if value.DESCRIPTOR.full_name == "google.protobuf.Struct":
        for key, item in value.fields.items():
            if (found := _non_finite(item, f"{path}.{key}")) is not None:
                return found
    return None


def struct_dict(message: Any, field: str) -> Any:
    """A Struct as plain data (whole numbers as ints). NaN and infinity have no JSON form: refused, naming
    where they are, rather than failing inside the conversion."""
    where = _non_finite(message, field)
    if where is not None:
        raise InvalidArgument(where, "is not a finite number (NaN and infinity are not accepted)")
    return whole_numbers(json_format.MessageToDict(message))


def read_definition(definition: pb.JourneyDefinition, field: str = "definition") -> Any:
    """The journey document a JourneyDefinition holds (JSON text, YAML text or a Struct tree)."""
    form = definition.WhichOneof("form")
    if form is None:
        raise InvalidArgument(field, "is required: json, yaml or tree")
    if form == "tree":
        if definition.tree.ByteSize() > MAX_DEFINITION:
            raise InvalidArgument(f"{field}.tree", f"is larger than {MAX_DEFINITION} bytes")
        return struct_dict(definition.tree, f"{field}.tree")
    text = getattr(definition, form)
    if len(text) > MAX_DEFINITION:
        raise InvalidArgument(f"{field}.{form}", f"is larger than {MAX_DEFINITION} characters")
    try:
        return load_yaml(text) if form == "yaml" else orjson.loads(text)
    except (orjson.JSONDecodeError, yaml.YAMLError) as error:
        raise JourneyInvalid([Problem("", "journey", f"is not valid {form.upper()}: {error}")]) from None


def page_size(request_size: int) -> int:
    if request_size < 0 or request_size > MAX_PAGE:
        raise InvalidArgument("page_size", f"{request_size} is out of range: 0 (default {DEFAULT_PAGE}) to {MAX_PAGE}")
    return request_size or DEFAULT_PAGE


def offset(token: str) -> int:
    if not token:
        return 0
    try:
        return int(base64.urlsafe_b64decode(token.encode()).decode())
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("page_token", "is not a token this service gave") from None


def token(offset: int) -> str:
    return base64.urlsafe_b64encode(str(offset).encode()).decode()


def required(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    return identifier(value, field)


#: what every person id starts with: identity names people `p_<hex>`
PERSON_PREFIX = "p_"


def person_id(value: str, field: str) -> str:
    """A person id as identity makes them (`p_...`): an identifier such as `user_id:ada`, or any other
    name, would start journey instances that can never reach anyone."""
    value = required(value, field)
    if not value.startswith(PERSON_PREFIX) or len(value) == len(PERSON_PREFIX):
        raise InvalidArgument(
            field,
            "must be a person id (p_...), not an identifier or a name: look it up with `cdpctl profile TYPE VALUE` "
            "(like `cdpctl profile user_id ada`)",
        )
    return value


def identifier(value: str, field: str) -> str:
    """An id or key as the store keeps it: no NUL characters (the store refuses them as keys), bounded."""
    if "\x00" in value:
        raise InvalidArgument(field, "must not contain a NUL character")
    if len(value) > 512:
        raise InvalidArgument(field, f"is {len(value)} characters long: at most 512")
    return value


def set_time(stamp, seconds: float | None) -> None:
    if seconds is not None:
        set_seconds(stamp, seconds)


def instance_message(doc: dict[str, Any]) -> pb.Instance:
    status = doc["status"]
    if status == "ended":
        state = pb.INSTANCE_STATE_ENDED
    elif doc.get("timers"):
        state = pb.INSTANCE_STATE_WAITING
    else:
        state = pb.INSTANCE_STATE_RUNNING
    message = pb.Instance(
        id=doc["id"],
        journey_id=doc["journey_id"],
        journey_version=doc["version"],
        person_id=doc["person_id"],
        state=state,
        node_id=doc.get("node") or "",
        variant=",".join(doc.get("variants", {}).values()),
        end_reason=doc.get("end_reason") or "",
        converted=doc.get("converted_at") is not None,
    )
    set_time(message.entered_at, doc.get("entered_at"))
    set_time(message.ended_at, doc.get("ended_at"))
    for node_id, at, outcome in doc.get("steps", []):
        step = message.steps.add(node_id=node_id, outcome=outcome)
        set_seconds(step.at, at)
    return message


def approval_message(doc: dict[str, Any]) -> pb.Approval:
    message = pb.Approval(
        action_id=doc["action_id"],
        journey_id=doc["journey_id"],
        instance_id=doc["instance_id"],
        person_id=doc["person_id"],
        channel=doc["channel"],
        category=doc["category"],
        value=doc.get("value") or 0.0,
        state=APPROVAL_STATE[doc["state"]],
        decided_by=doc.get("decided_by") or "",
        note=doc.get("note") or "",
    )
    set_time(message.requested_at, doc.get("requested_at"))
    set_time(message.expires_at, doc.get("expires_at"))
    set_time(message.decided_at, doc.get("decided_at"))
    return message


def decision_message(doc: dict[str, Any]) -> pb.Decision:
    message = pb.Decision(
        action_id=doc["action_id"],
        journey_id=doc["journey_id"],
        instance_id=doc["instance_id"],
        person_id=doc["person_id"],
        channel=doc["channel"],
        category=doc["category"],
        kind=DECISION_KIND.get(doc["kind"], pb.DECISION_KIND_UNSPECIFIED),
        reason=doc["reason"],
        rule=doc.get("rule") or "",
    )
    set_time(message.until, doc.get("until"))
    set_time(message.decided_at, doc.get("at"))
    return message


# The rule a held action's entry in ListDecisions names: it waits for the profile (`Rules.profile_wait`).
PROFILE_WAIT = "profile_wait"


def held_message(person_id: str, held: dict[str, Any]) -> pb.Decision:
    """An action the arbiter holds until the profile applies the person's latest event, as ListDecisions
    lists it: no decision yet, so DEFERRED with the rule `profile_wait`, proposed at `decided_at`, decided
    at `until` at the latest (on the fields known then)."""
    action = held["action"]
    message = pb.Decision(
        action_id=action["action_id"],
        journey_id=action["journey_id"],
        instance_id=action["instance_id"],
        person_id=person_id,
        channel=action["channel"],
        category=action["category"],
        kind=pb.DECISION_KIND_DEFERRED,
        reason="held: waiting for the profile to apply the person's latest event (no decision yet)",
        rule=PROFILE_WAIT,
    )
    set_time(message.until, held["until"])
    set_time(message.decided_at, action["proposed_at"])
    return message


def inbox_message(message) -> pb.InboxMessage:
    out = pb.InboxMessage(
        message_id=message.message_id,
        person_id=message.person_id,
        action_id=message.message_id,
        title=message.title,
        body=message.body,
    )
    data = dict(message.data)
    if message.url:
        data["url"] = message.url
    if data:
        out.data.update(data)
    out.created_at.FromMilliseconds(message.created_at_ms)
    if message.read_at_ms is not None:
        out.read_at.FromMilliseconds(message.read_at_ms)
    return out
