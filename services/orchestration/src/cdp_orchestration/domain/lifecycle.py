"""A journey's life: draft -> active <-> paused -> archived, and its immutable published versions.

- A draft can be edited (saved again) as often as its author likes; publishing freezes it as version N and
  makes the journey active. Version N is never changed again: an edit after publishing is a new draft,
  version N + 1, which becomes live when it is published in turn.
- A draft saved after publishing can be discarded (`discard_draft`): the journey keeps its published
  versions and its state, as if the edit had never been saved. A journey never published has nothing
  else; its draft is not discarded (archive the journey instead).
- Only an active journey admits new instances. Paused admits none; its running instances carry on (their
  timers and pending actions are promises already made). Archived admits none, takes no new drafts and is
  final; the service ends its running instances with reason "archived" (an ExitRequest each).
- Publishing a new version leaves running instances on the version they entered. When the author asks,
  `migration_plan(old, new)` maps them by node id: an instance at a step the new version also has, of the
  same type, moves (`instance.migrate`); one at a step that is gone or changed type stays on its version
  (nothing is lost or run twice).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from cdp_kit.errors import FailedPrecondition, InvalidArgument
from cdp_orchestration.domain.journey import Journey


class State(StrEnum):
    DRAFT = "draft"
    ACTIVE = "active"
    PAUSED = "paused"
    ARCHIVED = "archived"


@dataclass(frozen=True, slots=True)
class JourneyRecord:
    id: str
    state: State
    versions: Mapping[int, Journey] = field(default_factory=dict)  # published, immutable
    draft: Journey | None = None

    @property
    def live(self) -> Journey | None:
        """The latest published version: the one new instances enter."""
        return self.versions[max(self.versions)] if self.versions else None

    @property
    def next_version(self) -> int:
        return max(self.versions, default=0) + 1

    @property
    def accepts_entries(self) -> bool:
        return self.state is State.ACTIVE and bool(self.versions)


def create(journey: Journey) -> JourneyRecord:
    """A new journey holding `journey` as its draft (version 1)."""
    _check_version(journey, 1)
    return JourneyRecord(journey.id, State.DRAFT, {}, journey)


def save_draft(record: JourneyRecord, journey: Journey) -> JourneyRecord:
    """The record with `journey` as its draft; the draft's version must be the next unpublished one."""
    if record.state is State.ARCHIVED:
        raise FailedPrecondition(f"journey {record.id} is archived; create a new journey instead")
    if journey.id != record.id:
        raise InvalidArgument("id", f"{journey.id!r} is not this journey's id {record.id!r}")
    _check_version(journey, record.next_version)
    return replace(record, draft=journey)


def publish(record: JourneyRecord) -> JourneyRecord:
    """The draft becomes the live version; a draft journey becomes active (a paused one stays paused)."""
    if record.state is State.ARCHIVED:
        raise FailedPrecondition(f"journey {record.id} is archived")
    if record.draft is None:
        raise FailedPrecondition(f"journey {record.id} has no draft to publish; save one first")
    versions = {**record.versions, record.draft.version: record.draft}
    state = State.ACTIVE if record.state is State.DRAFT else record.state
    return JourneyRecord(record.id, state, versions, None)


def discard_draft(record: JourneyRecord) -> JourneyRecord:
    """The record without its draft: its published versions and its state stay, and the next draft saved is
    the next unpublished version again. A journey never published is refused: its draft is all it holds."""
    if not record.versions:
        raise FailedPrecondition(
            f"journey {record.id} has never been published: its draft is all it holds, so there is nothing to go "
            f"back to; archive it instead (cdpctl journey archive {record.id}), or save a new draft over it"
        )
    return replace(record, draft=None)


def pause(record: JourneyRecord) -> JourneyRecord:
    return _move(record, State.PAUSED, (State.ACTIVE,))


def resume(record: JourneyRecord) -> JourneyRecord:
    return _move(record, State.ACTIVE, (State.PAUSED,))


def archive(record: JourneyRecord) -> JourneyRecord:
    return _move(record, State.ARCHIVED, (State.DRAFT, State.ACTIVE, State.PAUSED))


def _move(record: JourneyRecord, to: State, allowed_from: tuple[State, ...]) -> JourneyRecord:
    if record.state not in allowed_from:
        raise FailedPrecondition(
            f"journey {record.id} is {record.state.value}; it can become {to.value} only from "
            + " or ".join(s.value for s in allowed_from)
        )
    return replace(record, state=to)


def _check_version(journey: Journey, expected: int) -> None:
    if journey.version != expected:
        raise InvalidArgument(
            "version",
            f"{journey.version} is not the next version of {journey.id}: published versions are "
            f"immutable, so this one must be {expected}",
        )


@dataclass(frozen=True, slots=True)
class MigrationPlan:
    """Which steps of `from_version` move to `to_version` (same id, same type), and which stay."""

    journey_id: str
    from_version: int
    to_version: int
    moves: frozenset[str]
    stays: frozenset[str]


def migration_plan(old: Journey, new: Journey) -> MigrationPlan:
    if old.id != new.id or new.version <= old.version:
        raise InvalidArgument("version", f"can only migrate {old.id} forward, to a version after {old.version}")
    moves = frozenset(
        node_id
        for node_id, node in old.nodes.items()
        if node_id in new.nodes and type(new.nodes[node_id]) is type(node)
    )
    return MigrationPlan(old.id, old.version, new.version, moves, frozenset(old.nodes) - moves)
