"""The segment language's syntax tree: frozen, hashable dataclasses that both written forms map onto.

`parse` (text) and `from_json` (JSON tree) validate and build these; `to_text` and `to_json` write them back.
Literal values are kept as written (int stays int, float stays float) and compared by type as well as value,
so `traits.x = 1`, `traits.x = 1.0` and `traits.x = true` are three different nodes (Python alone would
call them equal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from cdp_kit.durations import format_duration, parse_duration
from cdp_kit.errors import InvalidArgument
from cdp_kit.profile_fields import ROOTS as ROOTS  # a field path starts with one of them
from cdp_lang.values import epoch_of_text

EVENT_ROOTS = ("properties", "context")
EVENT_TYPES = ("track", "page", "screen", "identify", "group", "any")
COMPARISONS = ("=", "!=", "<", "<=", ">", ">=")
ORDERINGS = ("<", "<=", ">", ">=")
CONDITION_OPS = (*COMPARISONS, "in", "contains", "starts_with", "exists")
# The operators whose other side may be another field: the comparisons, `in`, `contains` and `starts_with`.
FIELD_OPS = (*COMPARISONS, "in", "contains", "starts_with")
# Arithmetic on the sides of a comparison, by precedence: * and / bind tighter than + and -, and each
# associates to the left (`a - b - c` is `(a - b) - c`).
ARITHMETIC = ("+", "-", "*", "/")
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
AGGREGATES = ("count", "sum", "avg", "min", "max")
# Where an aggregate reads a property; count reads none. For count and sum a person without the computed
# trait (no matching event yet) has the value 0; for the others there is no value.
VALUE_AGGREGATES = ("sum", "avg", "min", "max")
ZERO_WHEN_MISSING = ("count", "sum")

Scalar = str | int | float | bool


@dataclass(frozen=True, slots=True)
class Now:
    """`now`, `now - 30d`, `now + 3d`: the evaluation time plus `offset` seconds."""

    offset: float = 0.0


@dataclass(frozen=True, slots=True)
class Date:
    """`date("2026-01-01")`: a fixed instant, kept as written."""

    text: str

    @property
    def epoch(self) -> float:
        seconds = epoch_of_text(self.text)
        assert seconds is not None, "Date nodes are built from validated text"
        return seconds


TimeValue = Now | Date


@dataclass(frozen=True, slots=True)
class FieldRef:
    """Another profile field as the value compared with: `traits.last_order_total > traits.avg_order_total`."""

    path: tuple[str, ...]

    @property
    def field(self) -> str:
        return f"{self.path[0]}.{self.path[1]}"


@dataclass(frozen=True, slots=True)
class Percentile:
    """`percentile(scores.clv_value_365d, 90)`: the value below which `percent` % of the population's values of
    the field lie (linear interpolation between the closest ranks). `percent` is kept as a float in [0, 100],
    so `90` and `90.0` are one node. Only an evaluator that holds a population can give it a value."""

    path: tuple[str, ...]
    percent: float

    @property
    def field(self) -> str:
        return f"{self.path[0]}.{self.path[1]}"


@dataclass(frozen=True, slots=True, eq=False)
class Arithmetic:
    """`left op right` on numbers, one of + - * /, on a side of a comparison: `2 * traits.avg_order`.

    Operands are numbers (kept as written, like literals), fields, percentiles and other arithmetic. What it
    means is in `cdp_lang.values.calculate`: a field without a finite number, a division by zero or a result
    that is not finite is no value, and a comparison with no value is false."""

    op: str
    left: Operand
    right: Operand

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Arithmetic) and (self.op, typed(self.left), typed(self.right)) == (
            other.op,
            typed(other.left),
            typed(other.right),
        )

    def __hash__(self) -> int:
        return hash((Arithmetic, self.op, typed(self.left), typed(self.right)))


Operand = int | float | FieldRef | Percentile | Arithmetic
Value = Scalar | tuple[Scalar, ...] | TimeValue | FieldRef | Percentile | Arithmetic | None


def typed(value: Any) -> Any:
    """A key that tells 1, 1.0 and True apart (Python's == does not)."""
    if isinstance(value, tuple):
        return tuple(typed(item) for item in value)
    return (type(value).__name__, value)


@dataclass(frozen=True, slots=True, eq=False)
class Condition:
    """`<path> <op> <value>` on a profile field. `path` holds every segment: ("traits", "address", "city")."""

    path: tuple[str, ...]
    op: str
    # a scalar; a tuple for `in`; Now/Date for a time comparison; FieldRef for another field (comparisons,
    # `in`, `contains` and `starts_with`); Percentile for a population percentile; None for `exists`. Never Arithmetic: a
    # comparison with arithmetic on either side is a `Comparison`.
    value: Value = None

    @property
    def field(self) -> str:
        return f"{self.path[0]}.{self.path[1]}"

    @property
    def sub(self) -> tuple[str, ...]:
        return self.path[2:]

    @property
    def is_time(self) -> bool:
        return isinstance(self.value, Now | Date)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Condition) and (self.path, self.op, typed(self.value)) == (
            other.path,
            other.op,
            typed(other.value),
        )

    def __hash__(self) -> int:
        return hash((Condition, self.path, self.op, typed(self.value)))


