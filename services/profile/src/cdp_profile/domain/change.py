"""What the profile tells the world: a view of the person now (or as of a date) and what one call changed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cdp_profile.domain.events import TimelineEntry
from cdp_profile.domain.history import ConsentState, Score, TraitVersion


@dataclass(slots=True)
class ProfileChange:
    """Only what changed: new current values, timeline entries added and removed (retention, merges,
    splits), the events and writes applied, persons absorbed or split off. None as a value means gone: a
    trait removed, a computed trait dropped, or — after a split — a consent key or score that only the
    split-off person had.

    Falsy when nothing changed: a duplicate event changes nothing, is written nowhere and counted nowhere.
    An applied event always counts as a change (its id is listed): it moves `event_count` and `last_seen`
    (a platform event, see events.PLATFORM_SOURCES, only adds its timeline entry and feeds the traits
    naming it).

    `relisted`: ids of events applied before that came again (a copy under the same id: a client's retry
    past the collector's dedup window, identity resolving an event again). Nothing changed for them, but
    they are still published (`publishable`), listed among the change's event ids, because a reader
    waiting until the profile has applied the person's latest event (orchestration's arbiter) would
    otherwise wait for a listing that never comes. A relisting is not an applied event: it is not part of
    `event_ids`, does not make the change truthy, and a reader folding fields finds none in it.
    """

    person_id: str
    traits: dict[str, Any] = field(default_factory=dict)
    groups: dict[str, Any] = field(default_factory=dict)
    computed: dict[str, Any] = field(default_factory=dict)
    consent: dict[str, bool] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    timeline_added: list[TimelineEntry] = field(default_factory=list)
    timeline_removed: list[TimelineEntry] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)
    relisted: list[str] = field(default_factory=list)  # duplicates of events applied before (see above)
    # Per relisted id, how many of `event_ids` were applied before it: the ids are published in the order
    # they were applied (a reader keeps the ids listed after the latest event it saw as still to come).
    relisted_after: list[int] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)  # origin person ids absorbed
    split: list[str] = field(default_factory=list)  # origin person ids moved out
    # Set by the engine on the changes it publishes for a whole profile: absorbed into / restored from
    # another person, or deleted.
    merged_into: str = ""
    split_from: str = ""
    removed: bool = False
    # Set by the engine when the change began the profile (its first event): the change is then the whole
    # profile, and `profiles.changed` says so (`created`), so a reader meeting the person needs no read.
    created: bool = False

    def __init__(
        self,
        person_id: str,
        traits: dict[str, Any] | None = None,
        groups: dict[str, Any] | None = None,
        computed: dict[str, Any] | None = None,
        consent: dict[str, bool] | None = None,
        scores: dict[str, float] | None = None,
        timeline_added: list[TimelineEntry] | None = None,
        timeline_removed: list[TimelineEntry] | None = None,
        event_ids: list[str] | None = None,
        relisted: list[str] | None = None,
        relisted_after: list[int] | None = None,
        merged: list[str] | None = None,
        split: list[str] | None = None,
        merged_into: str = "",
        split_from: str = "",
        removed: bool = False,
        created: bool = False,
    ) -> None:
        # Written out rather than the dataclass's (which calls a factory per field): one change is made per
        # event and per scored person, and its dozen empty containers were most of what that cost.
        self.person_id = person_id
        self.traits = {} if traits is None else traits
        self.groups = {} if groups is None else groups
        self.computed = {} if computed is None else computed
        self.consent = {} if consent is None else consent
        self.scores = {} if scores is None else scores
        self.timeline_added = [] if timeline_added is None else timeline_added
        self.timeline_removed = [] if timeline_removed is None else timeline_removed
        self.event_ids = [] if event_ids is None else event_ids
        self.relisted = [] if relisted is None else relisted
        self.relisted_after = [] if relisted_after is None else relisted_after
        self.merged = [] if merged is None else merged
        self.split = [] if split is None else split
        self.merged_into = merged_into
        self.split_from = split_from
        self.removed = removed
        self.created = created

    def __bool__(self) -> bool:
        # What most changes hold first (an applied event lists its id; a score change holds scores): it is
        # asked several times per change (folding, writing, publishing) and stops at the first that holds.
        return bool(
            self.event_ids
            or self.scores
            or self.computed
            or self.traits
            or self.groups
            or self.consent
            or self.timeline_added
            or self.timeline_removed
            or self.merged
            or self.split
            or self.merged_into
            or self.split_from
            or self.removed
        )

    def listed(self) -> list[str]:
        """Every event id the change lists, applied or relisted, in the order the profile met them."""
        if not self.relisted:
            return self.event_ids
        out, applied = [], 0
        for event_id, after in zip(self.relisted, self.relisted_after, strict=True):
            out.extend(self.event_ids[applied:after])
            applied = max(applied, after)
            out.append(event_id)
        out.extend(self.event_ids[applied:])
        return out

    @property
    def publishable(self) -> bool:
        """Whether `profiles.changed` should carry it: something changed, or a duplicate is listed again."""
        return bool(self) or bool(self.relisted)

    def combine(self, later: ProfileChange) -> ProfileChange:
        """Fold a later change of the same person into this one (in place; returns self).

        Later values win. A timeline entry added and then removed within the fold (or the reverse) cancels
        out, so a batch's folded change says what to write, not the history of the batch.
        """
        if later.person_id != self.person_id:
            raise ValueError(f"cannot fold a change of {later.person_id!r} into one of {self.person_id!r}")
        self.traits.update(later.traits)
        self.groups.update(later.groups)
        self.computed.update(later.computed)
        self.consent.update(later.consent)
        self.scores.update(later.scores)
        _fold_timeline(self.timeline_added, self.timeline_removed, later.timeline_added)
        _fold_timeline(self.timeline_removed, self.timeline_added, later.timeline_removed)
        if later.relisted:
            applied = len(self.event_ids)
            self.relisted.extend(later.relisted)
            self.relisted_after.extend(applied + after for after in later.relisted_after)
        self.event_ids.extend(later.event_ids)
        self.merged.extend(later.merged)
        self.split.extend(later.split)
        self.merged_into = later.merged_into or self.merged_into
        self.split_from = later.split_from or self.split_from
        self.removed = later.removed or self.removed
        self.created = self.created or later.created  # later changes of a new profile keep it whole
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "person_id": self.person_id,
            "traits": dict(self.traits),
            "groups": dict(self.groups),
            "computed": dict(self.computed),
            "consent": dict(self.consent),
            "scores": dict(self.scores),
            "timeline_added": [entry.to_doc() for entry in self.timeline_added],
            "timeline_removed": [entry.to_doc() for entry in self.timeline_removed],
            "event_ids": list(self.event_ids),
            "relisted": list(self.relisted),
            "relisted_after": list(self.relisted_after),
            "merged": list(self.merged),
            "split": list(self.split),
            "merged_into": self.merged_into,
            "split_from": self.split_from,
            "removed": self.removed,
            "created": self.created,
        }


def _fold_timeline(same: list[TimelineEntry], opposite: list[TimelineEntry], later: list[TimelineEntry]) -> None:
    if not later:
        return
    if not opposite:
        same.extend(later)
        return
    # An entry is its record, keyed by its origin too: a merge deletes the loser's copy of an event whose
    # entry another part holds (the same event id), and the two must not cancel out.
    cancelled = {(entry.origin, entry.event_id) for entry in opposite} & {
        (entry.origin, entry.event_id) for entry in later
    }
    if cancelled:
        opposite[:] = [entry for entry in opposite if (entry.origin, entry.event_id) not in cancelled]
    same.extend(entry for entry in later if (entry.origin, entry.event_id) not in cancelled)


@dataclass(slots=True)
class ProfileView:
    """One person as of a moment. `traits`, `groups` and `consent` answer "as of" a date when asked;
    computed values, scores and counters are always the current ones.

    A removed trait stays in `traits` with a None value and the provenance of its removal; `trait_values`
    gives the plain name -> value mapping of the traits that are set.
    """

    person_id: str
    traits: dict[str, TraitVersion]
    groups: dict[str, TraitVersion]  # group id -> latest group call (value = the group's traits)
    computed: dict[str, Any]
    consent: dict[str, ConsentState]
    scores: dict[str, Score]
    identifiers: set[str]
    merged_from: list[str]
    first_seen: float | None
    last_seen: float | None
    event_count: int

    def trait_values(self) -> dict[str, Any]:
        return {name: version.value for name, version in self.traits.items() if version.value is not None}

    def to_dict(self) -> dict[str, Any]:
        return {
            "person_id": self.person_id,
            "traits": {name: version.to_dict() for name, version in self.traits.items()},
            "groups": {name: version.to_dict() for name, version in self.groups.items()},
            "computed": dict(self.computed),
            "consent": {key: state.to_dict() for key, state in self.consent.items()},
            "scores": {name: score.to_dict() for name, score in self.scores.items()},
            "identifiers": sorted(self.identifiers),
            "merged_from": list(self.merged_from),
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "event_count": self.event_count,
        }
