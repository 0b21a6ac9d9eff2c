"""The identity graph: identifiers → persons, merges with their cause (lineage), unmerge, quarantine.

The graph is a partition of identifiers into persons. Each identifier is owned by the person it first
attached to; a person that lost a merge points at the winner (`merged_into`), so an identifier's person
is found by following those pointers to a *root*. The root holds the whole tree: every identifier in it
(with its owner) and every merge inside it (lineage). That makes a merge one pointer plus a union, and
an unmerge the reverse: the loser's subtree (the persons whose pointers lead to it) takes back exactly the
identifiers they own and the merges inside it. Identifiers attached after a merge belong to the person
they attached to (the root at the time) and stay there on unmerge.

Plain Python, no I/O: the service loads the records a batch needs (`missing_*`), applies events
synchronously, and writes back what `take_dirty()` returns and deletes what `take_removed()` returns.

Sharing across persons: an identifier of a type with `quarantine_after` remembers the other persons it
appeared with (`IdentifierState.conflicts`, noted also once it is quarantined), and every resolution
says, per identifier type of its event, how many persons other than the event's own were seen with those
identifiers in the day before it (`Resolution.shared`; counts only). That is how a fraud model sees four
accounts on one phone that the default rules (one user id per person) keep as four persons. The persons
seen with an identifier before are told too when a new person joins them (`Resolution.told`: the phone's
first account learns of the second, third and fourth) - at most once per person that joins, and only
while the count is at most SHARED_NOTIFY_MAX, so a shop's tablet seen with hundreds tells nobody.

A privacy deletion (`purge`) removes persons with everything merged into them and every identifier they
own, and rewrites the surviving records that mention them (separations, drops, merge causes,
quarantine evidence), so the graph keeps no trace of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Set
from dataclasses import dataclass, field
from typing import Any

from cdp_identity.domain.normalize import Identifier, split_key
from cdp_identity.domain.rules import MergeRules

MAX_DROPS_KEPT = 50
#: The most identifiers one person (with everyone merged into them) holds: past it, an event's identifier
#: new to the graph is left out of its linking (drop reason `limit:identifiers`), and so is one of another
#: person whose linking would take the two past it, whatever the types' own limits (anonymous_id has
#: none). A person's record lists every identifier it holds and every merge, and the store keeps a
#: document of at most 8 MiB: 27,000 events of one user id, each with an anonymous id of its own (a
#: server integration making one per call) of 256 characters, took it past that, and from then on every
#: write of the partition failed - the partition reloaded its cache and retried the batch for ever, every
#: other person of it unresolved. 2,000 of the longest identifiers and as many merges with their causes
#: stay under 3 MiB; a person who really used that many browsers keeps the first 2,000.
MAX_IDENTIFIERS = 2000
# Undone merges a person keeps on its trail (PersonState.undone), the latest.
MAX_UNDONE_KEPT = 50
MAX_CONFLICTS_KEPT = 64
# `Resolution.shared` counts the persons seen with an identifier in the day before the event.
SHARED_WINDOW_MS = 24 * 3_600_000
# Evidence of a person already noted on an identifier less than this long ago is not rewritten: a shared
# device then costs at most one write a minute per person on it, not one per event.
CONFLICT_REFRESH_MS = 60_000
# The persons already seen with an identifier are told of a new one only while they then share it with at
# most this many others: a shared tablet seen with hundreds of persons would otherwise publish hundreds of
# events per new visitor (and a count that high says "public device", not "ring").
SHARED_NOTIFY_MAX = 10


def stable_id(prefix: str, *parts: str) -> str:
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=12).hexdigest()
    return f"{prefix}{digest}"


def mentions(value: Any, names: Set[str]) -> bool:
    """Whether a stored document holds any of `names` as a whole string anywhere (a key or a value, at
    any depth): how a privacy purge finds the records that name a purged person or identifier."""
    if isinstance(value, str):
        return value in names
    if isinstance(value, dict):
        return any(k in names or mentions(v, names) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(mentions(v, names) for v in value)
    return False


@dataclass(slots=True)
class IdentifierState:
    person: str  # the person that owns it directly (follow merged_into to the root)
    first_seen: int  # event time, epoch ms
    event_id: str
    quarantined_at: int | None = None
    # person -> last time (ms) this identifier appeared together with that person's identifiers while
    # belonging to another person: the evidence for quarantine.
    conflicts: dict[str, int] = field(default_factory=dict)

    def to_doc(self) -> dict[str, Any]:
        return {
            "person": self.person,
            "first_seen": self.first_seen,
            "event_id": self.event_id,
            "quarantined_at": self.quarantined_at,
            "quarantined": self.quarantined_at is not None,
            "conflicts": [[p, t] for p, t in self.conflicts.items()],
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> IdentifierState:
        return cls(
            person=doc["person"],
            first_seen=doc["first_seen"],
            event_id=doc.get("event_id", ""),
            quarantined_at=doc.get("quarantined_at"),
            conflicts={p: t for p, t in doc.get("conflicts", [])},
        )


@dataclass(slots=True)
class PersonState:
    id: str
    created_at: int
    merged_into: str | None = None
    # Root only: every identifier in the tree -> (added at ms, owning person).
    ids: dict[str, tuple[int, str]] = field(default_factory=dict)
    # Root only: every merge inside the tree, oldest first.
    lineage: list[dict[str, Any]] = field(default_factory=list)
    # Root only: persons an unmerge separated from this tree (events may not merge them again) -> the
    # person in the tree the separation belongs to (it leaves with that person on a later unmerge).
    apart: dict[str, str] = field(default_factory=dict)
    drops: list[dict[str, Any]] = field(default_factory=list)
    # Root only: merges undone between persons of this tree and others, oldest first (the trail of
    # `unmerge`): the lineage entry as it was plus `undone_at`, `undone_by` (the caller's name), `reason`.
    # Both sides keep it; at most MAX_UNDONE_KEPT.
    undone: list[dict[str, Any]] = field(default_factory=list)

    def to_doc(self) -> dict[str, Any]:
        doc = {
            "created_at": self.created_at,
            "merged_into": self.merged_into,
            "ids": [[k, at, owner] for k, (at, owner) in self.ids.items()],
            "lineage": [dict(m) for m in self.lineage],
            "apart": [[other, member] for other, member in self.apart.items()],
            "drops": [dict(d) for d in self.drops],
        }
        if self.undone:
            doc["undone"] = [dict(u) for u in self.undone]
        return doc

    @classmethod
    def from_doc(cls, person_id: str, doc: dict[str, Any]) -> PersonState:
        return cls(
            id=person_id,
            created_at=doc["created_at"],
            merged_into=doc.get("merged_into"),
            ids={k: (at, owner) for k, at, owner in doc.get("ids", [])},
            lineage=list(doc.get("lineage", [])),
            apart=dict(([a, person_id] if isinstance(a, str) else a) for a in doc.get("apart", [])),
            drops=list(doc.get("drops", [])),
            undone=list(doc.get("undone", [])),
        )


@dataclass(frozen=True, slots=True)
class Drop:
    """An identifier left out of an event's linking, and the rule that dropped it."""

    key: str
    reason: str  # "limit:<type>", "quarantined", "separated", "shared", "unverified_claim"

    def as_dict(self) -> dict[str, str]:
        return {"identifier": self.key, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class Merge:
    id: str
    winner: str
    loser: str
    at: int
    cause: dict[str, Any]  # {"event_id", "identifiers", "rule"}

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "winner": self.winner, "loser": self.loser, "at": self.at, "cause": self.cause}


