"""Reading a journey document's fields: the problems found, the catalogue names are checked against, and
the checks every part of a document shares (known keys, event filters, conditions, templates, segments).

`FieldReader` records a problem instead of raising, so one pass over a document reports all of them (see
`document`, which reads the journey's own fields, and `document_steps`, which reads its steps).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cdp_kit.errors import InvalidArgument
from cdp_orchestration.domain.conditions import EventFilter, ProfileCondition, event_filter, profile_condition
from cdp_orchestration.domain.templates import RefusedTemplate, Template, compile_template

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Catalogue:
    """What the platform knows exists; None means "not checked". Field keys are flat ("traits.plan").

    `fields` is every field there is; `names` is the known names under some roots only ("computed" ->
    the computed traits the profile service defines), the other roots unchecked: traits are open-ended,
    while a computed trait or a score that nothing produces would silently read as missing for ever.

    `counted` is the field keys of the computed traits of kind count or sum ("computed.orders"): conditions
    read them as 0 where a person has none (`conditions.profile_condition`). A stored version is read again
    with the ones it was saved with (`Journey.counted`), so every replica and restart compiles it the same."""

    events: frozenset[str] | None = None
    fields: frozenset[str] | None = None
    segments: frozenset[str] | None = None
    purposes: frozenset[str] | None = None
    names: Mapping[str, frozenset[str]] = field(default_factory=dict)
    counted: frozenset[str] = frozenset()

    def unknown_fields(self, fields: frozenset[str]) -> list[str]:
        """The flat field keys among `fields` this catalogue says do not exist, sorted."""
        unknown = []
        for key in sorted(fields):
            root, _, name = key.partition(".")
            if (self.fields is not None and key not in self.fields) or (
                root in self.names and name not in self.names[root]
            ):
                unknown.append(key)
        return unknown


@dataclass(frozen=True, slots=True)
class Problem:
    node: str  # the node id; "" for the journey's own fields
    field: str  # within the node ("timeout", "branches[0].if"), or the journey's ("entry.event")
    message: str

    @property
    def path(self) -> str:
        """The field's full path in the document: "nodes.remind.purpose", "entry.event"."""
        return f"nodes.{self.node}.{self.field}" if self.node else self.field

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class JourneyInvalid(InvalidArgument):
    """Every problem found in a journey; `field` is the first one's (the gRPC layer's single BadRequest
    field), the message and `problems` hold them all."""

    def __init__(self, problems: list[Problem]) -> None:
        assert problems
        super().__init__(
            problems[0].path,
            "; ".join(map(str, problems)) if len(problems) > 1 else problems[0].message,
        )
        self.problems = tuple(problems)


class FieldReader:
    """What a reader of one journey document found so far (`problems`), and the checks its parts share."""

    def __init__(self, catalogue: Catalogue) -> None:
        self.catalogue = catalogue
        self.problems: list[Problem] = []
        self.category = "marketing"  # the journey's; an action without its own category takes it
        # Whether the entry brings entry fields (`entry.<name>`): an event's properties, an Enroll call's.
        self.entry_fields = True
        self.as_stored = False  # see parse_journey

    def template(self, node_id: str, source: Any, at: str) -> Template | None:
        try:
            return compile_template(source, at)
        except InvalidArgument as error:
            texts = isinstance(source, Mapping) and all(isinstance(text, str) for text in source.values())
            if self.as_stored and texts and source:
                return RefusedTemplate(source, error.field)
            self.problem(node_id, error.field, error.description)
            return None

    # Each helper records problems instead of raising, so one pass reports all of them.
    def problem(self, node: str | None, at: str, message: str) -> None:
        """Record a problem; `at` is the full path, kept relative to the node when there is one."""
        prefix = f"nodes.{node}."
        field = at[len(prefix) :] if node and at.startswith(prefix) else at
        self.problems.append(Problem(node or "", field, message))

    def attempt(self, node: str | None, build: Callable[[], T]) -> T | None:
        try:
            return build()
        except InvalidArgument as error:
            self.problem(node, error.field, error.description)
            return None

    def known_keys(self, tree: Mapping[str, Any], allowed: tuple[str, ...], at: str, node: str | None) -> None:
        for key in tree:
            if key not in allowed:
                self.problem(node, key_path(at, key), f"unknown key here; known: {', '.join(allowed)}")

    def event(self, tree: Mapping[str, Any], at: str, node: str | None) -> EventFilter | None:
        names = tree.get("event")
        if names is None:
            self.problem(node, f"{at}.event", "is required: the event name (or a list of names)")
            return None
        found = self.attempt(node, lambda: event_filter(names, tree.get("where"), at))
        if found is not None and self.catalogue.events is not None:
            for name in sorted(found.names - self.catalogue.events):
                self.problem(node, f"{at}.event", f"{name!r} is not a known event; check the name's spelling and case")
        return found

    def condition(self, source: Any, at: str, node: str | None) -> ProfileCondition | None:
        """A condition; it may read entry fields where the entry brings them (`entry_reads`)."""
        if source is None:
            self.problem(node, at, "is required: a condition like scores.churn_risk > 0.8")
            return None
        found = self.attempt(node, lambda: profile_condition(source, at, entry=True, counted=self.catalogue.counted))
        if found is None:
            return None
        for name in self.catalogue.unknown_fields(found.fields):
            self.problem(node, at, f"reads {name}, which is not a known profile field")
        if self.catalogue.segments is not None:
            for name in sorted(found.segments - self.catalogue.segments):
                self.problem(node, at, f"reads membership of segment {name!r}, which does not exist")
        if self.catalogue.events is not None:
            for name in sorted(found.event_names - self.catalogue.events):
                self.problem(node, at, f"{name!r} is not a known event; check the name's spelling and case")
        self.entry_reads(found.entry_fields, at, node)
        return found

    def entry_reads(self, names: frozenset[str], at: str, node: str | None) -> None:
        if self.entry_fields:
            return
        for name in sorted(names):
            self.problem(
                node,
                at,
                f"reads {name}, but a segment or schedule entry brings no entry fields "
                "(only an entry event's properties or an Enroll call's do)",
            )

    def segment(self, value: Any, at: str) -> str | None:
        if not isinstance(value, str) or not value:
            self.problem(None, at, f"{value!r} must be a segment id")
            return None
        if self.catalogue.segments is not None and value not in self.catalogue.segments:
            self.problem(None, at, f"{value!r} is not a known segment")
        return value


def key_path(at: str | None, key: object) -> str:
    """The field path of a key as written: `entry.colour`, or `entry["odd key"]` when it is no plain name."""
    if isinstance(key, str) and key.isidentifier():
        return key if at is None else f"{at}.{key}"
    return f"{at or 'journey'}[{key!r}]"
