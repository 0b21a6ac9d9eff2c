"""From a node to a `CompiledSegment`: one plan, evaluated per profile (`evaluate`) or per population
(`evaluate_columns`), plus what the engine needs to know about it (fields, segments, computed traits, timers).

Event conditions never reach the evaluators as events: each aggregate becomes a profile computed-trait
definition (the profile service keeps it up to date, window expiry included) and a test on
`computed.<name>`. The name is a hash of the definition, so every segment asking the same question shares
one computed trait:

    count(event = "Order Completed" and properties.total > 50, within 30d) >= 3
    -> {"name": "seg_<16 hex>", "op": "count", "event_type": "track", "event_names": ["Order Completed"],
        "where": {"total": {"$gt": 50}}, "window": "30d"}   and   computed.seg_<16 hex> >= 3

Arithmetic inside the event predicate goes into the definition's `where` under "$expr" (see
`nodes.where_document`): `properties.total > properties.shipping * 2` ->
`{"$expr": [{"$gt": [{"path": "total"}, {"$multiply": [{"path": "shipping"}, 2]}]}]}`.

For count and sum a person the trait has no value for (no matching event yet) counts as 0. So does a
named computed trait of kind count or sum (`computed.orders < 1`: someone who never ordered has 0
orders), but its kind is not in its name: the caller, who can ask the profile service, names those fields
(`compile_segment(..., counted={"computed.orders"})`). A field named there, read without a sub-path, is
0 where the person has no number: a comparison with a number becomes a `NumberTest` with default 0 (as an
aggregate's), any other test holds for a person without a value when it holds for 0 (`exists` does), and
in arithmetic it is 0. A comparison with another field or a percentile and a time comparison still read
it as it is (missing stays missing there).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cdp_kit.profile_fields import COMPUTED, field_key
from cdp_lang.columns import Columns
from cdp_lang.nodes import (
    ZERO_WHEN_MISSING,
    Aggregate,
    And,
    Arithmetic,
    Comparison,
    Condition,
    Date,
    EventCondition,
    EventPredicate,
    FieldRef,
    InSegment,
    Node,
    Not,
    Now,
    Or,
    Percentile,
    Performed,
    duration_text,
    where_document,
)
from cdp_lang.percentiles import PercentileSpec, spec_of
from cdp_lang.plan import (
    COMPARE,
    AllOf,
    AnyOf,
    Calculation,
    Const,
    Expression,
    ExpressionTest,
    FieldNumber,
    FieldTest,
    Member,
    Negate,
    NumberTest,
    OneOf,
    PercentileNumber,
    PercentileTest,
    Plan,
    Test,
    TimeTest,
    moving_tests,
)
from cdp_lang.row import NO_PERCENTILES, RowPredicate, flip_time, row_predicate
from cdp_lang.vector import VectorPredicate, vector_predicate

NO_MEMBERS: Mapping[str, np.ndarray] = {}


def computed_trait(
    op: str, event: EventPredicate, property_path: tuple[str, ...] | None, within: float | None
) -> dict[str, Any]:
    """The profile computed-trait definition an aggregate reads, named by the hash of the rest of it."""
    definition: dict[str, Any] = {"op": op, "event_type": event.type, "event_names": list(event.names)}
    if property_path is not None:
        definition["property"] = ".".join(property_path[1:])
    definition["where"] = where_document(event.where)
    if within is not None:
        definition["window"] = duration_text(within)
    canonical = json.dumps(definition, sort_keys=True, separators=(",", ":"))
    return {"name": "seg_" + hashlib.sha256(canonical.encode()).hexdigest()[:16], **definition}


def literal_test(field: str, sub: tuple[str, ...], op: str, value: Any) -> Test:
    """`field.sub op value` with the literal typed for the evaluators: numbers as floats, `in` lists split by
    type. Profile conditions and the conditions on an event inside an aggregate both lower through here."""
    if op == "in":
        assert isinstance(value, tuple)
        return Test(
            field,
            sub,
            "in",
            OneOf(
                numbers=frozenset(float(v) for v in value if not isinstance(v, bool | str)),
                strings=frozenset(v for v in value if isinstance(v, str)),
                bools=frozenset(v for v in value if isinstance(v, bool)),
            ),
        )
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = float(value)
    return Test(field, sub, op, value)


def event_expression(operand: object) -> Expression:
    """A side of a comparison inside an event predicate, over a record of the event's two roots
    ({"properties": ..., "context": ...}): `properties.total` reads `total` below "properties"."""
    if isinstance(operand, Arithmetic):
        return Calculation(operand.op, event_expression(operand.left), event_expression(operand.right))
    if isinstance(operand, FieldRef):
        return FieldNumber(operand.path[0], operand.path[1:])
    assert isinstance(operand, int | float) and not isinstance(operand, bool)
    return Const(float(operand))


def event_test(condition: EventCondition | Comparison) -> Test | ExpressionTest:
    """A condition of an event predicate as a test on a record of the event's two roots, so that
    `properties.total > 50` means what `traits.total > 50` means on a profile, and `properties.total >
    properties.shipping * 2` what the same arithmetic means there."""
    if isinstance(condition, Comparison):
        return ExpressionTest(event_expression(condition.left), condition.op, event_expression(condition.right))
    return literal_test(condition.path[0], condition.path[1:], condition.op, condition.value)


@dataclass(frozen=True, eq=False)
class CompiledSegment:
    """A segment ready to evaluate. Build it with `compile_segment`."""

    node: Node
    plan: Plan
    fields: frozenset[str]  # the field keys it reads, e.g. "traits.plan", "computed.seg_..."
    segments: frozenset[str]  # the segments it reads membership of (in_segment)
    computed_traits: tuple[dict[str, Any], ...]  # profile definitions its aggregates read, each once
    time_dependent: bool  # compares a field with `now`: membership can change as time passes
    # the population percentiles it compares with, each once: the per-profile evaluator reads their values
    # from the mapping `compile_segment` was given; `evaluate_columns` from its Columns
    percentiles: tuple[PercentileSpec, ...]
    # the counted fields (`compile_segment(counted=...)`) it reads as 0 where a person has no number: what a
    # caller stores with the definition to compile it the same way again
    counted: frozenset[str]
    _row: RowPredicate = field(repr=False)
    _vector: VectorPredicate = field(repr=False)
    _moving: tuple[TimeTest, ...] = field(repr=False)

    @property
    def predicate(self) -> RowPredicate:
        """`evaluate` without defaults: (record, members, now) -> bool, for callers on a hot path."""
        return self._row

    def evaluate(self, record: Mapping[str, Any], members: Container[str] = (), now: float | None = None) -> bool:
        """Whether one person (flat field key -> value) is in the segment; `members`: segments they are in."""
        return self._row(record, members, time.time() if now is None else now)

    def next_change(
        self, record: Mapping[str, Any], members: Container[str] = (), now: float | None = None
    ) -> float | None:
        """The earliest instant after `now` at which one of the segment's time comparisons flips for this
        person (membership may still hold through it), or None when none ever will."""
        if not self._moving:
            return None
        now = time.time() if now is None else now
        instants = [t for test in self._moving if (t := flip_time(test, record, now)) is not None]
        return min(instants, default=None)

    def evaluate_columns(
        self, columns: Columns, members: Mapping[str, np.ndarray] = NO_MEMBERS, now: float | None = None
    ) -> np.ndarray:
        """Membership of every row (bool array); `members[id]` is a bool array per referenced segment."""
        return self._vector(columns, members, time.time() if now is None else now)


class _Lowering:
    def __init__(self, counted: Container[str] = frozenset()) -> None:
        self.counted = counted
        self.zeroed: set[str] = set()  # the counted fields read as 0 when missing
        self.fields: set[str] = set()
        self.segments: set[str] = set()
        self.computed: dict[str, dict[str, Any]] = {}
        self.percentiles: dict[str, PercentileSpec] = {}

    def lower(self, node: Node) -> Plan:
        if isinstance(node, Condition):
            self.fields.add(node.field)
            return self.condition(node)
        if isinstance(node, Comparison):
            return ExpressionTest(self.expression(node.left), node.op, self.expression(node.right))
        if isinstance(node, Aggregate | Performed):
            return self.aggregate(node)
        if isinstance(node, InSegment):
            self.segments.add(node.segment)
            return Member(node.segment)
        if isinstance(node, Not):
            return Negate(self.lower(node.operand))
        if isinstance(node, And):
            return AllOf(tuple(self.lower(operand) for operand in node.operands))
        if isinstance(node, Or):
            return AnyOf(tuple(self.lower(operand) for operand in node.operands))
        raise TypeError(f"not a segment node: {node!r}")

    def condition(self, node: Condition) -> Plan:
        value = node.value
        if isinstance(value, Now):
            return TimeTest(node.field, node.sub, node.op, value.offset, None)
        if isinstance(value, Date):
            return TimeTest(node.field, node.sub, node.op, None, value.epoch)
        if isinstance(value, FieldRef):
            self.fields.add(value.field)  # a change of either side can change the answer
            return FieldTest(node.field, node.sub, node.op, value.field, value.path[2:])
        if isinstance(value, Percentile):
            # The percentile moves when any person's value of its field changes; the owner of the population
            # re-evaluates for that. For this person, their own value of it is one input among all.
            self.fields.add(value.field)
            spec = self.percentiles.setdefault((found := spec_of(value)).key, found)
            return PercentileTest(node.field, node.sub, node.op, spec.key, spec.field, spec.sub, spec.percent)
        test = literal_test(node.field, node.sub, node.op, value)
        if node.sub or node.field not in self.counted:
            return test
        self.zeroed.add(node.field)
        if type(test.literal) is float and test.op in COMPARE:
            return NumberTest(node.field, test.op, test.literal, 0.0)
        if row_predicate(test)({node.field: 0.0}, (), 0.0):
            # holds for 0: it holds for a person without a number too (a missing field, a null), which
            # `= 0` with default 0 adds (a 0 itself the test already holds for)
            return AnyOf((test, NumberTest(node.field, "=", 0.0, 0.0)))
        return test

    def expression(self, operand: object) -> Expression:
        """A side of a comparison with arithmetic; every field it reads is one the answer depends on."""
        if isinstance(operand, Arithmetic):
            return Calculation(operand.op, self.expression(operand.left), self.expression(operand.right))
        if isinstance(operand, FieldRef):
            self.fields.add(operand.field)
            if operand.field in self.counted and not operand.path[2:]:
                self.zeroed.add(operand.field)
                return FieldNumber(operand.field, (), 0.0)
            return FieldNumber(operand.field, operand.path[2:])
        if isinstance(operand, Percentile):
            self.fields.add(operand.field)  # as for a percentile compared with a field (see `condition`)
            spec = self.percentiles.setdefault((found := spec_of(operand)).key, found)
            return PercentileNumber(spec.key, spec.field, spec.sub, spec.percent)
        assert isinstance(operand, int | float) and not isinstance(operand, bool)
        return Const(float(operand))

    def aggregate(self, node: Aggregate | Performed) -> Plan:
        if isinstance(node, Performed):
            op, property_path, comparison, value = "count", None, ">=", 1.0
        else:
            op, property_path, comparison, value = node.op, node.property, node.comparison, float(node.value)
        definition = computed_trait(op, node.event, property_path, node.within)
        self.computed.setdefault(definition["name"], definition)
        key = field_key(COMPUTED, definition["name"])
        self.fields.add(key)
        return NumberTest(key, comparison, value, 0.0 if op in ZERO_WHEN_MISSING else None)


def compile_segment(
    node: Node, percentiles: Mapping[str, float | None] = NO_PERCENTILES, *, counted: Container[str] = frozenset()
) -> CompiledSegment:
    """The compiled form of a node (from `parse` or `from_json`). `percentiles` is where the per-profile
    evaluator reads the population percentiles the node compares with (`PercentileSpec.key` -> value, None or
    absent: no value, and the comparison is false); its owner keeps it current. `counted`: the field keys of
    named computed traits of kind count or sum ("computed.orders"), read as 0 where a person has no number
    (see the module docstring); `CompiledSegment.counted` says which of them it read."""
    lowering = _Lowering(counted)
    plan = lowering.lower(node)
    moving = tuple(moving_tests(plan))
    return CompiledSegment(
        node=node,
        plan=plan,
        fields=frozenset(lowering.fields),
        segments=frozenset(lowering.segments),
        computed_traits=tuple(lowering.computed.values()),
        time_dependent=bool(moving),
        percentiles=tuple(lowering.percentiles.values()),
        counted=frozenset(lowering.zeroed),
        _row=row_predicate(plan, percentiles),
        _vector=vector_predicate(plan),
        _moving=moving,
    )
