"""Why a person is (or is not) in a segment (`ExplainMembership`): the live definition evaluated for the
person's held fields, node by node.

Nothing here interprets the language a second time. A segment's compiled plan (`CompiledSegment.plan`)
mirrors its node tree: `not` is a `Negate`, `and` an `AllOf`, `or` an `AnyOf` with the operands in order, and
every leaf lowers to one plan (a counted field's comparison to an `AnyOf` of the test and its 0 default). So
the tree and its plan are walked together and each node's result is its own plan evaluated by
`cdp_lang.row.row_predicate`, the function the engine's per-profile predicate is made of, with the engine's
percentile values, the person's memberships and the engine's clock. `matches` is the engine's own predicate
(`Segment.predicate`) at that instant; the root's result is the same evaluation of the same plan.

What the answer says of a leaf is whether it held, and the fields it reads (names, never values): a leaf
that does not hold because a field it reads has no value is MISSING (those fields are named), one that
reads a population percentile with no value yet, or a segment that is not live, is UNKNOWN (the engine
reads it as false). The definition's own text is given per node; the person's values never are (they are
customer data, and the caller holds a read scope, not `privacy:export`).

A person of a partition another replica holds is asked of that replica, found as `ExportPerson` finds it
(`cdp_kit.person_export.Owners`); the forwarded call carries the same mark, so it is never sent on again.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from cdp_kit.errors import FailedPrecondition, NotFound, Unavailable
from cdp_kit.person_export import REQUEST_ERRORS, Owners
from cdp_kit.timestamps import set_seconds
from cdp_lang.nodes import path_key
from cdp_lang.plan import (
    AllOf,
    AnyOf,
    Calculation,
    Expression,
    ExpressionTest,
    FieldNumber,
    FieldTest,
    Member,
    Negate,
    NumberTest,
    PercentileNumber,
    PercentileTest,
    Plan,
    Test,
    TimeTest,
)
from cdp_lang.row import row_predicate
from cdp_lang.values import present
from cdp_segmentation.catalogue import Segment
from cdp_segmentation.domain import Aggregate, And, InSegment, Node, Not, Or, Performed, to_text
from cdp_segmentation.domain.nodes import Comparison, Condition

TRUE = segmentation_pb2.CONDITION_RESULT_TRUE
FALSE = segmentation_pb2.CONDITION_RESULT_FALSE
MISSING = segmentation_pb2.CONDITION_RESULT_MISSING
UNKNOWN = segmentation_pb2.CONDITION_RESULT_UNKNOWN


@dataclass(frozen=True, slots=True)
class Read:
    """One field a leaf's plan reads: its key, the path below it, and whether a missing value reads as 0."""

    field: str
    sub: tuple[str, ...]
    zero: bool = False

    @property
    def name(self) -> str:
        """The field as the language writes it (`path_key`): a name holding a dot between backticks, so
        `consent.`purpose:ads.personalised`` (one consent key) is not `consent.purpose:ads.personalised`
        (the key `purpose:ads`, a step into its value)."""
        root, _, name = self.field.partition(".")
        return path_key((root, name, *self.sub))

    def value(self, record: Mapping[str, Any]) -> Any:
        value = record.get(self.field)
        for key in self.sub:
            if not isinstance(value, dict):
                return None
            value = value.get(key)
        return value


@dataclass(slots=True)
class LeafInputs:
    reads: list[Read] = field(default_factory=list)
    percentiles: list[str] = field(default_factory=list)  # PercentileSpec keys
    segments: list[str] = field(default_factory=list)


def _expression_inputs(expression: Expression, into: LeafInputs) -> None:
    if isinstance(expression, FieldNumber):
        into.reads.append(Read(expression.field, expression.sub, expression.default is not None))
    elif isinstance(expression, PercentileNumber):
        into.percentiles.append(expression.key)  # the population's value: none of the person's is read
    elif isinstance(expression, Calculation):
        _expression_inputs(expression.left, into)
        _expression_inputs(expression.right, into)


