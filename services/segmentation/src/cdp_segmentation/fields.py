"""The fields a new definition may read: a misspelt score or computed trait is refused, not served empty.

A field nothing writes reads as missing for every person, so `scores.churn_rsik > 0.5` would go live with
no members and stay so, silently. `CreateSegment`, `UpdateSegment` and `Estimate` therefore check the
definition's fields under two roots against what the platform says exists, and refuse an unknown one with
INVALID_ARGUMENT naming it and the known names close to it:

- `scores.<name>`: a score some model deployed on the scoring service writes (an output of any version
  it lists, whatever its role: a segment may be written for a model waiting in shadow);
- `computed.<name>`: a computed trait the profile service defines, one a deployed model reads (scoring
  defines those there, perhaps a moment after the model is listed), or one the definition's own event
  conditions define (`count(...)`, `sum(...)`).

`traits.*` and `consent.*` are open-ended (a trait is whatever a source sends) and never refused. A score is
always a number, so a score compared with text or true/false (`scores.churn_risk > "high"`) is refused too,
whatever the scoring service answers.

A root is checked only when its source answers: the scoring service when `CDP_SCORING_ADDRESS` is set,
the profile service when `CDP_PROFILE_ADDRESS` is. One that cannot be asked (unset, down, slow) leaves its
root unchecked, with a warning log: an outage must not stop segments being edited. A scoring service
that lists no model at all leaves scores unchecked too: on its first start it deploys the shipped models
in the background, so a platform just started (`make up`) may not list them yet, and a segment on
`scores.churn_risk` created then is legitimate. Stored segments, and those another replica created, are
never checked again: a model retired later does not make them unloadable.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from cdp_kit.errors import InvalidArgument, Unavailable
from cdp_kit.profile_fields import COMPUTED, SCORES, field_key, split_key
from cdp_lang.nodes import ZERO_WHEN_MISSING, And, Condition, Not, Or
from cdp_segmentation.domain import CompiledSegment

log = logging.getLogger("cdp.segmentation.fields")

# How many known names an error lists when none is close to the unknown one.
LISTED = 12
# deployed_models' key for the computed traits the models read that are of kind count or sum
COUNTED = "computed:counted"

_WHAT = {
    SCORES: (
        "no model deployed on the scoring service writes it",
        "deploy the model that writes it first, or correct the name",
    ),
    COMPUTED: (
        "the profile service defines no such computed trait",
        "define it first (cdpctl, or a model that reads it), use an event condition such as "
        'count(event = "...", within 30d), or correct the name',
    ),
}


@dataclass(frozen=True, slots=True)
class KnownFields:
    """The names known under some roots ("scores" -> the deployed models' scores); a root absent here is
    not checked."""

    names: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # the computed traits of kind count or sum (by name): a person without one has 0 (`compile_segment`'s
    # `counted`); empty when the profile service was not asked
    counted: frozenset[str] = frozenset()

    def counted_fields(self) -> frozenset[str]:
        """The field keys ("computed.orders") a definition reads as 0 where a person has no number."""
        return frozenset(field_key(COMPUTED, name) for name in self.counted)


FieldSource = Callable[[], Awaitable[KnownFields]]


def check_fields(compiled: CompiledSegment, known: KnownFields, at: str = "definition") -> None:
    """Refuse a definition reading a score or computed trait that `known` says does not exist, or comparing
    a score with text or true/false (a score is always a number: that matches no one, ever)."""
    own = {name for trait in compiled.computed_traits if isinstance(name := trait.get("name"), str)}
    problems = [
        f"{condition.field} is a number (a model's score), compared here with {_literal(condition.value)}: that "
        "matches no one; compare it with a number, like > 0.5"
        for condition in _conditions(compiled.node)
        if condition.path[0] == SCORES and _not_a_number(condition.value)
    ]
    for key in sorted(compiled.fields):
        root, name = split_key(key)
        names = known.names.get(root)
        if names is None or name in names or (root == COMPUTED and name in own):
            continue
        problems.append(_problem(root, name, names))
    if problems:
        raise InvalidArgument(at, "; ".join(problems), reason="unknown_field")


def _conditions(node: Any) -> list[Condition]:
    if isinstance(node, Not):
        return _conditions(node.operand)
    if isinstance(node, And | Or):
        return [c for operand in node.operands for c in _conditions(operand)]
    return [node] if isinstance(node, Condition) else []


def _not_a_number(value: Any) -> bool:
    if isinstance(value, tuple):
        return any(_not_a_number(item) for item in value)
    return isinstance(value, str | bool)


def _literal(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_literal(item) for item in value) + "]"
    return (
        ("true" if value else "false")
        if isinstance(value, bool)
        else f'"{value}"'
        if isinstance(value, str)
        else str(value)
    )


def _problem(root: str, name: str, names: frozenset[str]) -> str:
    why, fix = _WHAT[root]
    # Misspelt (churn_rsik), or cut short / run on (clv for clv_value_365d).
    close = difflib.get_close_matches(name, sorted(names), n=3, cutoff=0.6)
    close += [n for n in sorted(names) if n not in close and (n.startswith(name) or name.startswith(n))]
    close = close[:3]
    if close:
        known = f"did you mean {' or '.join(f'{root}.{n}' for n in close)}?"
    elif names:
        listed = sorted(names)[:LISTED]
        more = f" and {len(names) - LISTED} more" if len(names) > LISTED else ""
        known = f"known: {', '.join(f'{root}.{n}' for n in listed)}{more}"
    else:
        known = f"none is defined under {root}"
    return f"reads {root}.{name}, but {why}; {known} ({fix})"


def field_sources(
    *,
    models: Callable[[], Awaitable[Mapping[str, frozenset[str]]]] | None = None,
    computed: Callable[[], Awaitable[Mapping[str, str] | frozenset[str]]] | None = None,
) -> FieldSource:
    """One `FieldSource` from the scoring service's models (`deployed_models`) and the profile service's
    computed traits (each may be absent; `computed_traits` gives each one's op). A source that raises leaves
    its root unchecked, and scoring listing no model leaves scores unchecked (see the module docstring). The
    computed traits a deployed model reads count as defined: scoring defines them on the profile service,
    perhaps a moment later. The traits of kind count or sum, whichever defines them, are `counted`."""

    async def known() -> KnownFields:
        names: dict[str, frozenset[str]] = {}
        deployed: Mapping[str, frozenset[str]] = {}
        counted: frozenset[str] = frozenset()
        if models is not None:
            deployed = await _asked(SCORES, models, {})
            if deployed.get(SCORES):
                names[SCORES] = deployed[SCORES]
        if computed is not None:
            defined = await _asked(COMPUTED, computed, None)
            if defined is not None:
                names[COMPUTED] = frozenset(defined) | deployed.get(COMPUTED, frozenset())
                ops = defined if isinstance(defined, Mapping) else {}
                counted = frozenset(name for name, op in ops.items() if op in ZERO_WHEN_MISSING)
                # a model's trait the profile service does not list yet: its kind as the model defines it
                counted |= deployed.get(COUNTED, frozenset()) - frozenset(defined)
        return KnownFields(names, counted)

    return known


async def _asked(root: str, source: Callable[[], Awaitable[Any]], otherwise: Any) -> Any:
    try:
        return await source()
    except Exception as exc:
        log.warning("field names not read: not checked", extra={"root": root, "error": _describe(exc)})
        return otherwise


def _list_models(
    channel: grpc.aio.Channel, token: str, timeout: float
) -> Callable[[], Awaitable[scoring_pb2.ListModelsResponse]]:
    """The scoring service's ListModels (scoring:read): every model with every version it keeps."""
    stub = scoring_pb2_grpc.ScoringServiceStub(channel)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()

    async def listed() -> scoring_pb2.ListModelsResponse:
        return await stub.ListModels(scoring_pb2.ListModelsRequest(), metadata=metadata, timeout=timeout)

    return listed


def deployed_models(
    channel: grpc.aio.Channel, token: str, *, timeout: float = 5.0
) -> Callable[[], Awaitable[Mapping[str, frozenset[str]]]]:
    """What the models deployed on the scoring service write and read (ListModels, scoring:read): every
    version's outputs under "scores", the computed traits they read under "computed"."""
    models = _list_models(channel, token, timeout)

    async def listed() -> Mapping[str, frozenset[str]]:
        answer = await models()
        specs = [v.spec for m in answer.models for v in m.versions]
        traits = [t for spec in specs for t in spec.computed_traits if "name" in t and isinstance(t["name"], str)]
        return {
            SCORES: frozenset(o.score for spec in specs for o in spec.outputs if o.score),
            COMPUTED: frozenset(t["name"] for t in traits),
            COUNTED: frozenset(t["name"] for t in traits if "op" in t and t["op"] in ZERO_WHEN_MISSING),
        }

    return listed


@dataclass(frozen=True, slots=True)
class ModelReader:
    """A model version deployed on the scoring service, with the computed traits its features read."""

    name: str
    version: str
    role: str  # live, canary, shadow, inactive
    computed: frozenset[str]  # computed trait names


ModelReaders = Callable[[], Awaitable[list[ModelReader]]]

_ROLES = {
    scoring_pb2.ROLE_LIVE: "live",
    scoring_pb2.ROLE_CANARY: "canary",
    scoring_pb2.ROLE_SHADOW: "shadow",
    scoring_pb2.ROLE_INACTIVE: "inactive",
}


def _computed_name(path: str) -> str:
    """`computed.orders_30d` (or a path under it) → `orders_30d`; "" for a path under another root."""
    root, _, name = path.partition(".")
    return name.split(".", 1)[0] if root == COMPUTED else ""


def model_readers(channel: grpc.aio.Channel, token: str, *, timeout: float = 5.0) -> ModelReaders:
    """Every model version the scoring service keeps (ListModels, scoring:read), whatever its role (an
    inactive one is promoted without its traits being defined again), with the computed traits its features
    read (`computed.<name>`, or a path under it); Unavailable when scoring cannot be asked: the caller
    refuses rather than delete a trait from under a model blindly."""
    models = _list_models(channel, token, timeout)

    async def listed() -> list[ModelReader]:
        try:
            answer = await models()
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(
                f"the scoring service could not be asked which deployed models read it ({exc.code().name})",
                retry_after=5.0,
                reason="scoring_unavailable",
            ) from None
        return [
            ModelReader(
                model.name,
                version.spec.version,
                _ROLES.get(version.role, ""),
                frozenset(name for f in version.spec.features if (name := _computed_name(f.path))),
            )
            for model in answer.models
            for version in model.versions
        ]

    return listed


def computed_traits(
    channel: grpc.aio.Channel, token: str, *, timeout: float = 5.0
) -> Callable[[], Awaitable[Mapping[str, str]]]:
    """The computed traits the profile service defines (ListComputedTraits, profile:read), whoever
    defined them (a segment, a model, an operator): name -> op (count, sum, last...)."""
    stub = profile_pb2_grpc.ProfileServiceStub(channel)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()

    async def computed() -> Mapping[str, str]:
        listed = await stub.ListComputedTraits(
            profile_pb2.ListComputedTraitsRequest(), metadata=metadata, timeout=timeout
        )
        return {t.definition.name: t.definition.op for t in listed.traits}

    return computed


def _describe(exc: BaseException) -> str:
    """An error as a log shows it: its type, and a gRPC status's code (never its text)."""
    code = getattr(exc, "code", None)
    if callable(code):
        try:
            return f"{type(exc).__name__} {code().name}"
        except Exception:
            pass
    return type(exc).__name__