@dataclass(frozen=True, slots=True, eq=False)
class Comparison:
    """A comparison of numbers with arithmetic on a side, or something other than a field on the left:
    `traits.ltv > 2 * traits.avg_order`, `computed.orders_30d - computed.orders_90d / 3 < 0`, `5 < traits.x`.

    Both sides are numbers; it holds when both have a value and compare so (`!=` included). Build it with
    `comparison(...)`, which keeps a plain `<field> <op> <field, literal or percentile>` a `Condition`, so
    each comparison has one node."""

    left: Operand
    op: str
    right: Operand

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Comparison) and (typed(self.left), self.op, typed(self.right)) == (
            typed(other.left),
            other.op,
            typed(other.right),
        )

    def __hash__(self) -> int:
        return hash((Comparison, typed(self.left), self.op, typed(self.right)))


@dataclass(frozen=True, slots=True, eq=False)
class EventCondition:
    """A condition on an event's `properties.<path>` or `context.<path>` inside an event predicate."""

    path: tuple[str, ...]
    op: str
    value: Scalar | tuple[Scalar, ...] | None = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EventCondition) and (self.path, self.op, typed(self.value)) == (
            other.path,
            other.op,
            typed(other.value),
        )

    def __hash__(self) -> int:
        return hash((EventCondition, self.path, self.op, typed(self.value)))


@dataclass(frozen=True, slots=True)
class EventPredicate:
    """Which events an aggregate looks at: names (empty = any), a type, and `and`-ed property conditions.

    A `where` condition is an `EventCondition` (an event field against a value) or a `Comparison` of numbers
    with arithmetic over the event's own fields (`properties.total > properties.shipping * 2`: its `FieldRef`s
    are `properties.<path>` and `context.<path>`, never a profile field nor a percentile), in written order."""

    names: tuple[str, ...] = ()  # sorted, distinct
    type: str = "track"
    where: tuple[EventCondition | Comparison, ...] = ()


@dataclass(frozen=True, slots=True, eq=False)
class Aggregate:
    """`count(<events>, within 30d) >= 3`, `sum(properties.total, <events>) > 500` and the like."""

    op: str
    event: EventPredicate
    property: tuple[str, ...] | None  # ("properties", "total") for sum/avg/min/max, None for count
    within: float | None  # seconds; None is the person's whole history
    comparison: str
    value: int | float

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Aggregate) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash((Aggregate, self._key()))

    def _key(self) -> tuple[Any, ...]:
        return (self.op, self.event, self.property, self.within, self.comparison, typed(self.value))


@dataclass(frozen=True, slots=True)
class Performed:
    """`performed(<events>, within 14d)`: at least one matching event (count >= 1)."""

    event: EventPredicate
    within: float | None = None


@dataclass(frozen=True, slots=True)
class InSegment:
    segment: str


@dataclass(frozen=True, slots=True)
class Not:
    operand: Node


@dataclass(frozen=True, slots=True)
class And:
    operands: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Or:
    operands: tuple[Node, ...]


Node = And | Or | Not | Condition | Comparison | Aggregate | Performed | InSegment

# How deeply `and`, `or` and `not` may nest. A segment travels as a google.protobuf.Struct (Segment.tree),
# where each level of the tree costs up to four message levels, and protobuf refuses to decode messages
# nested deeper than 100: the deepest definition the language allows, an aggregate with a `where` list
# under 17 levels of `and`, is the most a ListSegmentsResponse still decodes. 12 leaves a margin of five
# levels, is far more than any definition written by hand or by a builder, and keeps every recursive walk
# over the tree (compile, to_text, to_json) shallow. Arithmetic counts too: each operator is a level below
# its comparison (in the JSON tree it costs what an `and` does), so `a and b * c + d > 1` is 3 levels, and
# so is arithmetic in an event predicate, below its aggregate (`a and count("X" and properties.p * 2 > 1) > 0`
# is 2).
MAX_DEPTH = 12


