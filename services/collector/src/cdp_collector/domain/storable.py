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
- **A number that is not finite** (NaN, an infinity) anywhere in a protobuf event's structs, or in
  `context.location` / `context.screen`: JSON cannot carry one, no store downstream holds one, and
  orchestration could not read the resolved event holding it (each such event was dead-lettered there
  after the collector had answered it accepted).

NUL inside ordinary string *values* (a property, a nested trait, an event name) is accepted: both store
adapters keep it (SQLite's JSON text escapes it, BSON strings are length-prefixed), and profile, scoring
and segmentation keep event data inside JSON strings. Keys starting with `$` or holding `.` are accepted
for the same reason: no service stores event keys as document field names.

Over HTTP the NUL checks only run when the body holds a `\\u0000` escape (JSON cannot carry a raw NUL),
so the common request pays one byte search for them.
"""

from __future__ import annotations

from collections.abc import Mapping
from math import isfinite

from google.protobuf import struct_pb2

from cdp.events.v1 import events_pb2
from cdp_collector.domain.errors import Code, FieldError, join
from cdp_collector.domain.structs import too_deep

NUL = "\x00"
_CONTROL = frozenset(chr(c) for c in (*range(0x20), 0x7F))

#: Top-level identifier fields (proto name): checked on every gRPC event, and over HTTP when the body has a NUL.
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
    """NUL in object keys and in identifier-bearing struct values, numbers that are not finite (in structs,
    and the context's location and screen doubles); with `max_depth`, also nesting (for protobuf events,
    which no JSON walk has measured). One problem per struct at most: the first found.

    `json_paths` names fields as the Segment JSON had them (the event's unknown keys at the event's own
    level, unknown context keys under `context`); otherwise proto names (`extra.…`, `context.extra.…`).
    This runs for every gRPC event: paths are only built for a problem."""
    errors: list[FieldError] = []
    has = event.HasField
    if has("properties"):
        _check_struct(event.properties, "properties", 2, False, base, max_depth, errors)
    if has("traits"):
        _check_struct(event.traits, "traits", 2, True, base, max_depth, errors)
    if has("integrations"):
        _check_struct(event.integrations, "integrations", 2, False, base, max_depth, errors)
    if has("extra"):
        _check_struct(event.extra, "" if json_paths else "extra", 1, False, base, max_depth, errors)
    if not has("context"):
        return errors
    context = event.context
    has = context.HasField
    if has("traits"):
        _check_struct(context.traits, "context.traits", 3, True, base, max_depth, errors)
    if has("extra"):
        extra_path = "context" if json_paths else "context.extra"
        _check_struct(context.extra, extra_path, 2, False, base, max_depth, errors)
        if "externalIds" in context.extra.fields:
            errors.extend(_external_id_problems(context.extra.fields["externalIds"], base, extra_path))
    for message, doubles in _CONTEXT_DOUBLES:
        if has(message):
            part = getattr(context, message)
            for name in doubles:
                if not isfinite(getattr(part, name)):
                    errors.append(_not_finite(join(base, f"context.{message}.{name}")))
    if has("consent"):
        for attr, json_name in (
            ("category_preferences", "categoryPreferences"),
            ("channel_preferences", "channelPreferences"),
        ):
            purposes = getattr(context.consent, attr)
            if purposes and NUL in "".join(purposes):
                purpose = next(p for p in purposes if NUL in p)
                name = json_name if json_paths else attr
                errors.append(_nul_in_key(join(base, f"context.consent.{name}.{shown_key(purpose)}")))
        errors.extend(unnamed_consent(context.consent, base=base, json_paths=json_paths))
    return errors


def unnamed_consent(consent: events_pb2.Consent, *, base: str, json_paths: bool) -> list[FieldError]:
    """A consent decision without a name (`categoryPreferences: {"": true}`): the profile keeps
    `purpose:<name>` and `channel:<name>` with a name, and dropped this one without a word."""
    errors = []
    for attr, json_name in (
        ("category_preferences", "categoryPreferences"),
        ("channel_preferences", "channelPreferences"),
    ):
        if "" in getattr(consent, attr):
            name = json_name if json_paths else attr
            path = join(base, f'context.consent.{name}[""]')
            errors.append(FieldError(Code.MISSING_FIELD, path, "a consent category needs a name; this one is empty"))
    return errors


def _check_struct(
    struct: struct_pb2.Struct,
    relative: str,
    level: int,
    identifiers: bool,
    base: str,
    max_depth: int | None,
    errors: list[FieldError],
) -> None:
    found = _walk(struct, level, max_depth, identifiers)
    if found is None:
        return
    trail, problem = found
    path = join(base, relative) if relative else base
    label = relative
    for step in _steps(trail):
        if type(step) is int:
            path, label = f"{path}[{step}]", f"{label}[{step}]"
        else:
            path, label = join(path, shown_key(step)), join(label, shown_key(step))
    if problem == _NUL_KEY:
        errors.append(_nul_in_key(path))
    elif problem == _NUL_ID:
        errors.append(_nul_in_id(path, label))
    elif problem == _NOT_FINITE:
        errors.append(_not_finite(path))
    else:
        errors.append(too_deep(path, max_depth))  # type: ignore[arg-type]


def _steps(trail: tuple | None) -> list:
    steps = []
    while trail is not None:
        trail, step = trail
        steps.append(step)
    return steps[::-1]


_NUL_KEY, _NUL_ID, _TOO_DEEP, _NOT_FINITE = range(4)

#: Doubles of an event's context, by (message, field), that must be finite like every struct number.
_CONTEXT_DOUBLES = (("location", ("latitude", "longitude", "speed")), ("screen", ("density",)))


def _not_finite(path: str) -> FieldError:
    return FieldError(
        Code.INVALID_TYPE,
        path,
        "must be a finite number; got NaN or an infinity, which JSON cannot carry and no store downstream holds",
    )


def _walk(struct: struct_pb2.Struct, level: int, max_depth: int | None, identifiers: bool) -> tuple[tuple, int] | None:
    """The first problem in `struct` as (trail, what): a NUL key, a NUL in a top-level string when
    `identifiers`, or (with max_depth) a container nested beyond the limit. A trail is (parent trail, key
    or index), built only for containers and problems. Iterative: a deep event costs a longer list, not
    Python recursion. This runs for every gRPC event, so it touches each value once."""
    limit = max_depth if max_depth is not None else 1 << 30
    stack: list[tuple[object, bool, int, tuple | None]] = [(struct.fields, False, level, None)]
    pop, push = stack.pop, stack.append
    top = identifiers
    while stack:
        container, is_list, depth, trail = pop()
        deeper = depth < limit
        if is_list:
            for index, value in enumerate(container):  # type: ignore[arg-type]
                kind = value.WhichOneof("kind")
                if kind == "struct_value":
                    if not deeper:
                        return (trail, index), _TOO_DEEP
                    push((value.struct_value.fields, False, depth + 1, (trail, index)))
                elif kind == "list_value":
                    if not deeper:
                        return (trail, index), _TOO_DEEP
                    push((value.list_value.values, True, depth + 1, (trail, index)))
                elif kind == "number_value" and not isfinite(value.number_value):
                    return (trail, index), _NOT_FINITE
            continue
        if NUL in "".join(container):  # type: ignore[arg-type]
            return (trail, next(k for k in container if NUL in k)), _NUL_KEY  # type: ignore[attr-defined]
        for key, value in container.items():  # type: ignore[attr-defined]
            kind = value.WhichOneof("kind")
            if kind == "struct_value":
                if not deeper:
                    return (trail, key), _TOO_DEEP
                push((value.struct_value.fields, False, depth + 1, (trail, key)))
            elif kind == "list_value":
                if not deeper:
                    return (trail, key), _TOO_DEEP
                push((value.list_value.values, True, depth + 1, (trail, key)))
            elif kind == "number_value" and not isfinite(value.number_value):
                return (trail, key), _NOT_FINITE
            elif top and kind == "string_value" and NUL in value.string_value:
                return (trail, key), _NUL_ID
        top = False
    return None


def _external_id_problems(value: struct_pb2.Value, base: str, context_path: str) -> list[FieldError]:
    errors = []
    for index, item in enumerate(value.list_value.values):
        entry = item.struct_value.fields
        for name in ("id", "type"):
            if name in entry and entry[name].WhichOneof("kind") == "string_value" and NUL in entry[name].string_value:
                label = f"{context_path}.externalIds[{index}].{name}"
                errors.append(_nul_in_id(join(base, label), label))
    return errors
