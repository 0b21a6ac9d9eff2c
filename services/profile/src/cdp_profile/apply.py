"""What each consumed message does to the hot profiles: the domain step of every stream profile reads.

The partitioned streams (`events.resolved.<p>`, `scores.updated.<p>`, identity's merges and unmerges
`identity.*.<p>`) are decoded one message at a time (`decode_*`: pure, `Reject` for a message that can
never be applied) and applied a batch at a time, the persons they name loaded first. Each `apply_*` takes the hot state and returns
an `Applied`: the profile changes by person (what the group commit writes and what is
published), the other records to write (tombstones), and counts for the metrics. Nothing here commits,
publishes or acknowledges: that is the kit's partitioned engine (`stream.py` hands it these functions).
A message that cannot be decoded is dead-lettered alone and costs only itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from math import isfinite

from google.protobuf.message import DecodeError

from cdp.events.v1 import events_pb2
from cdp.identity.v1 import identity_pb2
from cdp.scoring.v1 import scoring_pb2
from cdp_kit.bus import Delivery
from cdp_kit.engine import Reject
from cdp_kit.profile_fields import SCORES, field_key
from cdp_kit.storage import Delete, Put
from cdp_kit.timestamps import to_seconds
from cdp_profile.domain import ComputedTraits, Profile, ProfileChange, ProfileEvent
from cdp_profile.events import event_and_received
from cdp_profile.records import PROFILES
from cdp_profile.records import SCORES as SCORE_RECORDS
from cdp_profile.state import HotProfiles

log = logging.getLogger("cdp.profile.apply")


@dataclass(slots=True)
class Applied:
    changes: dict[str, ProfileChange] = field(default_factory=dict)
    ops: list[Put | Delete] = field(default_factory=list)  # records besides the changed profiles
    causes: dict[str, str] = field(default_factory=dict)  # person -> cause, where it is not the batch's
    outcomes: dict[str, int] = field(default_factory=lambda: {"applied": 0, "deleted_person": 0})
    newest_received: float = 0.0  # collector acceptance of the newest event applied (0: none)
    # Merge notices for a survivor this replica does not apply (see `apply_identity_notices`).
    elsewhere: list[tuple[IdentityNotice, str]] = field(default_factory=list)

    def fold(self, person: str, change: ProfileChange) -> None:
        if not change.publishable:  # a copy of an applied event still lists its id (orchestration waits on it)
            return
        known = self.changes.get(person)
        if known is None:
            self.changes[person] = change
        else:
            known.combine(change)


# --- events.resolved.<p> ------------------------------------------------------------------------------


def decode_events(
    delivery: Delivery, *, needs_context: bool, context_keep: tuple[tuple[str, ...], ...] | None = None
) -> list[tuple[str, ProfileEvent, float]]:
    """(person, event, received) of one `ResolvedEventBatch` message, in order; `Reject` if it is not one.
    With `context_keep` (the definitions' `ComputedTraits.context_keep`) only those context fields are
    converted: the profile reads and keeps no other."""
    message = events_pb2.ResolvedEventBatch()
    try:
        message.ParseFromString(delivery.data)
    except DecodeError as exc:
        raise Reject("invalid_message", "data", f"not a cdp.events.v1.ResolvedEventBatch ({exc})") from None
    out = []
    for resolved in message.events:
        person = resolved.person_id
        if person:
            event, received = event_and_received(resolved, resolved.event, needs_context, context_keep)
            out.append((person, event, received))
    return out


def apply_events(
    hot: HotProfiles, items: Sequence[tuple[str, ProfileEvent, float]], defs: ComputedTraits, *, now: float
) -> Applied:
    """Apply events to their persons' profiles (following merges); the persons must be loaded."""
    out = Applied()
    for person, event, received in items:
        target = hot.root(person)
        if target in hot.deleted:
            # In flight before the deletion, or resolved by identity before the notice reached it: identity
            # names a person it meets again after purging by a new id, so an event under a deleted id is
            # never a new life - a profile made of it would be one nobody can reach by an identifier.
            out.outcomes["deleted_person"] += 1
            continue
        profile = hot.profiles.get(target)
        created = profile is None
        if created:
            profile = hot.profiles[target] = Profile.new(target, retention=hot.retention)
        change = profile.apply(event, defs, now=now)
        change.created = created
        out.outcomes["applied"] += 1
        out.newest_received = max(out.newest_received, received)
        out.fold(target, change)
    for person in out.changes:
        profile = hot.profiles.get(person)
        if profile is not None:
            hot.expiries.schedule_applied(profile)
    return out


# --- identity.merged.<p> / identity.unmerged.<p> -------------------------------------------------------

# A notice another partition handed on (`Cdp-Forwarded-From: <partition>`): applied where it lands.
FORWARDED_FROM = "Cdp-Forwarded-From"
_NOTICES = {"merged": identity_pb2.IdentityMerged, "unmerged": identity_pb2.IdentityUnmerged}


@dataclass(slots=True)
class IdentityNotice:
    """One merge or unmerge notification, decoded; `data` and `msg_id` as received (for forwarding)."""

    kind: str  # "merged" | "unmerged"
    message: identity_pb2.IdentityMerged | identity_pb2.IdentityUnmerged
    data: bytes
    msg_id: str
    forwarded: bool = False

    @property
    def persons(self) -> tuple[str, str]:
        return self.message.winner, self.message.loser


def decode_identity(delivery: Delivery) -> IdentityNotice:
    """`identity.merged[.<p>]` / `identity.unmerged[.<p>]`; `Reject` for anything else or unreadable."""
    parts = delivery.subject.split(".")
    kind = parts[1] if len(parts) > 1 and parts[0] == "identity" else ""
    decoder = _NOTICES.get(kind)
    if decoder is None:
        raise Reject("invalid_message", "subject", f"{delivery.subject} is not a merge notification")
    try:
        message = decoder.FromString(delivery.data)
    except DecodeError as exc:
        raise Reject("invalid_message", "data", f"not a {decoder.DESCRIPTOR.full_name} ({exc})") from None
    if not message.winner or not message.loser or not message.merge_id:
        raise Reject("invalid_message", "merge_id", "a merge notification names its merge, winner and loser")
    msg_id = delivery.msg_id or f"{kind}:{message.merge_id}:{to_seconds(message.at)}"
    return IdentityNotice(kind, message, delivery.data, msg_id, forwarded=FORWARDED_FROM in delivery.headers)


def apply_identity_notices(
    hot: HotProfiles,
    notices: Sequence[IdentityNotice],
    defs: ComputedTraits,
    *,
    here: Callable[[IdentityNotice, str], bool],
    now: float,
) -> Applied:
    """Combine the profiles of merged persons and split unmerged ones, in order; causes "merge" /
    "unmerge". The persons must be loaded (`HotProfiles.load` of every notice's `persons`). A notice
    whose survivor (the root of its winner, as this replica knows it) `here` declines is not applied
    but listed in `elsewhere` with that survivor: the caller hands it to the survivor's owner."""
    out = Applied()
    for notice in notices:
        survivor = hot.root(notice.message.winner)
        if not here(notice, survivor):
            out.elsewhere.append((notice, survivor))
            continue
        if notice.kind == "merged":
            _merge(hot, notice.message, defs, now=now, out=out)  # type: ignore[arg-type]
            out.causes.update(dict.fromkeys(notice.persons, "merge"))
        else:
            _unmerge(hot, notice.message, defs, now=now, out=out)  # type: ignore[arg-type]
            out.causes.update(dict.fromkeys(notice.persons, "unmerge"))
    return out


async def apply_identity(
    hot: HotProfiles, batch: Sequence[Delivery], defs: ComputedTraits, *, owns: Callable[[str], bool], now: float
) -> Applied:
    """The notices identity published before they were partitioned (`identity.merged` on each replica's
    durable): applied only by the replica owning the survivor, as then; the others skip them."""
    notices = []
    for delivery in batch:
        try:
            notices.append(decode_identity(delivery))
        except Reject as bad:
            delivery.reject(bad.reason, str(bad))
    await hot.load({person for notice in notices for person in notice.persons})
    out = apply_identity_notices(hot, notices, defs, here=lambda _notice, survivor: owns(survivor), now=now)
    for notice, _survivor in out.elsewhere:
        if notice.kind == "merged" and notice.message.loser in hot.profiles:
            log.warning("merge across replicas not combined", extra={"merge": notice.message.merge_id})
    out.elsewhere.clear()
    return out


def _merge(
    hot: HotProfiles, merged: identity_pb2.IdentityMerged, defs: ComputedTraits, *, now: float, out: Applied
) -> None:
    winner, loser, merge_id = merged.winner, merged.loser, merged.merge_id
    owner = hot.root(winner)
    if hot.root(loser) == owner:
        return  # already merged (a redelivered notification)
    loser_root = hot.root(loser)
    absorbed = hot.profiles.pop(loser_root, None)
    hot.tombstones[loser_root] = owner
    out.ops.append(hot.versioned_put(loser_root, {"merged_into": owner, "merge_id": merge_id}))
    out.ops.append(Delete(SCORE_RECORDS, loser_root))  # its scores live on in the survivor's part; see records.py
    if absorbed is None:
        return
    survivor = hot.profiles.get(owner)
    if survivor is None:
        survivor = hot.profiles[owner] = Profile.new(owner, retention=hot.retention)
    change = survivor.merge(absorbed, merge_id=merge_id, at=to_seconds(merged.at), defs=defs, now=now)
    out.fold(owner, change)
    out.fold(loser_root, ProfileChange(person_id=loser_root, merged_into=owner))
    hot.expiries.schedule(survivor)


def _unmerge(
    hot: HotProfiles, unmerged: identity_pb2.IdentityUnmerged, defs: ComputedTraits, *, now: float, out: Applied
) -> None:
    winner, loser, merge_id = unmerged.winner, unmerged.loser, unmerged.merge_id
    owner = hot.root(winner)
    survivor = hot.profiles.get(owner)
    if survivor is None or loser not in survivor.parts:
        # Merged before it had a profile of its own: only the forwarding tombstone goes.
        if loser in hot.tombstones and hot.root(loser) == owner:
            del hot.tombstones[loser]
            out.ops.append(Delete(PROFILES, loser))
            hot.versions.pop(loser, None)
        return
    given = [f"{i.type}:{i.value}" for i in unmerged.loser_identifiers]
    restored, winner_change, loser_change = survivor.split(loser, merge_id=merge_id, defs=defs, now=now, given=given)
    hot.tombstones.pop(loser, None)
    hot.profiles[loser] = restored
    out.fold(owner, winner_change)
    loser_change.split_from = owner
    out.fold(loser, loser_change)
    hot.expiries.schedule(survivor)
    hot.expiries.schedule(restored)


# --- scores.updated.<p> ---------------------------------------------------------------------------------


@dataclass(slots=True)
class ScoreUpdate:
    """One `ScoresUpdatedBatch`, checked: `values[i]` holds person i's scores, by name."""

    model: str
    version: str
    persons: list[str]
    values: list[dict[str, float]]
    at: list[float]


def decode_scores(delivery: Delivery) -> list[ScoreUpdate]:
    """One `ScoresUpdatedBatch` message: its model version's scores and those it carries in `more` (one
    message per partition and scoring round), each one's shape and values checked (`Reject` names what is
    wrong)."""
    try:
        message = scoring_pb2.ScoresUpdatedBatch.FromString(delivery.data)
    except DecodeError as exc:
        raise Reject("invalid_message", "data", f"not a cdp.scoring.v1.ScoresUpdatedBatch ({exc})") from None
    updates = [_score_update(message, "")]
    for index, more in enumerate(message.more):
        if more.more:
            raise Reject("invalid_message", f"more[{index}].more", "only the outer batch carries others")
        updates.append(_score_update(more, f"more[{index}]."))
    return updates


def _score_update(message: scoring_pb2.ScoresUpdatedBatch, where: str) -> ScoreUpdate:
    names, persons, values = list(message.scores), list(message.person_ids), list(message.values)
    width = len(names)
    if not width or len(values) != width * len(persons) or len(message.at_ms) != len(persons):
        raise Reject(
            "invalid_message",
            f"{where}values",
            f"{len(persons)} persons, {width} scores, {len(values)} values, {len(message.at_ms)} times",
        )
    if not message.model:
        raise Reject("invalid_score", f"{where}model", "must name the model that produced the scores")
    for name in names:
        if not name:
            raise Reject("invalid_score", f"{where}scores", "a score name is empty")
    # A NaN or an infinity makes the sum one (so do finite values past a double's range: then each is looked at).
    if not isfinite(sum(values)):
        for i, value in enumerate(values):
            if not isfinite(value):
                raise Reject("invalid_score", where + field_key(SCORES, names[i % width]), "must be a finite number")
    if width == 1:  # most models have one score: no slice and zip per person
        name = names[0]
        by_person = [{name: value} for value in values]
    else:  # person i's values are values[i * width : (i + 1) * width]: `width` at a time off one iterator
        taken = iter(values)
        by_person = [dict(zip(names, row, strict=True)) for row in zip(*[taken] * width, strict=True)]
    return ScoreUpdate(
        model=message.model,
        version=message.version,
        persons=persons,
        values=by_person,
        at=[ms / 1000 for ms in message.at_ms],
    )


def apply_scores(hot: HotProfiles, updates: Sequence[ScoreUpdate], *, owns: Callable[[str], bool]) -> Applied:
    """Model scores become profile fields (the persons must be loaded); cause "score".

    A score replaces the one of the same name only if it comes from a later profile change, so a
    redelivered or late batch changes nothing."""
    out = Applied()
    changes = out.changes
    # A scoring round is one update per model, so a person is met once per model that scored them: where
    # their scores go is looked up once per batch, and the scores each model moved (`Profile.take_scores`:
    # checked by `decode_scores` already) are gathered by person: one change each.
    targets: dict[str, tuple[str, Profile, dict[str, float]] | None] = {}
    moves: dict[str, dict[str, float]] = {}  # by target: two persons of a batch may share one (a merge)
    profiles, root = hot.profiles, hot.root
    for update in updates:
        model, version = update.model, update.version
        for person, scores, at in zip(update.persons, update.values, update.at, strict=True):
            found = targets.get(person, _UNSEEN)
            if found is _UNSEEN:
                target = root(person)
                profile = profiles.get(target)
                # None: deleted, or merged into a person another replica owns: nothing here holds the score.
                if profile is None or not owns(target):
                    found = targets[person] = None
                else:
                    moved = moves.get(target)
                    if moved is None:
                        moved = moves[target] = {}
                    found = targets[person] = (target, profile, moved)
            if found is None:
                continue
            target, profile, moved = found
            first = not moved
            profile.take_scores(scores, model, version, at, moved)
            if first and moved:  # the person's first move in the batch: its change (in the order persons moved)
                changes[target] = ProfileChange(target, scores=moved)
    return out


_UNSEEN = object()
