"""Hostile input for fuzz tests: random but well-typed protobuf messages built from their descriptors, nasty
strings, segment-language text, Segment-spec JSON events, and the verdict on a gRPC answer.

Two generators share the same tables of nasty values:
  `Fuzzer`            seeded `random`, fast, for a few hundred calls in a row (tests/fault/test_grpc_fuzz.py);
  `messages(desc)`    hypothesis strategies, which shrink a failure to the smallest request that still fails
                      (tests/fuzz/).

Budgets: `budget(n)` gives hypothesis settings for n examples in `make test` (derandomized, so CI runs the same
inputs every time); `make fuzz` sets CDP_FUZZ_SCALE (examples multiplied, fresh random inputs each run).
hypothesis is a dev dependency of the workspace: only tests import this module.
"""

from __future__ import annotations

import json
import math
import os
import random
import string

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from cdp_testing.errors import bad_request_fields  # noqa: F401  (the fuzz tests import it from here)

# ---------------------------------------------------------------------------------------------- budgets

SCALE = float(os.environ.get("CDP_FUZZ_SCALE", "1"))
LONG = SCALE > 1


def time_limit(seconds: float) -> float:
    """A test's timeout, grown with its number of inputs under `make fuzz`."""
    return seconds * max(1.0, SCALE)


def budget(examples: int) -> settings:
    """hypothesis settings for `examples` inputs in `make test` (times CDP_FUZZ_SCALE under `make fuzz`)."""
    return settings(
        max_examples=max(1, round(examples * SCALE)),
        deadline=None,  # services on a shared machine: speed is not what is tested
        derandomize=not LONG,
        database=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.function_scoped_fixture,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


# ---------------------------------------------------------------------------------------------- nasty values

INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
FLOATS = (0.0, -0.0, 1.5, -1.0, 1e308, -1e308, 5e-324, math.inf, -math.inf, math.nan)
NASTY = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "\t\n\r",
    "\u0301",  # a combining mark with nothing to combine with
    "\u202eevil",  # right-to-left override
    "\u200f\u05e9\u05dc\u05d5\u05dd",  # right-to-left mark and Hebrew
    "\ufeff",  # byte order mark
    "😀" * 3,
    "null",
    "None",
    "-1",
    "1e400",
    "NaN",
    "0x7fffffff",
    "../../etc/passwd",
    "$where",
    "{'$gt': ''}",
    "%s%n",
    "'; DROP TABLE people; --",
    "person@example.com",
    "+1 (555) 010-9999",
    "user_id:u1",
    "email:",
    ":",
    "2024-02-30",
    "9999-12-31T23:59:60Z",
    "x" * 65_536,
)
# Seconds of a Timestamp: the edges of years 1..9999, one past them, and far beyond.
SECONDS = (0, -1, 1_700_000_000, -62_135_596_800, 253_402_300_799, -62_135_596_801, 253_402_300_800, 2**62, -(2**62))
NANOS = (0, 1, 999_999_999, 1_000_000_000, -1, 2**31 - 1, -(2**31))


