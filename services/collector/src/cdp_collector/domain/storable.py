"""What every service downstream can store and decode, checked at the edge: an event the collector
accepts must never be the one that kills a batch later.

The edge is the only place that can still say "no" to the client. Once an event is on `events.raw`,
identity and profile process it in batches, and one value their stores or decoders refuse fails the whole
batch and dead-letters it - after the client was told "stored". So whatever a downstream service cannot
hold is refused here, per event, naming the field:

- **NUL (U+0000) in an identifier.** Identity stores each identifier as a store key (`"email:ada@…"`)
  and as a field name of its person document; the storage port refuses NUL in both (SQLite and MongoDB
  cannot hold it there). Checked: `userId`, `anonymousId`, `previousId`, `groupId`, `context.groupId`,
  `context.device.id`/`advertisingId`/`token`, every top-level string of `traits` and `context.traits`
  (identity's default place for any identifier type, `email` and `phone` included), and the `id` and
  `type` of each `context.externalIds` entry.
- **NUL in an object key**, at any depth of properties, traits, integrations, context and the event's
  unknown keys, and in consent preference names: keys become field names in documents downstream.
- **The message id** is the dedup key: `Nats-Msg-Id` on the bus and part of profile's timeline store key.
  A NATS header value cannot hold CR/LF (the publisher turns them into spaces) and is trimmed, so two ids
  differing only there would be deduplicated as one event and identity and profile would disagree on its
  id; NUL cannot be in a store key. A message id with a control character (U+0000-U+001F, U+007F) or
  surrounding whitespace is refused.
- **Nesting** of protobuf events (gRPC `Collect`): the same limit as for JSON (`limits.py`), counted the
  same way, so an event is judged alike whichever door it came in by.

NUL inside ordinary string *values* (a property, a nested trait, an event name) is accepted: both store
adapters keep it (SQLite's JSON text escapes it, BSON strings are length-prefixed), and profile, scoring
and segmentation keep event data inside JSON strings. Keys starting with `$` or holding `.` are accepted
for the same reason: no service stores event keys as document field names.

Over HTTP the NUL checks only run when the body holds a `\\u0000` escape (JSON cannot carry a raw NUL),
so the common request pays one byte search for them.
"""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf import struct_pb2

from cdp.events.v1 import events_pb2
from cdp_collector.domain.errors import Code, FieldError, join
from cdp_collector.domain.structs import too_deep

NUL = "\x00"
_CONTROL = frozenset(chr(c) for c in (*range(0x20), 0x7F))

#: Top-level identifier fields (proto name), checked on every event of both doors.
ID_FIELDS = ("user_id", "anonymous_id", "previous_id", "group_id")
_DEVICE_IDS = (("id", "id"), ("advertising_id", "advertisingId"), ("token", "token"))


def shown_key(key: str) -> str:
    """A key as it appears in a field path: NUL written as `\\u0000` so the path stays readable."""
    return key.replace(NUL, "\\u0000")


def _nul_in_id(path: str, label: str) -> FieldError:
    return FieldError(
        Code.INVALID_CHARACTER,
        path,
        f"{label} contains a NUL character (\\u0000); identifiers become store keys downstream, which cannot "
        "hold it: remove it",
    )


def _nul_in_key(path: str) -> FieldError:
    return FieldError(
        Code.INVALID_CHARACTER,
        path,
        "this object key contains a NUL character (\\u0000); keys become field names downstream, which cannot "
        "hold it: rename the key",
    )


def message_id_problem(message_id: str, path: str, label: str) -> FieldError | None:
    """Control characters or surrounding whitespace in the dedup key (see the module docstring)."""
    if message_id.isprintable() and message_id == message_id.strip():
        return None  # the common case, at C speed
    bad = next((c for c in message_id if c in _CONTROL), None)
    if bad is not None:
        return FieldError(
            Code.INVALID_CHARACTER,
            path,
            f"{label} contains the control character U+{ord(bad):04X}; it is the event's dedup key on the bus "
            "and in stores, which cannot hold control characters: use printable characters only",
        )
    if message_id != message_id.strip():
        return FieldError(
            Code.INVALID_CHARACTER,
            path,
            f"{label} starts or ends with whitespace; the bus trims its dedup key, so it would collide with "
            "the trimmed id: trim it",
        )
    return None  # other non-printable characters (e.g. U+00AD) are harmless here