@dataclass(frozen=True, slots=True)
class Unmerge:
    merge_id: str
    winner: str
    loser: str
    at: int
    loser_identifiers: tuple[str, ...]
    reason: str


@dataclass(slots=True)
class Purged:
    """What `IdentityGraph.purge` removed, and which surviving records it rewrote."""

    persons: list[str] = field(default_factory=list)  # removed, those merged into others first
    identifiers: set[str] = field(default_factory=set)  # removed identifier keys
    merges: set[str] = field(default_factory=set)  # merge ids removed from lineage and the merge index
    rewritten_persons: set[str] = field(default_factory=set)
    rewritten_identifiers: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.persons or self.rewritten_persons or self.rewritten_identifiers)


@dataclass(slots=True)
class Resolution:
    person: str
    created: bool = False
    attached: list[str] = field(default_factory=list)
    merges: list[Merge] = field(default_factory=list)
    drops: list[Drop] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    # identifier type -> how many other persons were seen with the event's identifiers of that type in
    # the SHARED_WINDOW_MS before it (absent when none; see `IdentityGraph.shared_with`)
    shared: dict[str, int] = field(default_factory=dict)
    # Persons (roots) seen with the event's identifiers before a person new to them joined, other than
    # the event's own -> their `shared` as an event of theirs with those identifiers would now read it
    # (only the identifier types whose count rose). Empty for almost every event.
    told: dict[str, dict[str, int]] = field(default_factory=dict)