def leaf_inputs(plan: Plan, into: LeafInputs | None = None) -> LeafInputs:
    """What a leaf's plan reads (a leaf's plan is one test, or an AnyOf of a test and its 0 default)."""
    into = into if into is not None else LeafInputs()
    if isinstance(plan, Test | TimeTest):
        into.reads.append(Read(plan.field, plan.sub))
    elif isinstance(plan, FieldTest):
        into.reads += [Read(plan.field, plan.sub), Read(plan.other, plan.other_sub)]
    elif isinstance(plan, PercentileTest):
        into.reads.append(Read(plan.field, plan.sub))
        into.percentiles.append(plan.key)
    elif isinstance(plan, ExpressionTest):
        _expression_inputs(plan.left, into)
        _expression_inputs(plan.right, into)
    elif isinstance(plan, NumberTest):
        into.reads.append(Read(plan.field, (), plan.default is not None))
    elif isinstance(plan, Member):
        into.segments.append(plan.segment)
    elif isinstance(plan, AllOf | AnyOf):
        for part in plan.parts:
            leaf_inputs(part, into)
    elif isinstance(plan, Negate):
        leaf_inputs(plan.part, into)
    return into


def _kind(node: Node) -> str:
    if isinstance(node, Condition):
        return "field"
    if isinstance(node, Comparison):
        return "comparison"
    if isinstance(node, Aggregate):
        return "aggregate"
    if isinstance(node, Performed):
        return "performed"
    if isinstance(node, InSegment):
        return "segment"
    raise TypeError(f"not a segment leaf: {type(node).__name__}")


@dataclass(frozen=True, slots=True)
class Evaluating:
    """One person at one instant, as the engine evaluates them."""

    record: Mapping[str, Any]
    members: Container[str]
    now: float
    percentiles: Mapping[str, float | None]
    live: Callable[[str], bool]  # whether a referenced segment is live (its memberships are kept)

    def holds(self, plan: Plan) -> bool:
        return row_predicate(plan, self.percentiles)(self.record, self.members, self.now)


def explain_node(node: Node, plan: Plan, at: Evaluating) -> segmentation_pb2.ExplainedCondition:
    """The node and its plan, walked together (see the module docstring); each node's result is its plan's."""
    holds = at.holds(plan)
    message = segmentation_pb2.ExplainedCondition(text=to_text(node), result=TRUE if holds else FALSE)
    if isinstance(node, Not):
        if not isinstance(plan, Negate):
            raise TypeError("a not without its negation in the plan")
        message.kind = "not"
        message.operands.append(explain_node(node.operand, plan.part, at))
        return message
    if isinstance(node, And | Or):
        expected = AllOf if isinstance(node, And) else AnyOf
        if not isinstance(plan, expected) or len(plan.parts) != len(node.operands):
            raise TypeError(f"an {type(node).__name__.lower()} whose plan does not mirror it")
        message.kind = "and" if isinstance(node, And) else "or"
        message.operands.extend(explain_node(n, p, at) for n, p in zip(node.operands, plan.parts, strict=True))
        return message
    message.kind = _kind(node)
    inputs = leaf_inputs(plan)
    # A field read as 0 where it has no value (a counted trait, an event count) is never missing.
    zeroed = {read.field for read in inputs.reads if read.zero and not read.sub}
    names = list(dict.fromkeys(read.name for read in inputs.reads))
    missing = list(
        dict.fromkeys(
            read.name
            for read in inputs.reads
            if not (read.field in zeroed and not read.sub) and not present(read.value(at.record))
        )
    )
    message.fields.extend(names)
    message.missing.extend(missing)
    if inputs.segments:
        message.segment_id = inputs.segments[0]
    if holds:
        return message
    if any(at.percentiles.get(key) is None for key in inputs.percentiles) or not all(
        at.live(segment) for segment in inputs.segments
    ):
        message.result = UNKNOWN
    elif missing:
        message.result = MISSING
    return message