class Fuzzer:
    """Random well-typed protobuf messages, built from their descriptors, from a seeded `random`."""

    def __init__(self, seed: int, pool: list[str]) -> None:
        self.rng = random.Random(seed)
        self.pool = pool  # strings worth reusing: ids the services know, the write key

    def string(self) -> str:
        rng = self.rng
        roll = rng.random()
        if roll < 0.35 and self.pool:
            return rng.choice(self.pool)
        if roll < 0.7:
            return rng.choice(NASTY)
        alphabet = "abcXYZ019_-.:@ \x00\x7f\u00e9\u4e2d\U0001f600"
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))

    def integer(self, kind: int) -> int:
        low, high = INT_RANGES[kind]
        return self.rng.choice((0, 1, -1 if low < 0 else 2, low, high, self.rng.randint(low, high), 100, 10_000))

    def scalar(self, field: FieldDescriptor, depth: int):
        kind = field.type
        if kind == FieldDescriptor.TYPE_STRING:
            return self.string()
        if kind == FieldDescriptor.TYPE_BYTES:
            return self.string().encode()
        if kind == FieldDescriptor.TYPE_BOOL:
            return self.rng.random() < 0.5
        if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
            value = self.rng.choice(FLOATS)
            return (
                max(min(value, 3e38), -3e38) if kind == FieldDescriptor.TYPE_FLOAT and math.isfinite(value) else value
            )
        if kind == FieldDescriptor.TYPE_ENUM:
            declared = [v.number for v in field.enum_type.values]
            return self.rng.choice([*declared, 99, -7])  # open enums carry numbers nobody declared
        return self.integer(kind)

    def fill(self, message: Message, depth: int = 0) -> Message:
        name = message.DESCRIPTOR.full_name
        if name == "google.protobuf.Timestamp" or name == "google.protobuf.Duration":
            message.seconds = self.rng.choice(SECONDS)
            message.nanos = self.rng.choice(NANOS)
            return message
        if name == "google.protobuf.Struct":
            self.struct(message, depth)
            return message
        if name == "google.protobuf.Value":
            self.value(message, depth)
            return message
        for field in message.DESCRIPTOR.fields:
            if self.rng.random() < 0.35:
                continue  # empty fields are part of the fuzz
            self.set(message, field, depth)
        return message

    def set(self, message: Message, field: FieldDescriptor, depth: int) -> None:
        is_message = field.type == FieldDescriptor.TYPE_MESSAGE
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entries = getattr(message, field.name)
            key_field, value_field = (
                field.message_type.fields_by_name["key"],
                field.message_type.fields_by_name["value"],
            )
            for _ in range(self.rng.choice((0, 1, 3, 8))):
                key = self.scalar(key_field, depth)
                if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    self.fill(entries[key], depth + 1)
                else:
                    entries[key] = self.scalar(value_field, depth)
            return
        if field.is_repeated:
            items = getattr(message, field.name)
            for _ in range(self.rng.choice((0, 1, 2, 5, 40 if depth == 0 else 2))):
                if is_message:
                    if depth < 6:
                        self.fill(items.add(), depth + 1)
                else:
                    items.append(self.scalar(field, depth))
            return
        if is_message:
            if depth < 6:
                self.fill(getattr(message, field.name), depth + 1)
                getattr(message, field.name).SetInParent()
            return
        setattr(message, field.name, self.scalar(field, depth))

    def struct(self, struct, depth: int) -> None:
        # Now and then far deeper than the parser's recursion limit (100 messages; 3 per Struct level).
        if depth == 0 and self.rng.random() < 0.05:
            inner = struct
            for _ in range(self.rng.choice((20, 40))):
                inner = inner.fields["d"].struct_value
            inner.fields["leaf"].string_value = self.string()
            return
        for _ in range(self.rng.choice((0, 1, 3))):
            self.value(struct.fields[self.string()[:64]], depth + 1)

    def value(self, value, depth: int) -> None:
        kind = self.rng.choice(("null", "number", "string", "bool", "struct", "list"))
        if depth > 8 and kind in ("struct", "list"):
            kind = "string"
        if kind == "null":
            value.null_value = 0
        elif kind == "number":
            value.number_value = self.rng.choice(FLOATS)
        elif kind == "string":
            value.string_value = self.string()
        elif kind == "bool":
            value.bool_value = True
        elif kind == "struct":
            self.struct(value.struct_value, depth + 1)
            value.struct_value.SetInParent()
        else:
            for _ in range(self.rng.choice((0, 1, 3))):
                self.value(value.list_value.values.add(), depth + 1)
            value.list_value.SetInParent()


def harvest(message: Message, pool: list[str]) -> None:
    """Ids a response names, for later requests to reuse."""
    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                continue
            for item in value if field.is_repeated else (value,):
                harvest(item, pool)
        elif field.type == FieldDescriptor.TYPE_STRING and field.name.endswith(("id", "winner", "loser", "_ids")):
            for item in value if field.is_repeated else (value,):
                if item and item not in pool and len(pool) < 200:
                    pool.append(item)


# ---------------------------------------------------------------------------------------------- hypothesis


def nasty_text(pool: tuple[str, ...] = (), *, surrogates: bool = False) -> st.SearchStrategy[str]:
    """Strings worth sending: the nasty table, ids a service knows, and any unicode (lone surrogates only
    where the wire can carry them: JSON text, never protobuf, whose strings must be UTF-8)."""
    blacklist = () if surrogates else ("Cs",)
    options = [
        st.sampled_from(NASTY),
        st.text(st.characters(blacklist_categories=blacklist), max_size=40),
        st.text(string.ascii_letters + string.digits + "_-.:@", min_size=1, max_size=20),
    ]
    if pool:
        options.append(st.sampled_from(pool))
    return st.one_of(options)


_TIMESTAMPS = st.tuples(
    st.one_of(st.sampled_from(SECONDS), st.integers(-(2**63), 2**63 - 1)),
    st.one_of(st.sampled_from(NANOS), st.integers(-(2**31), 2**31 - 1)),
)