class IdentityGraph:
    def __init__(self, rules: MergeRules, *, shared_notify_max: int = SHARED_NOTIFY_MAX) -> None:
        self.rules = rules
        self.shared_notify_max = shared_notify_max  # CDP_IDENTITY_SHARED_NOTIFY_MAX; 0 tells nobody
        self.identifiers: dict[str, IdentifierState] = {}
        self.persons: dict[str, PersonState] = {}
        self.merge_index: dict[str, str] = {}  # merge id -> winner at the time of the merge
        self.dirty_identifiers: set[str] = set()
        self.dirty_persons: set[str] = set()
        self.dirty_merges: set[str] = set()
        # Removed by a purge and not yet handed over by take_removed(); dicts keep the removal order.
        self.removed_identifiers: dict[str, None] = {}
        self.removed_persons: dict[str, None] = {}
        self.removed_merges: dict[str, None] = {}

    # --- loading (the service fills the cache from the store before applying) ----------------------

    def missing_identifiers(self, keys: Iterable[str]) -> list[str]:
        return [k for k in keys if k not in self.identifiers]

    def missing_persons(self, person_ids: Iterable[str]) -> list[str]:
        return [p for p in person_ids if p not in self.persons]

    def load_identifier(self, key: str, doc: dict[str, Any]) -> None:
        self.identifiers.setdefault(key, IdentifierState.from_doc(doc))

    def load_person(self, person_id: str, doc: dict[str, Any]) -> None:
        self.persons.setdefault(person_id, PersonState.from_doc(person_id, doc))

    def load_merge(self, merge_id: str, winner: str) -> None:
        self.merge_index.setdefault(merge_id, winner)

    def unresolved_persons(self, keys: Iterable[str]) -> set[str]:
        """Persons an event with these identifiers needs that are not loaded yet: those on the way from the
        identifiers to their roots, and from the persons those roots were separated from and the persons
        the identifiers met (quarantine evidence) to theirs. Load them and ask again until it is empty."""
        needed: set[str] = set()

        def root(person_id: str | None) -> PersonState | None:
            person = None
            while person_id is not None:
                person = self.persons.get(person_id)
                if person is None:
                    needed.add(person_id)
                    return None
                person_id = person.merged_into
            return person

        for key in keys:
            state = self.identifiers.get(key)
            if state is None:
                continue
            for other in state.conflicts:
                root(other)
            own = root(state.person)
            for other in own.apart if own is not None else ():
                root(other)
        return needed

    # --- reading ---------------------------------------------------------------------------------

    def root_of(self, person_id: str) -> str:
        person = self.persons[person_id]
        while person.merged_into is not None:
            person = self.persons[person.merged_into]
        return person.id

    def person_of(self, key: str) -> str | None:
        """The root person of an identifier; None when it is unknown or its person is (a reference a
        privacy purge elsewhere left behind)."""
        state = self.identifiers.get(key)
        return None if state is None else self.canonical(state.person)

    def owned_by(self, keys: Iterable[str], person: str) -> list[str]:
        """Those of `keys` whose identifier belongs to `person` (a root) now, in their order."""
        return [key for key in keys if self.person_of(key) == person]

    def canonical(self, person_id: str) -> str | None:
        """The live person a (possibly merged-away) person id now belongs to; None when it, or a person
        on the way to its root, is not known (never was, or was purged)."""
        person = self.persons.get(person_id)
        while person is not None and person.merged_into is not None:
            person = self.persons.get(person.merged_into)
        return None if person is None else person.id

    def forget_identifier(self, key: str) -> None:
        """Drop an identifier from the cache without deleting its record (one whose person is gone)."""
        self.identifiers.pop(key, None)
        self.dirty_identifiers.discard(key)

    def identifiers_of(self, root: str) -> list[str]:
        return list(self.persons[root].ids)

    def describe(self, person_id: str) -> dict[str, Any]:
        root = self.persons[self.root_of(person_id)]
        identifiers = []
        for key, (added_at, owner) in root.ids.items():
            state = self.identifiers.get(key)
            kind, value = split_key(key)
            identifiers.append(
                {
                    "type": kind,
                    "value": value,
                    "added_at": added_at,
                    "owner": owner,
                    "quarantined": bool(state and state.quarantined_at),
                }
            )
        return {
            "person": root.id,
            "requested": person_id,
            "created_at": root.created_at,
            "identifiers": identifiers,
            "merges": list(root.lineage),
            "apart": list(root.apart),
            "drops": list(root.drops),
            "undone": list(root.undone),
        }

    def partition(self) -> dict[str, frozenset[str]]:
        """root -> its identifier keys; the whole graph as a set partition (for checks and tests)."""
        groups: dict[str, set[str]] = {}
        for key in self.identifiers:
            groups.setdefault(self.person_of(key), set()).add(key)  # type: ignore[arg-type]
        return {root: frozenset(keys) for root, keys in groups.items()}

    # --- applying ---------------------------------------------------------------------------------

    def unverified_claims(self, identifiers: list[Identifier], types: Set[str]) -> tuple[list[Identifier], list[Drop]]:
        """An event of a client source whose user id was not verified (`Event.source_trust`
        CLIENT_UNVERIFIED): the identifiers it may link, and those it may not. An identifier of one of
        `types` (from_client "verified": user_id, email, phone) that a person other than the event's own
        holds is a claim nobody vouched for - a visitor sending another's email - and is left out
        (unverified_claim), so it neither attaches the event's anonymous id or device to that person
        nor merges. The event's own person is that of its first known, unquarantined identifier of
        another type (its anonymous id, its device); none known: every held one is another's."""
        own = None
        for ident in identifiers:
            if ident.type not in types:
                state = self.identifiers.get(ident.key)
                if state is not None and state.quarantined_at is None:
                    own = self.root_of(state.person)
                    break
        kept: list[Identifier] = []
        drops: list[Drop] = []
        for ident in identifiers:
            state = self.identifiers.get(ident.key) if ident.type in types else None
            if state is not None and self.root_of(state.person) != own:
                drops.append(Drop(ident.key, "unverified_claim"))
            else:
                kept.append(ident)
        return kept, drops

    def resolve(
        self,
        identifiers: list[Identifier],
        *,
        event_id: str,
        at: int,
        rule: str = "event",
        read_only: bool = False,
        dropped: list[Drop] | None = None,
    ) -> Resolution | None:
        """Attach, link and merge as one event says; None when the event carries no usable identifier.

        `identifiers` are normalised and strongest first. `read_only` answers who the event belongs to
        without changing anything (an event already applied before a crash). `dropped`: identifiers the
        caller left out already (`unverified_claims`), listed first in the resolution's drops and
        recorded on its person like the graph's own.
        """
        if dropped:
            resolution = self.resolve(identifiers, event_id=event_id, at=at, rule=rule, read_only=read_only)
            if resolution is not None:
                resolution.drops[:0] = dropped
                if not read_only:
                    self._record_drops(resolution.person, list(dropped), event_id, at)
            return resolution
        if not read_only and (known := self._one_known_person(identifiers)) is not None:
            # Almost every event: nothing to attach, link, drop or note; only its sharing counts to read.
            return Resolution(person=known, shared=self.shared_with(identifiers, known, at))
        accepted_roots: list[str] = []
        new: list[Identifier] = []
        drops: list[Drop] = []
        quarantined_fallback: str | None = None
        met: list[tuple[str, str]] = []  # (identifier key, its root) of every known identifier: quarantine evidence
        # Quarantined identifiers keep noting whom they are seen with (sharing counts stay true after a
        # quarantine), but are no evidence against the event's other identifiers.
        met_quarantined: list[tuple[str, str]] = []

        for ident in identifiers:
            key = ident.key
            state = self.identifiers.get(key)
            if state is None:
                if read_only:
                    continue
                if self._new_over_limit(accepted_roots, new, ident, at):
                    drops.append(Drop(key, f"limit:{ident.type}"))
                elif self._held(accepted_roots) + len(new) >= MAX_IDENTIFIERS:
                    drops.append(Drop(key, "limit:identifiers"))
                else:
                    new.append(ident)
                continue
            root = self.root_of(state.person)
            if not read_only:
                (met if state.quarantined_at is None else met_quarantined).append((key, root))
            if root in accepted_roots:
                continue
            if state.quarantined_at is not None:
                quarantined_fallback = quarantined_fallback or root
                drops.append(Drop(key, "quarantined"))
                continue
            # Seen with another person its own could not be linked to (two users signed in on one tablet in
            # turn): whose event this is, the identifier cannot tell, so it links nobody to its person.
            shared = self._shared(state, root, at)
            if read_only:
                if shared:
                    quarantined_fallback = quarantined_fallback or root
                elif not accepted_roots:
                    accepted_roots.append(root)
                continue
            if self._separated(accepted_roots, root):
                drops.append(Drop(key, "separated"))
            elif self._adds_over_limit(accepted_roots, root, new, at):
                drops.append(Drop(key, f"limit:{self._violated_type(accepted_roots, root, new, at)}"))
            elif (accepted_roots or new) and self._held([*accepted_roots, root]) + len(new) > MAX_IDENTIFIERS:
                drops.append(Drop(key, "limit:identifiers"))
            elif shared:
                quarantined_fallback = quarantined_fallback or root
                drops.append(Drop(key, "shared"))
            else:
                accepted_roots.append(root)

        if read_only:
            person = accepted_roots[0] if accepted_roots else quarantined_fallback
            if person is None:
                return None
            return Resolution(person=person, shared=self.shared_with(identifiers, person, at))

        if not accepted_roots and not new:
            if quarantined_fallback is None:
                return None
            resolution = Resolution(person=quarantined_fallback, drops=drops)
            self._record_drops(quarantined_fallback, drops, event_id, at)
            resolution.shared = self.shared_with(identifiers, quarantined_fallback, at)
            return resolution

        if accepted_roots:
            winner = self._choose_winner(accepted_roots)
            resolution = Resolution(person=winner)
        else:
            winner = stable_id("p_", event_id, new[0].key)
            self.persons[winner] = PersonState(id=winner, created_at=at)
            self.dirty_persons.add(winner)
            self.removed_persons.pop(winner, None)
            resolution = Resolution(person=winner, created=True)

        cause_ids = [i.key for i in identifiers]
        for loser in accepted_roots:
            if loser != winner:
                resolution.merges.append(
                    self._merge(winner, loser, at, {"event_id": event_id, "identifiers": cause_ids, "rule": rule})
                )
        winner_state = self.persons[winner]
        for ident in new:
            self.identifiers[ident.key] = IdentifierState(person=winner, first_seen=at, event_id=event_id)
            winner_state.ids[ident.key] = (at, winner)
            self.dirty_identifiers.add(ident.key)
            self.removed_identifiers.pop(ident.key, None)
            resolution.attached.append(ident.key)
        if new:
            self.dirty_persons.add(winner)

        resolution.drops = drops
        self._record_drops(winner, drops, event_id, at)
        # Evidence for quarantine: each identifier met the identifiers of every other person in the event
        # (the winner included); persons the event merged are one person and no evidence.
        persons_met = sorted({root for _, root in met} | {winner})
        # Almost every event: its identifiers are all its own person's, nobody is new to any of them.
        sharing = (
            self._sharing_before(met, met_quarantined, persons_met, at)
            if len(persons_met) > 1 or met_quarantined
            else None
        )
        for key, root in met:
            for other in persons_met:
                if self.root_of(other) != self.root_of(root) and self._note_conflict(key, root, other, at):
                    resolution.quarantined.append(key)
        for key, root in met_quarantined:
            for other in persons_met:
                if self.root_of(other) != self.root_of(root):
                    self._note_conflict(key, root, other, at)
        resolution.shared = self.shared_with(identifiers, winner, at)
        if sharing:
            resolution.told = self._told(identifiers, sharing, winner, at)
        return resolution

    def _one_known_person(self, identifiers: list[Identifier]) -> str | None:
        """The person every one of these identifiers already belongs to, when all are known, none is
        quarantined and they share one root; None otherwise. For such an event `resolve` would link
        nothing new (one root: no merge, no limit, no separation), drop nothing and note no quarantine
        evidence (an identifier meeting its own person is none) - it only answers the person."""
        root = None
        for ident in identifiers:
            state = self.identifiers.get(ident.key)
            if state is None or state.quarantined_at is not None:
                return None
            person = self.root_of(state.person)
            if root is None:
                root = person
            elif person != root:
                return None
        return root

    def _sharing_before(
        self, met: list[tuple[str, str]], met_quarantined: list[tuple[str, str]], persons_met: list[str], at: int
    ) -> dict[str, set[str]] | None:
        """Before noting the event's evidence: for each identifier it is about to note a person on that
        is new to it (not seen with it in the SHARED_WINDOW_MS before `at`), the persons seen with it in
        that window - its owner and its recent evidence. None when there is none (almost every event:
        one person, or the same persons as before)."""
        found: dict[str, set[str]] | None = None
        horizon = at - SHARED_WINDOW_MS
        for key, root in (*met, *met_quarantined):
            kind = self.rules.type(key.partition(":")[0])
            if kind is None or kind.quarantine_after is None:
                continue
            state = self.identifiers[key]
            own = self.root_of(root)
            for other in persons_met:
                if self.root_of(other) == own:
                    continue
                noted = state.conflicts.get(other)
                if noted is None or noted < horizon:
                    break
            else:
                continue
            found = found if found is not None else {}
            found[key] = self._seen_with(key, at)
        return found

    def _seen_with(self, key: str, at: int) -> set[str]:
        """The persons (roots) seen with an identifier in the SHARED_WINDOW_MS before `at`, its owner too."""
        state = self.identifiers[key]
        horizon = at - SHARED_WINDOW_MS
        seen = {self.canonical(p) for p, t in state.conflicts.items() if t >= horizon}
        seen.add(self.canonical(state.person))
        seen.discard(None)
        return seen  # type: ignore[return-value]

    def _told(
        self, identifiers: list[Identifier], sharing: dict[str, set[str]], winner: str, at: int
    ) -> dict[str, dict[str, int]]:
        """The persons to tell that they now share identifiers with more persons (`Resolution.told`): those
        seen with an identifier before the event, when the event brought it a person new to it, while
        they then share it with at most `shared_notify_max` others. The event's own person is not told (its
        event says it)."""
        by_key = {ident.key: ident for ident in identifiers}
        grown: dict[str, list[Identifier]] = {}
        for key, before in sharing.items():
            after = self._seen_with(key, at)
            if len(after) <= len(before) or len(after) - 1 > self.shared_notify_max:
                continue
            for person in before:
                if person != winner and person in after:
                    grown.setdefault(person, []).append(by_key[key])
        told = {}
        for person, idents in grown.items():
            shared = self.shared_with(idents, person, at)
            if shared:
                told[person] = shared
        return told

    def shared_with(self, identifiers: Iterable[Identifier], person: str, at: int) -> dict[str, int]:
        """Per identifier type: how many persons other than `person` (a root) were seen with these
        identifiers within SHARED_WINDOW_MS before `at` - each identifier's owner and the persons in its
        quarantine evidence, merged persons once. Empty for almost every event: only identifiers that met
        another person in that window cost more than a lookup."""
        horizon = at - SHARED_WINDOW_MS
        by_type: dict[str, set[str]] | None = None
        for ident in identifiers:
            state = self.identifiers.get(ident.key)
            if state is None or not state.conflicts:
                continue
            recent = [p for p, t in state.conflicts.items() if t >= horizon]
            if not recent:
                continue
            others = {self.canonical(p) for p in recent}
            others.add(self.canonical(state.person))
            others.discard(None)
            others.discard(person)
            if others:
                by_type = by_type if by_type is not None else {}
                by_type.setdefault(ident.type, set()).update(others)  # type: ignore[arg-type]
        return {} if by_type is None else {kind: len(persons) for kind, persons in by_type.items()}

    def merge(self, winner: str, loser: str, *, at: int, cause: dict[str, Any], force: bool = False) -> Merge | None:
        """An explicit merge (API, review queue, matching). Limits apply unless `force`; None when the two
        already are one person."""
        winner, loser = self.root_of(winner), self.root_of(loser)
        if winner == loser:
            return None
        if not force:
            if self._separated([winner], loser):
                raise MergeRefused("separated", f"{loser} was split from {winner}; merge with force to override")
            if self._adds_over_limit([winner], loser, [], at):
                kind = self._violated_type([winner], loser, [], at)
                raise MergeRefused(f"limit:{kind}", f"merging would exceed the {kind} limit")
        return self._merge(winner, loser, at, cause)

    def unmerge(self, merge_id: str, *, at: int, reason: str = "", by: str = "") -> Unmerge:
        """Split the loser of `merge_id` back out, with everything it brought and everything merged into it."""
        winner_then = self.merge_index.get(merge_id)
        if winner_then is None or winner_then not in self.persons:
            raise KeyError(merge_id)
        root = self.persons[self.root_of(winner_then)]
        entry = next((m for m in root.lineage if m["id"] == merge_id), None)
        if entry is None:
            raise KeyError(merge_id)
        loser = self.persons[entry["loser"]]
        children: dict[str, list[str]] = {}
        for m in root.lineage:
            if m["id"] != merge_id:
                children.setdefault(m["winner"], []).append(m["loser"])
        subtree = {loser.id}
        stack = [loser.id]
        while stack:
            for child in children.get(stack.pop(), []):
                if child not in subtree:
                    subtree.add(child)
                    stack.append(child)
        loser.merged_into = None
        loser.ids = {k: v for k, v in root.ids.items() if v[1] in subtree}
        root.ids = {k: v for k, v in root.ids.items() if v[1] not in subtree}
        loser.lineage = [m for m in root.lineage if m["id"] != merge_id and m["winner"] in subtree]
        root.lineage = [m for m in root.lineage if m["id"] != merge_id and m["winner"] not in subtree]
        loser.apart = {p: member for p, member in root.apart.items() if member in subtree}
        root.apart = {p: member for p, member in root.apart.items() if member not in subtree}
        root.apart.setdefault(loser.id, root.id)
        loser.apart.setdefault(root.id, loser.id)
        # The trail: an earlier undone merge goes with each side it names a person of (an undo between the
        # two sides: both); this one stays on both.
        remaining = {root.id} | {p for m in root.lineage for p in (m["winner"], m["loser"])}
        undone = {**entry, "undone_at": at, "undone_by": by, "reason": reason}
        loser.undone = [u for u in root.undone if u["winner"] in subtree or u["loser"] in subtree] + [undone]
        root.undone = [u for u in root.undone if u["winner"] in remaining or u["loser"] in remaining] + [undone]
        del loser.undone[:-MAX_UNDONE_KEPT], root.undone[:-MAX_UNDONE_KEPT]
        self.dirty_persons.update((root.id, loser.id))
        return Unmerge(
            merge_id=merge_id,
            winner=root.id,
            loser=loser.id,
            at=at,
            loser_identifiers=tuple(loser.ids),
            reason=reason,
        )

    def quarantine(self, key: str, at: int) -> bool:
        state = self.identifiers[key]
        if state.quarantined_at is not None:
            return False
        state.quarantined_at = at
        self.dirty_identifiers.add(key)
        return True

    def release(self, key: str) -> bool:
        state = self.identifiers[key]
        if state.quarantined_at is None:
            return False
        state.quarantined_at = None
        state.conflicts.clear()
        self.dirty_identifiers.add(key)
        return True

    def quarantined(self) -> list[str]:
        return [k for k, s in self.identifiers.items() if s.quarantined_at is not None]

    # --- privacy ----------------------------------------------------------------------------------

    def purge_dependencies(self, person_ids: Iterable[str]) -> set[str]:
        """Persons a purge of `person_ids` needs that are not loaded: each one, the way to its root, the
        persons merged into it, and the persons separated from those (their separations name them). Load
        them and ask again until it is empty or the store has none of them."""
        needed: set[str] = set()

        def top(person_id: str) -> PersonState | None:
            person = None
            current: str | None = person_id
            while current is not None:
                person = self.persons.get(current)
                if person is None:
                    needed.add(current)
                    return None
                current = person.merged_into
            return person

        for person_id in person_ids:
            root = top(person_id)
            if root is None:
                continue
            members = self._merged_into(root, person_id)
            for member in members:
                person = self.persons.get(member)
                if person is None:
                    needed.add(member)
                    continue
                for other in person.apart:
                    top(other)
            for other, member in root.apart.items():
                if member in members:
                    top(other)
        return needed

    def purge_scope(self, person_ids: Iterable[str]) -> tuple[set[str], set[str]]:
        """What a purge of `person_ids` would remove, read-only: the persons (each requested one with
        everyone merged into it; unknown ids are skipped) and the identifier keys they own."""
        persons: set[str] = set()
        for person_id in person_ids:
            if person_id in self.persons and person_id not in persons:
                persons |= self._merged_into(self._top(person_id), person_id)
        persons = {p for p in persons if p in self.persons}  # a lineage may name a person no longer stored
        return persons, self._owned_by(persons)

    def purge(self, person_ids: Iterable[str]) -> Purged:
        """Forget persons for good (a privacy deletion): each of `person_ids` with everyone merged into
        it, every identifier they own, and every mention of them and of those identifiers in the records
        that stay: merges they took part in (from lineage and the merge index), separations from them,
        drops and merge causes naming their identifiers, and quarantine evidence naming them.

        Only identifiers the purged persons *own* go: one the graph attributes to someone else belongs
        to that someone. Unknown ids are skipped, so purging again changes nothing. The caller loads
        what `purge_dependencies` asks for first; records it never loaded are not rewritten here."""
        requested = list(dict.fromkeys(person_ids))
        persons, keys = self.purge_scope(requested)
        gone_merges: set[str] = set()
        tops = {self._top(p).id for p in persons}  # the roots holding them: only these list their identifiers
        for root_id in tops:
            gone_merges.update(
                m["id"] for m in self.persons[root_id].lineage if m["winner"] in persons or m["loser"] in persons
            )
        gone_merges.update(m for m, winner in self.merge_index.items() if winner in persons)
        # Deletion order: persons merged into another purged person first, the tops last (a backend that
        # cannot write a batch atomically and stops midway leaves the tops, and a retry finds the rest).
        ordered = sorted(persons, key=lambda p: (self.persons[p].merged_into not in persons, p))
        purged = Purged(persons=ordered, identifiers=keys, merges=gone_merges)
        for person_id in ordered:
            del self.persons[person_id]
            self.dirty_persons.discard(person_id)
            self.removed_persons[person_id] = None
        for key in sorted(keys):
            self.identifiers.pop(key, None)
            self.dirty_identifiers.discard(key)
            self.removed_identifiers[key] = None
        for merge_id in sorted(gone_merges):
            self.merge_index.pop(merge_id, None)
            self.dirty_merges.discard(merge_id)
            self.removed_merges[merge_id] = None
        # Ids asked for but unknown here may still be named by records loaded from elsewhere.
        named = persons | set(requested)
        for person in self.persons.values():
            if self._scrub_person(person, person.id in tops, named, keys, gone_merges):
                self.dirty_persons.add(person.id)
                purged.rewritten_persons.add(person.id)
        for key, state in self.identifiers.items():
            if not named.isdisjoint(state.conflicts):
                state.conflicts = {p: t for p, t in state.conflicts.items() if p not in named}
                self.dirty_identifiers.add(key)
                purged.rewritten_identifiers.add(key)
        return purged

    def take_removed(self) -> tuple[list[str], list[str], list[str]]:
        """The records purged since the last call, in removal order: (identifier keys, person ids, merge ids)."""
        removed = list(self.removed_identifiers), list(self.removed_persons), list(self.removed_merges)
        self.removed_identifiers, self.removed_persons, self.removed_merges = {}, {}, {}
        return removed

    def _top(self, person_id: str) -> PersonState:
        """The root of a loaded person, or the last loaded person on the way there."""
        person = self.persons[person_id]
        while person.merged_into is not None and person.merged_into in self.persons:
            person = self.persons[person.merged_into]
        return person

    def _merged_into(self, root: PersonState, person_id: str) -> set[str]:
        """`person_id` and every person merged into it, directly or not (from its root's lineage)."""
        children: dict[str, list[str]] = {}
        for m in root.lineage:
            children.setdefault(m["winner"], []).append(m["loser"])
        members = {person_id}
        stack = [person_id]
        while stack:
            for child in children.get(stack.pop(), ()):
                if child not in members:
                    members.add(child)
                    stack.append(child)
        return members

    def _owned_by(self, persons: set[str]) -> set[str]:
        keys = set()
        for root_id in {self._top(p).id for p in persons if p in self.persons}:
            for key, (_at, owner) in self.persons[root_id].ids.items():
                state = self.identifiers.get(key)
                # An identifier whose own record names another owner was taken over since: not theirs.
                if owner in persons and (state is None or state.person in persons):
                    keys.add(key)
        return keys

    @staticmethod
    def _scrub_person(person: PersonState, top: bool, persons: set[str], keys: set[str], merges: set[str]) -> bool:
        """Drop every mention of `persons`, `keys` and `merges` from a surviving person (`top`: it was
        the root of some of them). New lists and dicts rather than edits in place: documents already
        taken for writing share them. Most persons name none of them, so each part is looked at first."""
        changed = False
        if top:
            person.ids = {k: v for k, v in person.ids.items() if v[1] not in persons and k not in keys}
            changed = True
        if person.lineage:
            lineage, lineage_changed = [], False
            for m in person.lineage:
                if m["id"] in merges or m["winner"] in persons or m["loser"] in persons:
                    lineage_changed = True
                    continue
                cause = m.get("cause") or {}
                named = cause.get("identifiers") or []
                if not keys.isdisjoint(named):
                    m = {**m, "cause": {**cause, "identifiers": [k for k in named if k not in keys]}}
                    lineage_changed = True
                lineage.append(m)
            if lineage_changed:
                person.lineage, changed = lineage, True
        if person.undone:
            undone, undone_changed = [], False
            for u in person.undone:
                if u["id"] in merges or u["winner"] in persons or u["loser"] in persons:
                    undone_changed = True  # the trail of a merge with a purged person: about them, it goes
                    continue
                cause = u.get("cause") or {}
                named = cause.get("identifiers") or []
                if not keys.isdisjoint(named):
                    u = {**u, "cause": {**cause, "identifiers": [k for k in named if k not in keys]}}
                    undone_changed = True
                undone.append(u)
            if undone_changed:
                person.undone, changed = undone, True
        if person.apart and any(p in persons or member in persons for p, member in person.apart.items()):
            person.apart = {p: m for p, m in person.apart.items() if p not in persons and m not in persons}
            changed = True
        if person.drops and any(d.get("identifier") in keys for d in person.drops):
            person.drops = [d for d in person.drops if d.get("identifier") not in keys]
            changed = True
        return changed

    def take_dirty(self) -> tuple[dict[str, dict], dict[str, dict], dict[str, str]]:
        """The records changed since the last call, as documents: (identifiers, persons, merges)."""
        identifiers = {k: self.identifiers[k].to_doc() for k in self.dirty_identifiers if k in self.identifiers}
        persons = {p: self.persons[p].to_doc() for p in self.dirty_persons if p in self.persons}
        merges = {m: self.merge_index[m] for m in self.dirty_merges}
        self.dirty_identifiers.clear()
        self.dirty_persons.clear()
        self.dirty_merges.clear()
        return identifiers, persons, merges

    # --- rules ------------------------------------------------------------------------------------

    def _type_counts(self, roots: list[str], new: list[Identifier], at: int) -> dict[str, int]:
        counts: dict[str, int] = {}
        for root in roots:
            for key, (added_at, _owner) in self.persons[root].ids.items():
                kind_name = key.partition(":")[0]
                kind = self.rules.type(kind_name)
                if kind is None or kind.limit is None:
                    continue
                if kind.window is not None and added_at < at - kind.window * 1000:
                    continue
                counts[kind_name] = counts.get(kind_name, 0) + 1
        for ident in new:
            kind = self.rules.type(ident.type)
            if kind is not None and kind.limit is not None:
                counts[ident.type] = counts.get(ident.type, 0) + 1
        return counts

    def _held(self, roots: list[str]) -> int:
        """How many identifiers the persons `roots` hold (each a root: everyone merged into it included)."""
        return sum(len(self.persons[root].ids) for root in roots)

    def _new_over_limit(self, roots: list[str], new: list[Identifier], ident: Identifier, at: int) -> bool:
        kind = self.rules.type(ident.type)
        if kind is None or kind.limit is None:
            return False
        return self._type_counts(roots, new, at).get(ident.type, 0) + 1 > kind.limit

    def _adds_over_limit(self, roots: list[str], candidate: str, new: list[Identifier], at: int) -> bool:
        """Would linking `candidate` to what the event already links push a type over its limit?"""
        if not roots and not new:
            return False  # the candidate alone: nothing is added to it (most events: one known person)
        after = self._type_counts([*roots, candidate], new, at)
        before = self._type_counts(roots, new, at)
        alone = self._type_counts([candidate], [], at)
        for kind_name, count in after.items():
            limit = self.rules.type(kind_name).limit  # type: ignore[union-attr]
            # Only linking that *adds* to an over-limit count breaks it: a person already over a limit
            # configured later is not stuck forever.
            if count > limit and count > before.get(kind_name, 0) and count > alone.get(kind_name, 0):
                return True
        return False

    def _violated_type(self, roots: list[str], candidate: str, new: list[Identifier], at: int) -> str:
        after = self._type_counts([*roots, candidate], new, at)
        for kind in self.rules.types:
            if kind.limit is not None and after.get(kind.name, 0) > kind.limit:
                return kind.name
        return "unknown"

    def _shared(self, state: IdentifierState, root: str, at: int) -> bool:
        """Whether an identifier has met, within the quarantine window, a live person that cannot be the same
        person as its own (root) under the limits: two users signed in on one tablet, one browser, one
        phone number. That is its quarantine evidence (noted when an event's identifiers could not all be
        linked; only types with `quarantine_after` note any). Such an identifier is shared before it is
        quarantined: an event's other identifiers may be any of those persons', so it links neither new
        identifiers nor other persons to its own (an event of nothing else still resolves to its owner)."""
        if not state.conflicts:
            return False
        horizon = at - self.rules.quarantine_window * 1000
        for other, noted in state.conflicts.items():
            person = self.canonical(other) if noted >= horizon else None
            # Two people, not one person's two halves: the two could not be one person under the limits
            # (two user ids). A person split off by an unmerge is apart, not a second user of it.
            if person is not None and person != root and self._adds_over_limit([root], person, [], at):
                return True
        return False

    def _separated(self, roots: list[str], candidate: str) -> bool:
        if not roots:
            return False
        candidate_apart = {self.canonical(p) for p in self.persons[candidate].apart}
        for root in roots:
            if root in candidate_apart:
                return True
            if candidate in {self.canonical(p) for p in self.persons[root].apart}:
                return True
        return False

    def _choose_winner(self, roots: list[str]) -> str:
        """The person with the strongest identifier type; then the older; then the smaller id."""
        if len(roots) == 1:
            return roots[0]

        def strength(root: str) -> tuple[int, int, str]:
            person = self.persons[root]
            best = min(
                (
                    self.rules.type(k.partition(":")[0]).priority
                    for k in person.ids
                    if self.rules.type(k.partition(":")[0])
                ),
                default=len(self.rules.types),
            )
            return (best, person.created_at, root)

        return min(roots, key=strength)

    def _merge(self, winner_id: str, loser_id: str, at: int, cause: dict[str, Any]) -> Merge:
        winner, loser = self.persons[winner_id], self.persons[loser_id]
        merge = Merge(
            id=stable_id("m_", cause.get("event_id", ""), winner_id, loser_id),
            winner=winner_id,
            loser=loser_id,
            at=at,
            cause=cause,
        )
        loser.merged_into = winner_id
        winner.ids.update(loser.ids)
        winner.lineage.extend(loser.lineage)
        winner.lineage.append(merge.as_dict())
        for other, member in loser.apart.items():
            winner.apart.setdefault(other, member)
        if loser.undone:
            # Two sides of one undone merge merged again (with force) hold the same entry: keep it once.
            seen = {(u["id"], u["undone_at"]) for u in winner.undone}
            winner.undone = sorted(
                [*winner.undone, *(u for u in loser.undone if (u["id"], u["undone_at"]) not in seen)],
                key=lambda u: u["undone_at"],
            )[-MAX_UNDONE_KEPT:]
            loser.undone = []
        loser.ids, loser.lineage = {}, []
        self.merge_index[merge.id] = winner_id
        self.dirty_persons.update((winner_id, loser_id))
        self.dirty_merges.add(merge.id)
        self.removed_merges.pop(merge.id, None)
        return merge

    def _record_drops(self, person_id: str, drops: list[Drop], event_id: str, at: int) -> None:
        if not drops:
            return
        person = self.persons[person_id]
        for drop in drops:
            person.drops.append({**drop.as_dict(), "event_id": event_id, "at": at})
        del person.drops[:-MAX_DROPS_KEPT]
        self.dirty_persons.add(person_id)

    def _note_conflict(self, key: str, own_root: str, other_root: str, at: int) -> bool:
        """Remember that `key` (owned by `own_root`) appeared with `other_root`; quarantine it once it
        has met too many persons within the window. True when this call quarantined it."""
        kind = self.rules.type(key.partition(":")[0])
        if kind is None or kind.quarantine_after is None:
            return False
        state = self.identifiers[key]
        noted = state.conflicts.get(other_root)
        if noted is not None and 0 <= at - noted < CONFLICT_REFRESH_MS:
            return False  # the same persons as a moment ago: nothing to decide, nothing to write
        horizon = at - self.rules.quarantine_window * 1000
        state.conflicts[other_root] = at
        state.conflicts = {p: t for p, t in state.conflicts.items() if t >= horizon}
        if len(state.conflicts) > MAX_CONFLICTS_KEPT:
            newest = sorted(state.conflicts.items(), key=lambda item: item[1])[-MAX_CONFLICTS_KEPT:]
            state.conflicts = dict(newest)
        self.dirty_identifiers.add(key)
        # The identifier's own person counts too: "seen on N persons".
        persons = {self.canonical(p) for p in state.conflicts} | {self.canonical(own_root)}
        persons.discard(None)  # evidence naming a person that no longer exists (purged) counts for nothing
        if len(persons) >= kind.quarantine_after and state.quarantined_at is None:
            state.quarantined_at = at
            return True
        return False


class MergeRefused(Exception):
    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule
