"""Segment's reserved traits, stored under one name each.

Segment lets clients send its reserved traits camelCase or snake_case ("so in JavaScript you can match the
rest of your camel-case code by sending `firstName`, while in Ruby ... `first_name`"): apps instrumented
for analytics.js or the mobile SDKs send `firstName`, `lastName`, `createdAt`; server libraries and cdp's
own mappings, segments and templates use `first_name`, `last_name`, `created_at`. Segment keeps both
spellings on the event and lets each destination look for either; cdp has one profile that every reader
shares, so the collector stores each reserved trait under its snake_case name, the one cdp reads:

- a person's traits (an identify call's `traits`, any call's `context.traits`): `firstName`, `lastName`,
  `createdAt`, `address.postalCode`, `company.employeeCount`; and `name`, when absent (or null) while
  `first_name` and `last_name` are both non-empty strings, is filled as "<first> <last>" (each trimmed),
  as Segment fills it;
- a group's traits (a group call's `traits`): `createdAt` and `address.postalCode`.

When both spellings arrive in one object, the snake_case one is kept and the camelCase one dropped: one
spelling on the profile, whatever the key order (which a protobuf Struct does not keep anyway). The
camelCase key is not kept beside it: the profile would show the trait twice, the second copy never
updated by the clients that send snake_case, and every reader would have to pick one. Values are kept as
sent (a `createdAt` string is not parsed). Other keys, other calls' top-level `traits` (no Segment call
but identify and group has any) and any other casing (`FirstName`, `first name`) are left as sent.

Both doors apply it: `parse_decoded` to the decoded JSON objects before they fill the event's Structs
(`person_dict`, `group_dict`: RudderStack's `context.traits`, copied to an identify without `traits`, are
then stored renamed in both places), `prepare_grpc_event` to a valid protobuf event's Structs
(`store_reserved_traits`). The size limit is measured on the event as sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from google.protobuf import struct_pb2

from cdp.events.v1 import events_pb2

#: camelCase → stored name, at the top level of a person's traits.
PERSON_TRAITS: Mapping[str, str] = MappingProxyType(
    {"firstName": "first_name", "lastName": "last_name", "createdAt": "created_at"}
)
#: camelCase → stored name, at the top level of a group's traits.
GROUP_TRAITS: Mapping[str, str] = MappingProxyType({"createdAt": "created_at"})
#: Inside a reserved object trait: trait → (camelCase → stored name).
_ADDRESS = MappingProxyType({"postalCode": "postal_code"})
PERSON_OBJECTS: Mapping[str, Mapping[str, str]] = MappingProxyType(
    {"address": _ADDRESS, "company": MappingProxyType({"employeeCount": "employee_count"})}
)
GROUP_OBJECTS: Mapping[str, Mapping[str, str]] = MappingProxyType({"address": _ADDRESS})

# Keys whose presence sends an object of a person's or a group's traits down the slow path (most have none).
_PERSON_TRIGGERS = frozenset({*PERSON_TRAITS, *PERSON_OBJECTS, "first_name"})
_GROUP_TRIGGERS = frozenset({*GROUP_TRAITS, *GROUP_OBJECTS})

_IDENTIFY = events_pb2.EVENT_TYPE_IDENTIFY
_GROUP = events_pb2.EVENT_TYPE_GROUP


def person_dict(traits: dict) -> dict:
    """A person's traits as decoded JSON, with the stored names (a new dict, in the sent order; `traits`
    itself when there is nothing to change): the Segment JSON door's form, which costs a set test for an
    object without reserved traits."""
    if traits.keys().isdisjoint(_PERSON_TRIGGERS):
        return traits
    out = _renamed_dict(traits, PERSON_TRAITS, PERSON_OBJECTS)
    first, last = out.get("first_name"), out.get("last_name")
    if type(first) is str and type(last) is str and out.get("name") is None:
        first, last = first.strip(), last.strip()
        if first and last:
            out["name"] = f"{first} {last}"
    return out


def group_dict(traits: dict) -> dict:
    """`person_dict` for a group's traits (no name is filled)."""
    if traits.keys().isdisjoint(_GROUP_TRIGGERS):
        return traits
    return _renamed_dict(traits, GROUP_TRAITS, GROUP_OBJECTS)


def _renamed_dict(traits: dict, table: Mapping[str, str], objects: Mapping[str, Mapping[str, str]]) -> dict:
    out = {}
    for key, value in traits.items():
        stored = table.get(key)
        if stored is not None:
            if stored in traits:
                continue  # both spellings: the stored one is kept
            key = stored
        elif type(value) is dict and key in objects and not value.keys().isdisjoint(objects[key]):
            value = _renamed_dict(value, objects[key], {})
        out[key] = value
    return out


def store_reserved_traits(event: events_pb2.Event) -> None:
    """Rename the event's reserved traits to their stored names and fill `name`, in place (see above)."""
    if event.HasField("context") and event.context.HasField("traits"):
        person_traits(event.context.traits)
    if event.type == _IDENTIFY:
        if event.HasField("traits"):
            person_traits(event.traits)
    elif event.type == _GROUP and event.HasField("traits"):
        _rename(event.traits.fields, GROUP_TRAITS, GROUP_OBJECTS)


def person_traits(traits: struct_pb2.Struct) -> None:
    fields = traits.fields
    _rename(fields, PERSON_TRAITS, PERSON_OBJECTS)
    if "first_name" in fields and "last_name" in fields:
        name = fields.get("name")
        if name is None or name.WhichOneof("kind") == "null_value":
            first = _text(fields["first_name"])
            last = _text(fields["last_name"])
            if first and last:
                fields["name"].string_value = f"{first} {last}"


def _rename(fields, table: Mapping[str, str], objects: Mapping[str, Mapping[str, str]]) -> None:
    for camel, snake in table.items():
        if camel in fields:
            if snake not in fields:
                fields[snake].CopyFrom(fields[camel])
            del fields[camel]
    for key, inner in objects.items():
        if key in fields:
            value = fields[key]
            if value.WhichOneof("kind") == "struct_value":
                _rename(value.struct_value.fields, inner, {})


def _text(value: struct_pb2.Value) -> str:
    return value.string_value.strip() if value.WhichOneof("kind") == "string_value" else ""