def percent_of(value: Any) -> float:
    """A percentile's percent as a float in [0, 100]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Invalid(f"{value!r} is not a percent: use a number from 0 to 100, like 90")
    try:
        percent = float(value)
    except OverflowError:
        percent = math.inf
    if not 0.0 <= percent <= 100.0:
        raise Invalid(f"{value!r} is not a percent: use a number from 0 to 100, like 90")
    return percent + 0.0  # -0.0 is 0.0


def percent_text(percent: float) -> str:
    """90.0 is written 90, 99.5 stays 99.5."""
    return str(int(percent)) if percent == int(percent) else repr(percent)


def leaves(operand: Any) -> list[Any]:
    """The numbers, fields and percentiles of an operand (an arithmetic's, left to right; else itself)."""
    if isinstance(operand, Arithmetic):
        return [*leaves(operand.left), *leaves(operand.right)]
    return [operand]


def percentiles_in(node: Node) -> list[Percentile]:
    """The percentiles a definition compares with, in order of appearance (inside arithmetic too)."""
    if isinstance(node, Not):
        return percentiles_in(node.operand)
    if isinstance(node, And | Or):
        return [p for operand in node.operands for p in percentiles_in(operand)]
    if isinstance(node, Condition) and isinstance(node.value, Percentile):
        return [node.value]
    if isinstance(node, Comparison):
        return [leaf for leaf in (*leaves(node.left), *leaves(node.right)) if isinstance(leaf, Percentile)]
    return []


def arithmetic_depth(operand: Any) -> int:
    """Levels of arithmetic in an operand: 0 for a number, a field or a percentile."""
    if isinstance(operand, Arithmetic):
        return 1 + max(arithmetic_depth(operand.left), arithmetic_depth(operand.right))
    return 0


def depth(node: Node) -> int:
    """Levels of `and`, `or`, `not` and arithmetic above the deepest leaf: 0 for a plain condition."""
    if isinstance(node, Not):
        return 1 + depth(node.operand)
    if isinstance(node, And | Or):
        return 1 + max(depth(operand) for operand in node.operands)
    if isinstance(node, Comparison):
        return max(arithmetic_depth(node.left), arithmetic_depth(node.right))
    if isinstance(node, Aggregate | Performed):
        # arithmetic in the event predicate nests below the aggregate, as it does below a comparison
        return max((depth(c) for c in node.event.where if isinstance(c, Comparison)), default=0)
    return 0


def comparison(left: Operand, op: str, right: Any) -> Condition | Comparison:
    """The node of `left op right`: a `Condition` when the left side is a plain field and the right one has
    no arithmetic (as before arithmetic existed), else a `Comparison` of numbers.

    Raises Invalid for a comparison no person's values can change (no field on either side), and for an
    operator other than < <= > >= with a percentile (a percentile is compared by order)."""
    if isinstance(left, FieldRef) and not isinstance(right, Arithmetic):
        return Condition(left.path, op, right)
    found = [*leaves(left), *leaves(right)]
    if not any(isinstance(leaf, FieldRef | Percentile) for leaf in found):
        raise Invalid("compares numbers only, so no person's values change it: compare a field")
    if op not in ORDERINGS and any(isinstance(leaf, Percentile) for leaf in found):
        raise Invalid(f"{op!r} cannot compare with a percentile: use <, <=, > or >=")
    return Comparison(left, op, right)


class Invalid(ValueError):
    """A rule broken by a definition; each written form turns it into an error at its own position."""


def duration(value: Any) -> float:
    """Whole seconds from "30d"-style text (or a number of seconds)."""
    try:
        seconds = parse_duration(value, "duration")
    except InvalidArgument as error:
        raise Invalid(error.description) from None
    if seconds != int(seconds):
        raise Invalid(f"{value!r} is not a whole number of seconds")
    return seconds


def duration_text(seconds: float) -> str:
    return str(format_duration(seconds))


def check_date(text: Any) -> str:
    if not isinstance(text, str) or epoch_of_text(text) is None:
        raise Invalid(f'{text!r} is not an ISO-8601 date or time: use e.g. "2026-01-01" or "2026-01-01T12:00:00Z"')
    return text


def check_event_type(value: Any) -> str:
    if value not in EVENT_TYPES:
        raise Invalid(f"{value!r} is not an event type: use one of {', '.join(EVENT_TYPES)}")
    return value


# The key of a `where` document that holds its comparisons with arithmetic ("$" keys are the profile
# service's own: no event path is spelled so).
EXPRESSIONS = "$expr"
_WHERE_KEYS = {
    "=": "$eq",
    "!=": "$ne",
    "<": "$lt",
    "<=": "$lte",
    ">": "$gt",
    ">=": "$gte",
    "in": "$in",
    "contains": "$contains",
    "starts_with": "$starts_with",
    "exists": "$exists",
}


def path_key(path: tuple[str, ...]) -> str:
    """One string per path, for keys and names: the steps joined by dots, a step that holds a dot itself
    between backticks (`consent.`purpose:ads.personalised``, the path `("consent", "purpose:ads.personalised")`,
    is not `consent.purpose:ads.personalised`, whose key is `purpose:ads`). A path without such a step keeps
    the plain join it always had (a percentile's key, `percentiles.spec_of`)."""
    return ".".join(f"`{step}`" if "." in step else step for step in path)


def check_event_path(path: tuple[str, ...]) -> None:
    """Invalid when a step of an event field's path (`properties.<path>`, `context.<path>`) holds a dot: the
    profile service's filter names an event field by its steps joined with dots (`where_key`) and reads
    each dot as a step into an object, so a property named `a.b` cannot be told from `b` inside `a`. A
    profile field's step may hold one (a consent key `purpose:ads.personalised`): its flat key is read as it is."""
    for step in path[1:]:
        if "." in step:
            raise Invalid(
                f"an event field's name cannot hold a dot ({step!r}): the profile service reads a dot in an event "
                "field's path as a step into an object; write it as steps (properties.a.b)"
            )


def where_key(path: tuple[str, ...]) -> str:
    """The profile service's name for an event path: `total` for properties.total, `$context.ip` for context.ip."""
    rest = ".".join(path[1:])
    return rest if path[0] == "properties" else f"$context.{rest}"


_EXPRESSION_KEYS = {"+": "$add", "-": "$subtract", "*": "$multiply", "/": "$divide"}


def expression_document(operand: Any) -> Any:
    """A side of an event comparison as the profile service's `$expr` writes it: a number, {"path": <its
    path>} or {"$add" | "$subtract" | "$multiply" | "$divide": [<operand>, <operand>]}."""
    if isinstance(operand, Arithmetic):
        return {_EXPRESSION_KEYS[operand.op]: [expression_document(operand.left), expression_document(operand.right)]}
    if isinstance(operand, FieldRef):
        return {"path": where_key(operand.path)}
    return operand


def where_document(conditions: tuple[EventCondition | Comparison, ...]) -> dict[str, Any]:
    """The profile computed trait's `where`: path -> scalar (equal), list (one of) or operator object, and
    the comparisons with arithmetic, in order, under "$expr": [{"$gt": [<operand>, <operand>]}, ...].

    Raises Invalid naming the condition when two conditions on one path need the same operator key.
    """
    by_key: dict[str, list[EventCondition]] = {}
    expressions: list[dict[str, Any]] = []
    for condition in dict.fromkeys(conditions):  # an exact repeat says nothing new
        if isinstance(condition, Comparison):
            sides = [expression_document(condition.left), expression_document(condition.right)]
            expressions.append({_WHERE_KEYS[condition.op]: sides})
            continue
        key = where_key(condition.path)
        if key == EXPRESSIONS:
            raise Invalid(f"{'.'.join(condition.path)} is a key the profile service reserves; rename the property")
        by_key.setdefault(key, []).append(condition)
    document: dict[str, Any] = {}
    for key, group in by_key.items():
        if len(group) == 1 and group[0].op in ("=", "in"):
            only = group[0]
            document[key] = list(only.value) if only.op == "in" else only.value  # type: ignore[arg-type]
            continue
        operators: dict[str, Any] = {}
        for condition in group:
            operator = _WHERE_KEYS[condition.op]
            value = True if condition.op == "exists" else condition.value
            value = list(value) if isinstance(value, tuple) else value
            if operator in operators:
                raise Invalid(
                    f"two conditions {condition.op!r} on {'.'.join(condition.path)} ask for different values; keep one"
                )
            operators[operator] = value
        document[key] = operators
    if expressions:
        document[EXPRESSIONS] = expressions
    return document