def mismatch_note(engine: Any, segment: Segment, person_id: str, member: bool, now: float) -> str:
    """Why the person's membership and the live definition's answer differ at `now` (an instant between two
    steps of the engine that brings one to the other)."""
    direction = "enter" if not member else "leave"
    due = engine._due.get(person_id)
    if segment.timed and due is not None and due <= now:
        return (
            f"a time condition of the definition came due for the person; the timer round applies it "
            f"(they {direction} then, at the instant it flipped)"
        )
    if segment.compiled.percentiles and engine.percentiles_stale:
        return (
            "a population percentile the definition compares with has moved; the next percentile round "
            f"(every CDP_SEGMENTATION_PERCENTILE_SECONDS) recomputes it and the person may {direction} then"
        )
    if segment.pending is not None or segment.id in engine._builds:
        return (
            f"a build of the segment is under way (version {segment.building_version}); the person's membership "
            "is brought to the live definition when it goes live"
        )
    return (
        "a change not yet applied to the person's memberships (a partition being brought to the live "
        "definition, or a referenced segment changing); ask again"
    )


def live_segment(engine: Any, segment_id: str) -> Segment:
    """The segment asked about; NOT_FOUND naming `segment_id`."""
    segment = engine.segments.get(segment_id)
    if segment is None:
        raise NotFound(f"segment_id: no segment {segment_id!r}", reason="unknown_segment")
    return segment


def explain(engine: Any, segment_id: str, person_id: str) -> segmentation_pb2.ExplainMembershipResponse:
    """The answer for a person this replica holds (no await: the person cannot change meanwhile)."""
    segment = live_segment(engine, segment_id)
    if not segment.serving:
        raise FailedPrecondition(
            f"segment_id: segment {segment_id!r} is not live yet ({segment.state}): nothing serves it to explain; "
            "ask again once it is live (GetSegment shows the build's progress)",
            reason="segment_not_live",
        )
    person = engine.persons.get(person_id)
    if person is None:
        raise NotFound(
            f"person_id: segmentation holds no person {person_id!r} (no profile change of theirs has reached it; "
            "it holds a person once their profile changes)",
            reason="person_not_held",
        )
    now = engine.clock()
    segments = engine.segments

    def live(referenced: str) -> bool:
        other = segments.get(referenced)
        return other is not None and other.serving

    at = Evaluating(person.fields, person.members, now, engine.percentiles, live)
    matches = bool(segment.predicate(person.fields, person.members, now))
    tree = explain_node(segment.compiled.node, segment.compiled.plan, at)
    since = person.members.get(segment.id)
    member = since is not None
    response = segmentation_pb2.ExplainMembershipResponse(
        segment_id=segment.id,
        person_id=person_id,
        segment_version=segment.version,
        member=member,
        matches=matches,
        tree=tree,
    )
    if since is not None:
        set_seconds(response.since, since)
    set_seconds(response.evaluated_at, now)
    if member != matches:
        response.note = mismatch_note(engine, segment, person_id, member, now)
    return response


class Explainer:
    """`ExplainMembership` for any person: answered here for the partitions this replica serves, asked of
    the replica holding the partition otherwise (`owners`; None: this engine answers for everyone it holds)."""

    def __init__(self, engine: Any, owners: Owners | None = None) -> None:
        self.engine = engine
        self.owners = owners

    async def explain(
        self, request: segmentation_pb2.ExplainMembershipRequest, context: Any
    ) -> segmentation_pb2.ExplainMembershipResponse:
        engine = self.engine
        live_segment(engine, request.segment_id)  # NOT_FOUND naming segment_id before any forwarding
        partition = engine._partition(request.person_id)
        if self.owners is not None and not self.owners.holds(request.person_id):
            return await self.owners.forward(
                partition,
                context,
                segmentation_pb2_grpc.SegmentationServiceStub,
                "ExplainMembership",
                request,
                passed_on=REQUEST_ERRORS,
            )
        if partition not in engine.active:
            raise Unavailable(
                f"partition {partition} of person_id is not served by this replica now (loading or moving); retry",
                retry_after=1.0,
            )
        return explain(engine, request.segment_id, request.person_id)


def walk(message: segmentation_pb2.ExplainedCondition) -> Iterator[segmentation_pb2.ExplainedCondition]:
    """Every node of an explained tree, depth first."""
    yield message
    for operand in message.operands:
        yield from walk(operand)


__all__ = ["Explainer", "explain", "explain_node", "leaf_inputs", "walk"]
