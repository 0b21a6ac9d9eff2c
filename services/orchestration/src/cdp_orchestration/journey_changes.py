"""What a change of a journey is decided on and what it says when it cannot be made: the vocabulary of
`journeys.Journeys.change`.

A change is decided on the journey as read from the store (`Stored`: the record, its stored document and the
version it is at, which callers see as the journey's revision) and saved expecting that version. When
someone saved the journey in between, `change` reads it again and asks the call's `redecide` whether the
change may be decided again on what is stored now (`always` for a state move; `draft_as_read` for a call
about the draft, only while the draft is the one it read; `draft_as_read_or_gone` for a discard, also when
the draft is gone). When it may not, or when the caller gave the revision it read and the journey is no
longer at it, the call is refused with `JourneyChanged` (ABORTED, reason journey_changed), which names the
journey, what changed (`what_changed`: versions and states, never content) and the command that reads it
again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cdp_kit.errors import Conflict
from cdp_orchestration.domain.lifecycle import JourneyRecord


@dataclass(frozen=True, slots=True)
class Stored:
    """A journey's record as read from the store, with its stored document and the version it is at: what a
    change is decided on, and what the change's save expects to find still there."""

    record: JourneyRecord
    doc: dict[str, Any]
    version: int


@dataclass(frozen=True, slots=True)
class Changed:
    """What `Journeys.change` did: `read` is the record the change was (last) decided on, `saved` the record
    saved (None: the decision was to change nothing)."""

    read: Stored
    saved: JourneyRecord | None


class JourneyChanged(Conflict):
    """A journey changed by another call between this call's read and its save, in a way this call cannot
    decide again on its own (ABORTED): its caller reads it again and repeats the call if it still applies."""

    reason = "journey_changed"

    def __init__(self, journey_id: str, what: str, *, draft: bool, message: str | None = None) -> None:
        read = f"cdpctl journey get {journey_id}" + (" --draft" if draft else "")
        super().__init__(
            message
            or f"journey {journey_id} was changed by someone else since this call read it ({what}): read it again "
            f"({read}) and repeat the call if it still applies"
        )
        self.journey_id = journey_id

    @classmethod
    def since_revision(cls, journey_id: str, expected: int, now: Stored, what: str = "") -> JourneyChanged:
        """The caller read the journey at revision `expected`; it is at `now.version`. `what`: what changed,
        when known (the save this call lost to), else what the journey is now."""
        draft = now.record.draft is not None
        if expected > now.version:  # never that far: not a race, a revision from elsewhere
            read = f"cdpctl journey get {journey_id}" + (" --draft" if draft else "")
            return cls(
                journey_id,
                "",
                draft=draft,
                message=f"journey {journey_id} is at revision {now.version} and has never been at revision {expected} "
                f"(the one this call expects): read it again ({read}) and repeat the call with the revision it shows",
            )
        saves = now.version - expected
        what = what or ("saved once since" if saves == 1 else f"saved {saves} times since")
        return cls(
            journey_id,
            f"{what}; revision {expected} read, revision {now.version} now: {summary(now.record)}",
            draft=draft,
        )


Decide = Callable[[JourneyRecord], "JourneyRecord | Awaitable[JourneyRecord | None] | None"]
Redecide = Callable[[JourneyRecord, JourneyRecord], bool]


def _draft_document(record: JourneyRecord) -> Mapping[str, Any] | None:
    return record.draft.document if record.draft is not None else None


def always(before: JourneyRecord, now: JourneyRecord) -> bool:
    """`redecide` for a change of state (pause, resume, archive): it is decided on whatever is stored."""
    return True


def draft_as_read(before: JourneyRecord, now: JourneyRecord) -> bool:
    """`redecide` for a call about the draft (save one, publish it): decided again only on the draft it read."""
    return _draft_document(before) == _draft_document(now)


def draft_as_read_or_gone(before: JourneyRecord, now: JourneyRecord) -> bool:
    """`redecide` for discarding the draft: also when there is none now (nothing is left to discard)."""
    return now.draft is None or draft_as_read(before, now)


def what_changed(before: JourneyRecord, now: JourneyRecord) -> str:
    """How `now` differs from `before`, in words for the caller (versions and states, never content)."""
    if before.draft is None and now.draft is not None:
        return f"a draft was saved (v{now.draft.version})"
    if before.draft is not None and now.draft is None:
        if now.versions.get(before.draft.version) is not None:
            return f"its draft was published as v{before.draft.version}"
        return f"its draft (v{before.draft.version}) was discarded"
    if _draft_document(before) != _draft_document(now):
        return "its draft was saved again"
    if before.state is not now.state:
        return f"it was made {now.state.value}"
    return "it was saved again"


def summary(record: JourneyRecord) -> str:
    """The journey in a few words for the caller: its state and versions ("paused, live v1, draft v2")."""
    live = f"live v{record.live.version}" if record.live is not None else "never published"
    draft = f", draft v{record.draft.version}" if record.draft is not None and record.live is not None else ""
    return f"{record.state.value}, {live}{draft}"