def _scalar(field: FieldDescriptor, text: st.SearchStrategy[str]) -> st.SearchStrategy:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return text
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), text.map(str.encode))
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return st.one_of(st.sampled_from(FLOATS), st.floats())
    if kind == FieldDescriptor.TYPE_FLOAT:
        return st.one_of(st.sampled_from(FLOATS), st.floats(width=32))
    if kind == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([*(v.number for v in field.enum_type.values), 99, -7])
    low, high = INT_RANGES[kind]
    return st.one_of(st.sampled_from([0, 1, low, high, 100, 10_000]), st.integers(low, high))


def _json_value(text: st.SearchStrategy[str]) -> st.SearchStrategy:
    leaves = st.one_of(st.none(), st.booleans(), st.sampled_from(FLOATS), st.floats(), text)
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(text.map(lambda s: s[:64]), inner, max_size=4)
        ),
        max_leaves=12,
    )


def _deep_struct(levels: int) -> dict:
    tree: dict = {"leaf": "x"}
    for _ in range(levels):
        tree = {"d": tree}
    return tree


@st.composite
def _message(draw, descriptor: Descriptor, text: st.SearchStrategy[str], depth: int, overrides) -> Message:
    cls = message_factory.GetMessageClass(descriptor)
    message = cls()
    name = descriptor.full_name
    if name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
        message.seconds, message.nanos = draw(_TIMESTAMPS)
        return message
    if name == "google.protobuf.Struct":
        # Now and then far deeper than the parser's recursion limit (100 messages; 3 per Struct level).
        tree = draw(st.one_of(st.dictionaries(text.map(lambda s: s[:64]), _json_value(text), max_size=4),
                              st.sampled_from([20, 40]).map(_deep_struct)))  # fmt: skip
        message.update(tree)
        return message
    if name == "google.protobuf.Value":
        message.string_value = draw(text)
        return message
    if name == "google.protobuf.ListValue":
        message.extend(draw(st.lists(text, max_size=3)))
        return message
    for field in descriptor.fields:
        override = overrides.get(f"{name}.{field.name}")
        if not draw(st.booleans()):
            continue  # empty fields are part of the fuzz
        if override is not None:
            value = draw(override)
            if field.is_repeated:
                getattr(message, field.name).extend(value if isinstance(value, list) else [value])
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(message, field.name).CopyFrom(value)
            else:
                setattr(message, field.name, value)
            continue
        is_message = field.type == FieldDescriptor.TYPE_MESSAGE
        if is_message and field.message_type.GetOptions().map_entry:
            key_field, value_field = (
                field.message_type.fields_by_name["key"],
                field.message_type.fields_by_name["value"],
            )
            entries = getattr(message, field.name)
            for _ in range(draw(st.sampled_from((1, 3, 8)))):
                key = draw(_scalar(key_field, text))
                if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    if depth < 5:
                        entries[key].CopyFrom(draw(_message(value_field.message_type, text, depth + 1, overrides)))
                else:
                    entries[key] = draw(_scalar(value_field, text))
            continue
        if is_message and depth >= 5:
            continue
        if field.is_repeated:
            count = draw(st.sampled_from((1, 2, 5, 40 if depth == 0 else 2)))
            if is_message:
                items = getattr(message, field.name)
                for _ in range(count):
                    items.add().CopyFrom(draw(_message(field.message_type, text, depth + 1, overrides)))
            else:
                getattr(message, field.name).extend(
                    draw(st.lists(_scalar(field, text), min_size=count, max_size=count))
                )
        elif is_message:
            getattr(message, field.name).CopyFrom(draw(_message(field.message_type, text, depth + 1, overrides)))
        else:
            setattr(message, field.name, draw(_scalar(field, text)))
    return message


def messages(
    descriptor: Descriptor, *, pool: tuple[str, ...] = (), overrides: dict[str, st.SearchStrategy] | None = None
) -> st.SearchStrategy[Message]:
    """Well-typed messages of `descriptor` with hostile contents. `overrides` maps "<message>.<field>" (full
    message name) to a strategy for that field's value: segment-language text for a definition, a plausible
    journey document, the write key."""
    return _message(descriptor, nasty_text(pool), 0, overrides or {})


# ---------------------------------------------------------------------------------------------- segment language

_PATHS = ("traits.plan", "traits.age", "traits.`first name`", "computed.orders", "consent.email", "scores.churn_risk",
          "traits.a.b.c", "entry.x", "properties.total", "traits", "traits.")  # fmt: skip
_EVENT_PATHS = ("properties.total", "context.ip", "properties.`a b`", "properties")
_SCALARS = ('"pro"', '""', '"\\u0000"', '"\\"', "1", "-1.5", "1e308", "1e999", "true", "false", "null", "-", '"😀"')
_OPS = ("=", "!=", "<", "<=", ">", ">=", "in", "contains", "starts_with", "exists", "==", "~")
_DURATIONS = ("30d", "0s", "1w", "99999999999d", "12h", "-1d", "d", "15m")