def id_problems(event: events_pb2.Event, *, base: str, names: Mapping[str, str] | None) -> list[FieldError]:
    """NUL in the identifiers that are plain fields of the event (cheap: a few string searches)."""
    errors = []
    for attr in ID_FIELDS:
        if NUL in getattr(event, attr):
            label = names.get(attr, attr) if names is not None else attr
            errors.append(_nul_in_id(join(base, label), label))
    if event.HasField("context"):
        context = event.context
        if NUL in context.group_id:
            label = names.get("context.group_id", "context.groupId") if names is not None else "context.group_id"
            errors.append(_nul_in_id(join(base, label), label))
        if context.HasField("device"):
            device = context.device
            for attr, json_name in _DEVICE_IDS:
                if NUL in getattr(device, attr):
                    label = f"context.device.{json_name if names is not None else attr}"
                    errors.append(_nul_in_id(join(base, label), label))
    return errors


def struct_problems(event: events_pb2.Event, *, base: str, json_paths: bool, max_depth: int | None) -> list[FieldError]:
    """NUL in object keys and in identifier-bearing struct values; with `max_depth`, also nesting (for
    protobuf events, which no JSON walk has measured). One problem per struct at most: the first found.

    `json_paths` names fields as the Segment JSON had them (the event's unknown keys at the event's own
    level, unknown context keys under `context`); otherwise proto names (`extra.…`, `context.extra.…`)."""
    errors: list[FieldError] = []
    # (struct, its path relative to the event, nesting level of the object it stands for, whether its
    # top-level strings are identifiers)
    structs: list[tuple[struct_pb2.Struct, str, int, bool]] = []
    if event.HasField("properties"):
        structs.append((event.properties, "properties", 2, False))
    if event.HasField("traits"):
        structs.append((event.traits, "traits", 2, True))
    if event.HasField("integrations"):
        structs.append((event.integrations, "integrations", 2, False))
    if event.HasField("extra"):
        structs.append((event.extra, "" if json_paths else "extra", 1, False))
    if event.HasField("context"):
        context = event.context
        if context.HasField("traits"):
            structs.append((context.traits, "context.traits", 3, True))
        if context.HasField("extra"):
            extra_path = "context" if json_paths else "context.extra"
            structs.append((context.extra, extra_path, 2, False))
            if "externalIds" in context.extra.fields:
                errors.extend(_external_id_problems(context.extra.fields["externalIds"], base, extra_path))
        if context.HasField("consent"):
            for attr, json_name in (
                ("category_preferences", "categoryPreferences"),
                ("channel_preferences", "channelPreferences"),
            ):
                for purpose in getattr(context.consent, attr):
                    if NUL in purpose:
                        name = json_name if json_paths else attr
                        errors.append(_nul_in_key(join(base, f"context.consent.{name}.{shown_key(purpose)}")))
                        break
    for struct, relative, level, identifiers in structs:
        path = join(base, relative) if relative else base
        if identifiers:
            for key, value in struct.fields.items():
                if value.WhichOneof("kind") == "string_value" and NUL in value.string_value:
                    label = f"{relative}.{shown_key(key)}"
                    errors.append(_nul_in_id(join(base, label), label))
                    break
        problem = _walk(struct, path, level, max_depth)
        if problem is not None:
            errors.append(problem)
    return errors


def _external_id_problems(value: struct_pb2.Value, base: str, context_path: str) -> list[FieldError]:
    errors = []
    for index, item in enumerate(value.list_value.values):
        entry = item.struct_value.fields
        for name in ("id", "type"):
            if name in entry and entry[name].WhichOneof("kind") == "string_value" and NUL in entry[name].string_value:
                label = f"{context_path}.externalIds[{index}].{name}"
                errors.append(_nul_in_id(join(base, label), label))
    return errors


def _walk(struct: struct_pb2.Struct, path: str, level: int, max_depth: int | None) -> FieldError | None:
    """The first NUL key or (with max_depth) container nested beyond the limit. Iterative: a deep event
    costs a longer list, not Python recursion."""
    stack: list[tuple[object, str, int]] = [(struct, path, level)]
    while stack:
        container, where, depth = stack.pop()
        deeper = max_depth is None or depth < max_depth
        if isinstance(container, struct_pb2.Struct):
            for key, value in container.fields.items():
                if NUL in key:
                    return _nul_in_key(join(where, shown_key(key)))
                kind = value.WhichOneof("kind")
                if kind == "struct_value" or kind == "list_value":
                    inner = join(where, shown_key(key))
                    if not deeper:
                        return too_deep(inner, max_depth)  # type: ignore[arg-type]
                    stack.append((getattr(value, kind), inner, depth + 1))
        else:
            for index, value in enumerate(container.values):  # type: ignore[attr-defined]
                kind = value.WhichOneof("kind")
                if kind == "struct_value" or kind == "list_value":
                    inner = f"{where}[{index}]"
                    if not deeper:
                        return too_deep(inner, max_depth)  # type: ignore[arg-type]
                    stack.append((getattr(value, kind), inner, depth + 1))
    return None
