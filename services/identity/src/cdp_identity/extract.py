"""Where identifiers live on an event: each configured type's `paths`, grouped by where they look.

Paths: `user_id`, `anonymous_id`, `previous_id`, `context.device.id`, `context.device.advertising_id`,
`context.device.token`, `traits.<key>`, `context.traits.<key>`, `properties.<key>`, `extra.<key>`,
`context.extra.<key>` and `context.externalIds.<type>` (Segment's `context.externalIds: [{"id", "type"}]`).
"""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf import struct_pb2

from cdp.events.v1 import events_pb2
from cdp_identity.domain.rules import MergeRules
from cdp_kit.errors import InvalidArgument

ALIAS = events_pb2.EVENT_TYPE_ALIAS
TOP_LEVEL = ("user_id", "anonymous_id", "previous_id")
DEVICE = ("id", "advertising_id", "token")

# Whether a struct is there at all (far cheaper than touching an absent one's fields), and the struct;
# each is given the event and its context (None when the event has none), read once per event.
_Select = Callable[[events_pb2.Event, events_pb2.Context | None], struct_pb2.Struct]
_STRUCTS: dict[str, tuple[Callable[[events_pb2.Event, events_pb2.Context | None], bool], _Select]] = {
    "traits": (lambda e, c: e.HasField("traits"), lambda e, c: e.traits),
    "context.traits": (lambda e, c: c is not None and c.HasField("traits"), lambda e, c: c.traits),  # type: ignore[union-attr]
    "properties": (lambda e, c: e.HasField("properties"), lambda e, c: e.properties),
    "extra": (lambda e, c: e.HasField("extra"), lambda e, c: e.extra),
    "context.extra": (lambda e, c: c is not None and c.HasField("extra"), lambda e, c: c.extra),  # type: ignore[union-attr]
}
_LONGEST_FIRST = sorted(_STRUCTS, key=len, reverse=True)


def _scalar(value: struct_pb2.Value) -> str | None:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        return str(int(number)) if number.is_integer() else repr(number)
    return None


class Extractor:
    """(type, raw value) pairs of one event. An alias's `previous_id` is returned last with type
    `previous`, for the engine to place (a known user id, else an anonymous id).

    Paths are grouped by where they look (top-level fields, the device, each struct) so that an event
    pays once per place, not once per path: most events carry no traits at all."""

    def __init__(self, rules: MergeRules) -> None:
        self.fields: list[tuple[str, str]] = []
        self.device: list[tuple[str, str]] = []
        self.external: dict[str, str] = {}  # externalIds entry type -> identifier type
        structs: dict[str, list[tuple[str, str]]] = {}
        for index, kind in enumerate(rules.types):
            for j, path in enumerate(kind.paths):
                if path in TOP_LEVEL:
                    self.fields.append((path, kind.name))
                elif path.startswith("context.device.") and path.rsplit(".", 1)[1] in DEVICE:
                    self.device.append((path.rsplit(".", 1)[1], kind.name))
                elif path.startswith("context.externalIds.") and len(path) > len("context.externalIds."):
                    self.external[path.removeprefix("context.externalIds.")] = kind.name
                elif prefix := next(
                    (p for p in _LONGEST_FIRST if path.startswith(p + ".") and len(path) > len(p) + 1), None
                ):
                    structs.setdefault(prefix, []).append((path[len(prefix) + 1 :], kind.name))
                else:
                    raise InvalidArgument(
                        f"types[{index}].paths[{j}]",
                        f"{path!r} is not an event path: use user_id, anonymous_id, previous_id, context.device.id, "
                        "traits.<key>, context.traits.<key>, properties.<key>, context.externalIds.<type>",
                    )
        self.struct_groups = [(*_STRUCTS[prefix], keys) for prefix, keys in structs.items()]

    def extract(self, event: events_pb2.Event) -> list[tuple[str, str]]:
        pairs = [(kind, value) for attr, kind in self.fields if (value := getattr(event, attr))]
        context = event.context if event.HasField("context") else None
        if self.device and context is not None and context.HasField("device"):
            device = context.device
            pairs.extend((kind, value) for attr, kind in self.device if (value := getattr(device, attr)))
        for present, select, keys in self.struct_groups:
            if not present(event, context):
                continue
            fields = select(event, context).fields
            for key, kind in keys:
                if key in fields and (value := _scalar(fields[key])) is not None:
                    pairs.append((kind, value))
        if (
            self.external
            and context is not None
            and context.HasField("extra")
            and "externalIds" in context.extra.fields
        ):
            for item in context.extra.fields["externalIds"].list_value.values:
                entry = item.struct_value.fields
                kind = self.external.get(entry["type"].string_value) if "type" in entry else None
                if kind is not None and "id" in entry and (value := _scalar(entry["id"])) is not None:
                    pairs.append((kind, value))
        if event.type == ALIAS and event.previous_id:
            pairs.append(("previous", event.previous_id))
        return pairs
