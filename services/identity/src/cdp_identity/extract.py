"""Where identifiers live on an event: each configured type's `paths`, compiled once into getters.

Paths: `user_id`, `anonymous_id`, `previous_id`, `context.device.id`, `context.device.advertising_id`,
`traits.<key>`, `context.traits.<key>`, `properties.<key>`, `extra.<key>`, `context.extra.<key>` and
`context.externalIds.<type>` (Segment's `context.externalIds: [{"id", "type"}]`).
"""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf import struct_pb2

from cdp.events.v1 import events_pb2
from cdp_identity.domain.rules import MergeRules
from cdp_kit.errors import InvalidArgument

Getter = Callable[[events_pb2.Event], list[str]]

ALIAS = events_pb2.EVENT_TYPE_ALIAS


def _scalar(value: struct_pb2.Value) -> str | None:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        return str(int(number)) if number.is_integer() else repr(number)
    return None


def _struct_getter(select: Callable[[events_pb2.Event], struct_pb2.Struct], key: str) -> Getter:
    def get(event: events_pb2.Event) -> list[str]:
        fields = select(event).fields
        if key not in fields:
            return []
        value = _scalar(fields[key])
        return [] if value is None else [value]

    return get


def _external_ids_getter(kind: str) -> Getter:
    def get(event: events_pb2.Event) -> list[str]:
        fields = event.context.extra.fields
        if "externalIds" not in fields:
            return []
        found = []
        for item in fields["externalIds"].list_value.values:
            entry = item.struct_value.fields
            if "type" in entry and entry["type"].string_value == kind and "id" in entry:
                value = _scalar(entry["id"])
                if value is not None:
                    found.append(value)
        return found

    return get


def _field_getter(name: str) -> Getter:
    def get(event: events_pb2.Event) -> list[str]:
        value = getattr(event, name)
        return [value] if value else []

    return get


def _device_getter(name: str) -> Getter:
    def get(event: events_pb2.Event) -> list[str]:
        value = getattr(event.context.device, name)
        return [value] if value else []

    return get


# Whether the struct is there at all: far cheaper than touching an absent one's fields.
_HAS: dict[str, Callable[[events_pb2.Event], bool]] = {
    "traits": lambda e: e.HasField("traits"),
    "context.traits": lambda e: e.HasField("context") and e.context.HasField("traits"),
    "properties": lambda e: e.HasField("properties"),
    "extra": lambda e: e.HasField("extra"),
    "context.extra": lambda e: e.HasField("context") and e.context.HasField("extra"),
}

_STRUCTS: dict[str, Callable[[events_pb2.Event], struct_pb2.Struct]] = {
    "traits": lambda e: e.traits,
    "context.traits": lambda e: e.context.traits,
    "properties": lambda e: e.properties,
    "extra": lambda e: e.extra,
    "context.extra": lambda e: e.context.extra,
}


def compile_path(path: str, field_name: str = "paths") -> Getter:
    if path in ("user_id", "anonymous_id", "previous_id"):
        return _field_getter(path)
    if path in ("context.device.id", "context.device.advertising_id", "context.device.token"):
        return _device_getter(path.rsplit(".", 1)[1])
    if path.startswith("context.externalIds."):
        return _external_ids_getter(path.removeprefix("context.externalIds."))
    for prefix in sorted(_STRUCTS, key=len, reverse=True):
        if path.startswith(prefix + ".") and len(path) > len(prefix) + 1:
            return _struct_getter(_STRUCTS[prefix], path[len(prefix) + 1 :])
    raise InvalidArgument(
        field_name,
        f"{path!r} is not an event path: use user_id, anonymous_id, previous_id, context.device.id, "
        "traits.<key>, context.traits.<key>, properties.<key>, context.externalIds.<type>",
    )


class Extractor:
    """(type, raw value) pairs of one event. An alias's `previous_id` is returned last with type
    `previous`, for the engine to place (a known user id, else an anonymous id).

    Paths are grouped by where they look (top-level fields, the device, each struct) so that an event
    pays once per place, not once per path: most events carry no traits at all."""

    def __init__(self, rules: MergeRules) -> None:
        self.fields: list[tuple[str, str]] = []
        self.device: list[tuple[str, str]] = []
        self.structs: dict[str, list[tuple[str, str]]] = {}
        self.external: list[str] = []
        for index, kind in enumerate(rules.types):
            for j, path in enumerate(kind.paths):
                compile_path(path, f"types[{index}].paths[{j}]")  # validates, naming the bad path
                if path in ("user_id", "anonymous_id", "previous_id"):
                    self.fields.append((path, kind.name))
                elif path.startswith("context.device."):
                    self.device.append((path.rsplit(".", 1)[1], kind.name))
                elif path.startswith("context.externalIds."):
                    self.external.append(kind.name)
                else:
                    prefix = next(p for p in sorted(_STRUCTS, key=len, reverse=True) if path.startswith(p + "."))
                    self.structs.setdefault(prefix, []).append((path[len(prefix) + 1 :], kind.name))
        self.struct_groups = [(_HAS[prefix], _STRUCTS[prefix], keys) for prefix, keys in self.structs.items()]

    def extract(self, event: events_pb2.Event) -> list[tuple[str, str]]:
        pairs = [(kind, value) for attr, kind in self.fields if (value := getattr(event, attr))]
        if self.device and event.context.HasField("device"):
            device = event.context.device
            pairs.extend((kind, value) for attr, kind in self.device if (value := getattr(device, attr)))
        for present, select, keys in self.struct_groups:
            if not present(event):
                continue
            fields = select(event).fields
            for key, kind in keys:
                if key in fields and (value := _scalar(fields[key])) is not None:
                    pairs.append((kind, value))
        if self.external and _HAS["context.extra"](event) and "externalIds" in event.context.extra.fields:
            for kind in self.external:
                pairs.extend((kind, value) for value in _external_ids_getter(kind)(event))
        if event.type == ALIAS and event.previous_id:
            pairs.append(("previous", event.previous_id))
        return pairs