@st.composite
def segment_text(draw, depth: int = 0) -> str:
    """Segment-language text: mostly grammatical (so it reaches the compiler and the evaluator), sometimes
    broken at a random place (so it exercises every error path of the parser)."""
    if depth > 3 or draw(st.integers(0, 3)) == 0:
        kind = draw(st.sampled_from(("condition", "in", "count", "sum", "performed", "in_segment", "now", "exists")))
        path = draw(st.sampled_from(_PATHS))
        if kind == "condition":
            text = f"{path} {draw(st.sampled_from(_OPS))} {draw(st.sampled_from(_SCALARS))}"
        elif kind == "in":
            items = draw(st.lists(st.sampled_from(_SCALARS), max_size=6))
            text = f"{path} in [{', '.join(items)}]"
        elif kind == "count":
            text = (
                f"count(event = {draw(st.sampled_from(_SCALARS))}, within {draw(st.sampled_from(_DURATIONS))}) "
                f"{draw(st.sampled_from(_OPS))} {draw(st.sampled_from(_SCALARS))}"
            )
        elif kind == "sum":
            agg = draw(st.sampled_from(("sum", "avg", "min", "max", "median")))
            text = (
                f'{agg}({draw(st.sampled_from(_EVENT_PATHS))}, "Order Completed") > {draw(st.sampled_from(_SCALARS))}'
            )
        elif kind == "performed":
            text = f"performed({draw(st.sampled_from(_SCALARS))} and properties.total > 3)"
        elif kind == "in_segment":
            text = f"in_segment({draw(st.sampled_from(_SCALARS))})"
        elif kind == "now":
            text = f"{path} {draw(st.sampled_from(('<', '>=')))} now - {draw(st.sampled_from(_DURATIONS))}"
        else:
            text = f"{path} exists"
    else:
        joiner = draw(st.sampled_from((" and ", " or ", " and not ")))
        parts = draw(st.lists(segment_text(depth + 1), min_size=1, max_size=3))
        text = joiner.join(parts)
        if draw(st.booleans()):
            text = f"({text})"
        if draw(st.integers(0, 5)) == 0:
            text = "not " + text
    if depth == 0 and draw(st.integers(0, 4)) == 0:
        # broken somewhere: cut, a stray character, or a random unicode tail
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.sampled_from(("", "(", ")", '"', "`", "\x00", "\u202e", " and", "[", "😀")))
    return text


def segment_tree() -> st.SearchStrategy:
    """A definition's JSON tree form: plausible nodes and hostile JSON."""
    node = st.fixed_dictionaries(
        {"field": st.sampled_from(_PATHS), "op": st.sampled_from(_OPS)},
        optional={"value": _json_value(nasty_text())},
    )
    return st.recursive(
        st.one_of(node, _json_value(nasty_text())),
        lambda inner: st.one_of(
            st.fixed_dictionaries({"and": st.lists(inner, max_size=3)}),
            st.fixed_dictionaries({"or": st.lists(inner, max_size=3)}),
            st.fixed_dictionaries({"not": inner}),
        ),
        max_leaves=8,
    )


# ---------------------------------------------------------------------------------------------- gRPC verdicts

FAILURES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS})


def show(message: Message | bytes | str, limit: int = 600) -> str:
    text = message.hex() if isinstance(message, bytes) else str(message).replace("\n", " ")
    return text if len(text) < limit else text[:limit] + "…"


def json_dumps_loose(value) -> bytes:
    """JSON as a careless client writes it: NaN and Infinity as bare words, lone surrogates escaped."""
    return json.dumps(value, allow_nan=True, ensure_ascii=True).encode()


# ---------------------------------------------------------------------------------------------- downstream


async def dead_letters(nats_url: str, marker: bytes = b"") -> list[str]:
    """Every dead-lettered message (containing `marker`, when given) as "<subject>: <reason> <detail>"."""
    import nats

    from cdp_kit.bus import subjects
    from cdp_kit.bus.consumer import DLQ_DETAIL, DLQ_REASON

    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(subjects.DLQ)
        found = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1) if info.state.messages else ():
            try:
                message = await js.get_msg(subjects.DLQ, seq)
            except Exception:
                continue
            if marker in message.data:
                headers = message.headers or {}
                found.append(f"{message.subject}: {headers.get(DLQ_REASON, '')} {headers.get(DLQ_DETAIL, '')[:300]}")
        return found
    finally:
        await nc.close()
