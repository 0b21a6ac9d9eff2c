"""The unified profile: one person's traits, groups, consent, scores, timeline and computed traits.

A profile is made of *parts*, one per origin person. A person nobody merged has one part (the common,
cheap case). When identity merges person B into A, A's profile absorbs B's parts unchanged and records
the merge (merge id, winner, loser, time); every value the profile shows is combined over its parts at
read time. Because each part's state is a mergeable summary (see `aggregates`), the combined view is
exactly what one profile built from both event sets would show, and undoing the merge (`split`) just moves
the loser's parts — and the parts merged into it, following the recorded merges — back out: both sides
are exact again without replaying anything.

After a merge, each new event goes to the part that owns one of its identifiers (the first of the event's
identifiers, in its priority order, that some part has seen), otherwise to the root part. API writes
(`update_traits`, `set_consent`, `set_scores`) go to the root part: they were made about the merged person.

Idempotency. Every effect is keyed on an event id. A part remembers the ids of its newest
`max(retention.max_events, MIN_SEEN_IDS)` applied events and writes (by event time, then id); that always
covers every timeline entry. Those without a timeline entry are stored within SEEN_MAX_BYTES for the whole
profile, its newest kept (all of one account's at the defaults). A redelivery of something older than that
window would be applied again: the engine acknowledges stream positions only after the state is durable
(a redelivered message is skipped by position), and JetStream drops an event sent again within the
collector's dedup window (600 s), so what comes here again is an event sent anew later (an SDK's retry
reaching another collector replica): a window of a part's newest 1,000 events covers it. Events arriving twice across a merge (applied to both persons before the profile learned of
the merge) are taken out of the loser's side when the merge happens, using its timeline entry.

Time. Nothing here reads the clock: callers pass `now`. It must not go backwards between calls on one
profile (windowed contributions pruned at a later `now` are gone). Timeline retention by age is applied
when the profile is touched (`apply`, `expire`, merges); `next_expiry` only reports computed-trait changes.

Traits. Only identify events set traits (and `update_traits`, for API and CRM writes); the traits of other
calls are context or, for group calls, the group's traits. Each top-level key is one trait; a nested object
is one value (kept whole, never flattened), so a later `address` replaces the whole address.

Timeline. Every event gets an entry, identify calls included (their traits are the entry's properties):
the timeline is then the complete record retention allows, `ListEvents` shows when traits were claimed,
and a computed trait over identify events can be backfilled like any other.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from math import isfinite
from typing import Any

import orjson

from cdp_kit.errors import FailedPrecondition, InvalidArgument, NotFound
from cdp_kit.profile_fields import CONSENT, SCORES, field_key
from cdp_profile.domain.aggregates import BUCKET, ComputedState, combined_result, stored_size
from cdp_profile.domain.change import ProfileChange, ProfileView
from cdp_profile.domain.computed import MISSING, ComputedTrait, ComputedTraits, EventScope
from cdp_profile.domain.events import (
    DEFAULT_RETENTION,
    EVENT_TYPES,
    TRAIT_PAYLOAD_TYPES,
    ProfileEvent,
    Retention,
    TimelineEntry,
    context_subset,
)
from cdp_profile.domain.history import (
    CONSENT_KEY_RE,
    ConsentState,
    Score,
    TraitVersion,
    as_of,
    check_consent_key,
    latest,
    record,
    same_value,
    up_to,
)

DOC_VERSION = 1
MIN_SEEN_IDS = 1000
#: What a profile's trait, group and consent histories may hold as stored (their JSON), shared evenly by
#: its parts. Past it, a write first drops the oldest versions that are not their key's current one, down
#: to three quarters of it (so a write of a person at the bound does not trim again). The store keeps a
#: profile document of at most 8 MiB (cdp_kit.storage MAX_DOCUMENT_BYTES) and refused every write of a
#: person past it: after 272 identifies of a 30 KB trait that changed each time (a cart), or some 90,000
#: events carrying a consent manager's three categories, every later event of theirs failed its
#: partition's batch, holding the partition's other persons behind it until the message was dead-lettered.
HISTORY_MAX_BYTES = 2 * 1024 * 1024
#: The identifiers a part keeps, the first seen (identity's own bound, `cdp_identity.domain.graph.
#: MAX_IDENTIFIERS`: identity links no more to a person, so events name no more of them as the person's).
#: Each event's identifiers were added without bound: a server integration making an anonymous id of 256
#: characters per call took a record past the store's 8 MiB in 30,000 events of one user id.
MAX_PART_IDENTIFIERS = 2000
#: What a profile's computed states may take in all as stored (escaped in the record's string: `stored_size`),
#: the live ones and the timeline base's, of every part. Each windowed state is bounded on its own (~1,000
#: exact contributions, then buckets: aggregates), an all-time one of distinct values at 10,000 of them, but
#: the bound was per state: 60 busy windowed traits, each held twice (live and in the base), took a record
#: past the store's 8 MiB in 500 events, after which every later event of the person failed its partition's
#: batch. Past it, a write first coarsens the largest states (`ComputedState.shrink`) down to three quarters
#: of it, each to a common cap (the smaller ones stay as they are), so a write of a person at the bound does
#: not coarsen again at once.
COMPUTED_MAX_BYTES = 4 * 1024 * 1024
#: The most a profile record takes in the store (its JSON, as the record's string): past it (histories of
#: values full of quotes, escaped twice over; many parts), a write halves both budgets above until it fits,
#: up to 1/16 of them. The store's limit is 8 MiB: the rest is the record's other fields.
RECORD_MAX_BYTES = 7 * 1024 * 1024
#: What the ids a profile remembers without their timeline entry may take as stored (`Part.seen`'s ids whose
#: entries retention dropped, and API writes, which have none), across its parts: past it, a write keeps the
#: profile's newest (by event time, then id) that fit in three quarters of it and forgets the others. Each
#: part remembers its newest max(max_events, MIN_SEEN_IDS), and those were stored without bound: ~150 KB a
#: part with 100-character message ids, so a person merged from 56 accounts whose timelines retention had
#: emptied was a record past the store's 8 MiB. One account at the defaults keeps all of its 1,250 (~4,000
#: such ids fit); the ids of timeline entries are stored with the entries and always stay.
SEEN_MAX_BYTES = 512 * 1024
#: A `seen` item's bytes as stored besides its id: `["<id>",<time>],` escaped in the record's string.
SEEN_ITEM_BYTES = 28
#: What the identifiers a profile lists may take as stored (`Part.identifiers`, with their times), across its
#: parts: past it, a write keeps those that fit in three quarters of it, the person's own (user ids, emails,
#: CRM ids) before browser and device ids (SHARED_IDENTIFIER_TYPES), each kind newest first (by the time of
#: the latest event that carried it, then the identifier), and forgets the others. A part keeps the first
#: MAX_PART_IDENTIFIERS, but a profile lists every part's and explicit merges (the API, matching) are not
#: held to identity's bound: 16 accounts of a server integration making an anonymous id of the collector's
#: longest (256 characters) per call were a record past the store's 8 MiB. One account keeps all of its
#: 2,000 such ids (~580 KB). The profile's list is a view: identity holds every link (`GetGraph`).
IDENTIFIERS_MAX_BYTES = 1024 * 1024
#: An identifier's time moves on (the record's list written again) once an event carries it this much later
#: than the time held: the bound ranks by it, and a person's every event carries their user id.
IDENTIFIER_TIME_STEP = 3600.0
#: Identifier types that name a browser or a device, which people share: a suppression leaves them out
#: (privacy.py), and the record's bound forgets them first.
SHARED_IDENTIFIER_TYPES = frozenset({"anonymous_id", "device_id"})

Cursor = tuple[float, str]


@dataclass(slots=True, frozen=True)
class MergeRecord:
    """`loser` (an origin person) was merged into `winner` by identity merge `merge_id`."""

    merge_id: str
    winner: str
    loser: str
    at: float

    def to_doc(self) -> dict[str, Any]:
        return {"merge_id": self.merge_id, "winner": self.winner, "loser": self.loser, "at": self.at}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> MergeRecord:
        return cls(doc["merge_id"], doc["winner"], doc["loser"], doc["at"])


class TimelineBase:
    """What retention dropped from one part's timeline, folded: the part's computed traits' states over
    the dropped events as of the cut, the position (at, event_id) of the newest dropped event.

    Every event retention takes off the timeline (the oldest past the cap or the age limit, or one that
    arrives already older than everything a full timeline keeps) is added to the states of the traits it
    feeds, so a trait rebuilt from the base plus the retained entries is what one rebuilt from the whole
    history would be, for any point in time at or after the cut (`Profile.backfill` starts from it;
    point-in-time training sets read it from the store). An all-time trait's state is its summary; a
    windowed one's keeps the dropped contributions inside its window at the cut (pruned when it is fed,
    so older ones may linger until then: harmless, as a rebuild prunes at its own time): a time T at or
    after the cut reads only dropped events after T - window, all of which are after cut - window. A
    windowed state emptied that way stays: like a live one, it says the trait had a contribution.

    `sigs` names the traits the base is complete for (name -> definition signature): those held when the
    first event was dropped, if nothing had been lost before (a profile stored by an older release that
    had already dropped events gets a base that covers no trait). A trait defined later, or redefined, is
    not covered: its events dropped before it existed were never folded. A covered trait with no state
    here had no contribution among the dropped events.

    The base is the person's data (stored in the profile record, exported, erased with it). Each state
    keeps its encoding like the live ones, so a write that folds nothing re-encodes nothing.
    """

    __slots__ = ("_sigs_encoded", "at", "computed", "event_id", "sigs")

    def __init__(
        self,
        at: float,
        event_id: str,
        sigs: dict[str, str] | None = None,
        computed: dict[str, ComputedState] | None = None,
    ) -> None:
        self.at = at
        self.event_id = event_id
        self.sigs: dict[str, str] = sigs if sigs is not None else {}
        self.computed: dict[str, ComputedState] = computed if computed is not None else {}
        self._sigs_encoded: orjson.Fragment | None = None

    def covers(self, trait: ComputedTrait) -> bool:
        """True when the base holds every dropped contribution to `trait` (under this very definition)."""
        return self.sigs.get(trait.name) == trait.signature

    def fold(self, entry: TimelineEntry, defs: ComputedTraits) -> None:
        if (entry.at, entry.event_id) > (self.at, self.event_id):
            self.at, self.event_id = entry.at, entry.event_id
        sigs = self.sigs
        if not sigs:
            return
        cut = self.at
        for trait in defs.matching(entry.type, entry.name, entry.platform):
            if sigs.get(trait.name) != trait.signature:
                continue
            value = _replayed(trait, entry)
            if value is MISSING:
                continue
            state = self.computed.get(trait.name)
            if state is None:
                state = self.computed[trait.name] = ComputedState.for_trait(trait)
            elif state.entries:
                # Pruned only when fed: the entries before cut - window are never read again but harm
                # nothing, and pruning every windowed state as the cut moves would re-encode them all on
                # every write of a person past the cap.
                state.prune(cut)
            state.add(entry.at, entry.event_id, value, cut)

    def forget(self, name: str) -> None:
        """The definition was removed or changed: its dropped contributions can no longer be told."""
        if self.sigs.pop(name, None) is not None:
            self._sigs_encoded = None
        self.computed.pop(name, None)

    def to_doc(self, *, encoded: bool = False) -> dict[str, Any]:
        if encoded:
            sigs = self._sigs_encoded
            if sigs is None:
                sigs = self._sigs_encoded = orjson.Fragment(orjson.dumps(self.sigs))
        else:
            sigs = dict(self.sigs)
        return {
            "at": self.at,
            "event_id": self.event_id,
            "sigs": sigs,
            "computed": {name: state.encoded() if encoded else state.to_doc() for name, state in self.computed.items()},
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> TimelineBase:
        return cls(
            doc["at"],
            doc["event_id"],
            dict(doc.get("sigs", {})),
            {name: ComputedState.from_doc(state) for name, state in doc.get("computed", {}).items()},
        )


@dataclass(slots=True)
class Part:
    """Everything one origin person contributed. Histories are sorted by (at, event_id)."""

    origin: str
    traits: dict[str, list[TraitVersion]] = field(default_factory=dict)
    groups: dict[str, list[TraitVersion]] = field(default_factory=dict)
    consent: dict[str, list[ConsentState]] = field(default_factory=dict)
    scores: dict[str, Score] = field(default_factory=dict)
    computed: dict[str, ComputedState] = field(default_factory=dict)
    timeline: list[TimelineEntry] = field(default_factory=list)
    seen: dict[str, float] = field(default_factory=dict)  # event id -> event time
    # identifier ("type:value") -> the time of the latest event that carried it, to IDENTIFIER_TIME_STEP (the
    # record's bound keeps the newest); whatever takes one away makes a new dict (`Profile._owners` is made
    # again), whatever changes it drops `_identifiers_json`.
    identifiers: dict[str, float] = field(default_factory=dict)
    event_count: int = 0
    first_seen: float | None = None
    last_seen: float | None = None
    base: TimelineBase | None = None  # what retention dropped from the timeline, folded (None: nothing)
    # The ids of `seen` without a timeline entry (id -> time), kept up to date by the profile as it changes
    # `seen` and `timeline` (`_seen_only`, `_entered`, `_left`), with the very dict and list it was made
    # for: a part written after every event listed them by walking both (the whole timeline, per write).
    # None, or made for other objects: to be made again (`extra_seen`).
    _extra: tuple[dict[str, float], list[TimelineEntry], dict[str, float]] | None = field(
        default=None, compare=False, repr=False
    )
    # The JSON of `scores` (`scores_json`) and how many scores it holds: every write of the profile (and of
    # its scores record) lists every score, and scores change far less often than that. Whatever changes
    # `scores` drops it (`Profile.set_scores`, `records.overlay_scores`; a part built anew has none).
    _scores_json: tuple[int, bytes, orjson.Fragment] | None = field(default=None, compare=False, repr=False)
    # `identifiers` as stored (the dict it was made of, its length, the keys' and the times' fragments): made
    # again only after an identifier is added or its time moves on (`Profile.apply` drops it; a dict made anew
    # is another object), not at every write of the person (a sort and two lists an event).
    _identifiers_json: tuple[dict[str, float], int, orjson.Fragment, orjson.Fragment] | None = field(
        default=None, compare=False, repr=False
    )
    # Where the store holds this part's timeline entries (the service's `cdp_profile.timeline.StoredTimeline`:
    # the head in the record, the pages; None: nothing stored yet). It moves with the part through merges
    # and splits, as the entries do; the domain never reads it.
    stored: Any = field(default=None, compare=False, repr=False)

    # attr ("traits", "groups", "consent") -> key -> (history, its length, its last version, its JSON, that
    # JSON as a fragment): a history only grows (`record` inserts) or is replaced by another list
    # (`fit_histories`), so the same list at the same length is the same history, and a write encodes only
    # the histories that changed since the last one. One that grew at its end only (its last version kept
    # still stands at the kept length's last place: an insert before it would have moved it) has the JSON
    # of the added versions appended to the kept JSON: a person's histories reach HISTORY_MAX_BYTES, and
    # encoded whole at every write they cost 40 ms an event there (36,000 versions), against 0.2 ms now.
    # The lengths of the JSON add up to `_history_bytes`.
    _histories_json: dict[str, dict[str, tuple[list[Any], int, Any, bytes, orjson.Fragment]]] | None = field(
        default=None, compare=False, repr=False
    )

    def _histories_doc(self, attr: str, histories: dict[str, list[Any]]) -> dict[str, orjson.Fragment]:
        """`{key: [version.to_doc(), ...]}` of one kind of history, each as its kept encoding (for orjson)."""
        if not histories:  # most parts have no groups, many no traits or consent: nothing kept either
            if self._histories_json:
                self._histories_json.pop(attr, None)
            return {}
        every = self._histories_json
        if every is None:
            every = self._histories_json = {}
        made = every.get(attr)
        if made is None:
            made = every[attr] = {}
        out = {}
        for key, history in histories.items():
            known = made.get(key)
            length = len(history)
            if known is None or known[0] is not history or known[1] != length:
                if (
                    known is not None
                    and known[0] is history
                    and 0 < known[1] < length
                    and history[known[1] - 1] is known[2]
                ):
                    added = orjson.dumps([version.to_doc() for version in history[known[1] :]])
                    data = b"".join((known[3][:-1], b",", added[1:]))
                else:
                    # A copy of orjson's bytes, which keep its whole output buffer.
                    data = bytes(memoryview(orjson.dumps([version.to_doc() for version in history])))
                known = made[key] = (history, length, history[-1] if history else None, data, orjson.Fragment(data))
            out[key] = known[4]
        if len(made) > len(out):
            for key in [key for key in made if key not in histories]:
                del made[key]
        return out

    def scores_json(self) -> tuple[bytes, orjson.Fragment]:
        """`scores` as stored (name -> [value, model, version, at]), as JSON and as a fragment for orjson;
        made again after `scores` changed (see `_scores_json`)."""
        scores = self.scores
        cached = self._scores_json
        if cached is not None and cached[0] == len(scores):
            return cached[1], cached[2]
        # Each Score (a named tuple, which orjson hands to `default`) as Score.to_doc's list, without a dict
        # and four attribute reads per score made in Python. A copy of orjson's bytes, which keep its whole
        # output buffer.
        data = bytes(memoryview(orjson.dumps(scores, default=list)))
        fragment = orjson.Fragment(data)
        self._scores_json = (len(scores), data, fragment)
        return data, fragment

    def scores_changed(self) -> None:
        """`scores` changed: its JSON is made again at the next write."""
        self._scores_json = None

    def extra_seen(self) -> dict[str, float]:
        """The ids in `seen` that have no timeline entry, with their times (unordered)."""
        cached = self._extra
        if cached is not None and cached[0] is self.seen and cached[1] is self.timeline:
            return cached[2]
        in_timeline = {entry.event_id for entry in self.timeline}
        extra = {event_id: at for event_id, at in self.seen.items() if event_id not in in_timeline}
        self._extra = (self.seen, self.timeline, extra)
        return extra

    def _seen_only(self, event_id: str, at: float) -> None:
        """`event_id` was just added to `seen` (its timeline entry, if any, is not added yet)."""
        cached = self._extra
        if cached is not None and cached[0] is self.seen and cached[1] is self.timeline:
            cached[2][event_id] = at

    def _entered(self, entry: TimelineEntry) -> None:
        """`entry` was just added to the timeline."""
        cached = self._extra
        if cached is not None and cached[0] is self.seen and cached[1] is self.timeline:
            cached[2].pop(entry.event_id, None)

    def _left(self, entries: Iterable[TimelineEntry]) -> None:
        """`entries` were just taken off the timeline (their ids stay in `seen`, if they were there)."""
        cached = self._extra
        if cached is not None and cached[0] is self.seen and cached[1] is self.timeline:
            seen, extra = self.seen, cached[2]
            for entry in entries:
                at = seen.get(entry.event_id)
                if at is not None:
                    extra[entry.event_id] = at

    def to_doc(self, *, encoded: bool = False, history_budget: int | None = None) -> dict[str, Any]:
        """JSON-serialisable; with `encoded`, the computed states are their cached encodings (orjson
        fragments: only for `orjson.dumps`), re-made only for the states that changed since, and the
        histories fitted within `history_budget` bytes when given (what a store write does)."""
        if encoded:
            return self._encoded_doc(history_budget)
        extra = self.extra_seen()
        doc = {
            "origin": self.origin,
            "traits": {name: [v.to_doc() for v in history] for name, history in self.traits.items()},
            "groups": {name: [v.to_doc() for v in history] for name, history in self.groups.items()},
            "consent": {key: [c.to_doc() for c in history] for key, history in self.consent.items()},
            "scores": {name: [s.value, s.model, s.version, s.at] for name, s in self.scores.items()},
            "computed": {name: state.to_doc() for name, state in self.computed.items()},
            # timeline ids are not repeated here
            "seen": [[event_id, at] for at, event_id in sorted((at, event_id) for event_id, at in extra.items())],
            **self._identifiers_doc(),
            "event_count": self.event_count,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
        }
        if self.base is not None:  # only once retention dropped something: other records stay as they were
            doc["base"] = self.base.to_doc()
        return doc

    def _identifiers_doc(self) -> dict[str, list[Any]]:
        """`identifiers` as stored: the keys sorted (what a build before their times reads) and the times beside
        them (`identifiers_at`, in the same order)."""
        held = self.identifiers
        keys = sorted(held)
        return {"identifiers": keys, "identifiers_at": [held[key] for key in keys]}

    def _identifiers_encoded(self) -> dict[str, orjson.Fragment]:
        """`_identifiers_doc` as fragments for orjson, kept until the identifiers change (`_identifiers_json`)."""
        held = self.identifiers
        cached = self._identifiers_json
        if cached is None or cached[0] is not held or cached[1] != len(held):
            doc = self._identifiers_doc()
            keys = orjson.Fragment(orjson.dumps(doc["identifiers"]))
            cached = self._identifiers_json = (
                held,
                len(held),
                keys,
                orjson.Fragment(orjson.dumps(doc["identifiers_at"])),
            )
        return {"identifiers": cached[2], "identifiers_at": cached[3]}

    def identifiers_stored_bytes(self) -> int:
        """What `identifiers` takes as stored, with their times, escaped in the record's string."""
        held = self.identifiers
        if not held:
            return 0
        return stored_size(orjson.dumps(list(held))) + len(orjson.dumps(list(held.values())))

    # `_history_bytes` at the part's last write: a history under a new key is not started past the budget
    # (`Profile._record`), read without a walk over every key.
    _written_history_bytes: int = field(default=0, compare=False, repr=False)
    # Times the histories were fitted within their budget since the profile last counted them (`Profile.
    # take_trimmed`: the metric an operator alerts on).
    _history_trims: int = field(default=0, compare=False, repr=False)

    def _history_bytes(self) -> int:
        """The length of the histories' JSON as last encoded (`_histories_doc`)."""
        every = self._histories_json
        if not every:
            return 0
        return sum(len(known[3]) for made in every.values() for known in made.values())

    def fit_histories(self, budget: int) -> int:
        """Drop the oldest versions (by event time, then id) that are not their key's current one until the
        histories hold at most `budget` bytes of JSON (as near as each version's own JSON tells); returns how
        many went. A date before a key's oldest kept version reads as before the key was first set."""
        kinds = (("traits", self.traits), ("groups", self.groups), ("consent", self.consent))
        total = 0
        older: list[tuple[float, str, int, Any, str]] = []
        for _attr, histories in kinds:
            for key, history in histories.items():
                total += len(key) + 4  # "key":[...],
                for index, version in enumerate(history):
                    size = len(orjson.dumps(version.to_doc())) + 1
                    total += size
                    if index < len(history) - 1:
                        older.append((version.at, version.event_id, size, version, key))
        if total <= budget:
            return 0
        older.sort(key=lambda item: (item[0], item[1]))
        gone: set[int] = set()
        for _at, _event_id, size, version, _key in older:
            if total <= budget:
                break
            gone.add(id(version))
            total -= size
        for _attr, histories in kinds:
            for key, history in list(histories.items()):
                kept = [version for version in history if id(version) not in gone]
                if len(kept) != len(history):
                    histories[key] = kept  # a new list: its encoding is made again
        return len(gone)

    def _encoded_doc(self, history_budget: int | None = None) -> dict[str, Any]:
        """`to_doc(encoded=True)`: the same document, made for every write of the part's profile; with
        `history_budget`, its histories fitted within it first when they passed it (`fit_histories`)."""
        extra = self.extra_seen()
        histories_doc = self._histories_doc
        traits = histories_doc("traits", self.traits)
        groups = histories_doc("groups", self.groups)
        consent = histories_doc("consent", self.consent)
        if history_budget is not None:
            held = self._history_bytes()
            if held > history_budget:
                self.fit_histories(history_budget * 3 // 4)
                self._history_trims += 1
                traits = histories_doc("traits", self.traits)
                groups = histories_doc("groups", self.groups)
                consent = histories_doc("consent", self.consent)
                held = self._history_bytes()
            self._written_history_bytes = held
        doc = {
            "origin": self.origin,
            "traits": traits,
            "groups": groups,
            "consent": consent,
            "scores": self.scores_json()[1],
            # The kept encoding read in place, `encoded()` called only for a state that changed since: most
            # of the (tens of) states of every write are unchanged.
            "computed": {
                name: kept if (kept := state._encoded) is not None else state.encoded()
                for name, state in self.computed.items()
            },
            # timeline ids are not repeated here
            "seen": [[event_id, at] for at, event_id in sorted((at, event_id) for event_id, at in extra.items())]
            if extra
            else [],
            **self._identifiers_encoded(),
            "event_count": self.event_count,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
        }
        if self.base is not None:  # only once retention dropped something: other records stay as they were
            doc["base"] = self.base.to_doc(encoded=True)
        return doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Part:
        base = doc.get("base")
        return cls(
            origin=doc["origin"],
            traits={name: [TraitVersion.from_doc(v) for v in h] for name, h in doc.get("traits", {}).items()},
            groups={name: [TraitVersion.from_doc(v) for v in h] for name, h in doc.get("groups", {}).items()},
            consent={key: [ConsentState.from_doc(c) for c in h] for key, h in doc.get("consent", {}).items()},
            scores={name: Score.from_doc(s) for name, s in doc.get("scores", {}).items()},
            computed={name: ComputedState.from_doc(s) for name, s in doc.get("computed", {}).items()},
            seen={event_id: at for event_id, at in doc.get("seen", [])},
            identifiers=_identifiers_from_doc(doc),
            event_count=doc.get("event_count", 0),
            first_seen=doc.get("first_seen"),
            last_seen=doc.get("last_seen"),
            base=TimelineBase.from_doc(base) if base is not None else None,
        )


def _identifiers_from_doc(doc: Mapping[str, Any]) -> dict[str, float]:
    """A part's identifiers with their times; a record written before they had times (no `identifiers_at`)
    has each as seen at the part's last event."""
    keys = doc.get("identifiers", [])
    times = doc.get("identifiers_at")
    if times is None or len(times) != len(keys):
        at = doc.get("last_seen")
        if at is None:
            at = doc.get("first_seen") or 0.0
        return dict.fromkeys(keys, at)
    return dict(zip(keys, times, strict=True))


def _changed(before: Any, after: Any) -> bool:
    return before is not after and not same_value(before, after)


def _contribution(trait: ComputedTrait, entry: TimelineEntry) -> Any:
    if not trait.matches_event(entry.type, entry.name, entry.platform):
        return MISSING
    return _replayed(trait, entry)


def _replayed(trait: ComputedTrait, entry: TimelineEntry) -> Any:
    """The contribution the entry's event made (the entry keeps what pseudo-paths read)."""
    return trait.extract(EventScope(entry.properties, entry) if trait.reads_event else entry.properties)


class Profile:
    """One person's unified profile. Not thread-safe: one partition owner applies its events in order."""

    __slots__ = (
        "_added_due",
        "_owners",
        "_root",
        "_trim_moves",
        "_trimmed",
        "merges",
        "parts",
        "person_id",
        "retention",
    )

    def __init__(
        self,
        person_id: str,
        *,
        retention: Retention = DEFAULT_RETENTION,
        parts: dict[str, Part] | None = None,
        merges: list[MergeRecord] | None = None,
    ) -> None:
        if not isinstance(person_id, str) or not person_id:
            raise InvalidArgument("person_id", f"{person_id!r} must be a non-empty string")
        self.person_id = person_id
        self.retention = retention
        self.parts: dict[str, Part] = parts if parts is not None else {person_id: Part(person_id)}
        if person_id not in self.parts:
            raise InvalidArgument("parts", f"the root part {person_id!r} is missing")
        self._root = self.parts[person_id]
        self.merges: list[MergeRecord] = merges if merges is not None else []
        self._owners: dict[str, str] | None = None  # identifier -> origin; built only for merged profiles
        # The earliest time a windowed entry added by `apply` leaves its window, since `take_added_due`.
        self._added_due: float | None = None
        # What the record's bound took since `take_trimmed`: "computed" states coarsened, "history" fits.
        self._trimmed: dict[str, int] | None = None
        self._trim_moves: dict[str, Any] | None = None  # computed values the bound moved, since taken

    @classmethod
    def new(cls, person_id: str, *, retention: Retention = DEFAULT_RETENTION) -> Profile:
        return cls(person_id, retention=retention)

    # --- events ----------------------------------------------------------------------------------

    def apply(self, event: ProfileEvent, defs: ComputedTraits, *, now: float) -> ProfileChange:
        """Apply one resolved event; a second application of the same event id changes nothing, and its
        change only lists the id again (`ProfileChange.relisted`: falsy, but published)."""
        event_id = event.event_id
        change = ProfileChange(self.person_id)
        single = len(self.parts) == 1
        if single:
            if event_id in self._root.seen:
                change.relisted.append(event_id)
                change.relisted_after.append(0)
                return change
            part = self._root
        else:
            if self._seen(event_id):
                change.relisted.append(event_id)
                change.relisted_after.append(0)
                return change
            part = self._attribute(event.identifiers)
        kind = event.type
        if kind not in EVENT_TYPES:
            raise InvalidArgument(
                "type", f"{kind!r} is not an event type; use one of: {', '.join(sorted(EVENT_TYPES))}"
            )
        at = event.at
        source = event.source
        self._remember(part, event_id, at)
        platform = event.platform
        if not platform:  # the platform's own events are not the person's activity (events.PLATFORM_SOURCES)
            part.event_count += 1
            if part.first_seen is None or at < part.first_seen:
                part.first_seen = at
            if part.last_seen is None or at > part.last_seen:
                part.last_seen = at
        identifiers = event.identifiers
        if identifiers:
            held = part.identifiers
            for key in identifiers:
                known = held.get(key)
                if known is None:
                    if len(held) < MAX_PART_IDENTIFIERS:
                        held[key] = at
                        part._identifiers_json = None
                        if not single:
                            self._owner_map().setdefault(key, part.origin)
                elif at > known + IDENTIFIER_TIME_STEP:
                    held[key] = at
                    part._identifiers_json = None
        change.event_ids.append(event_id)
        payload = event.traits if kind in TRAIT_PAYLOAD_TYPES else event.properties
        context = event.context
        if context:
            context = context_subset(context, defs.context_keep)
        entry = TimelineEntry(
            at,
            event_id,
            kind,
            event.name,
            payload,
            source,
            part.origin,
            context,
            event.user_id,
            event.anonymous_id,
            event.shared,
        )
        self._add_entry(part, entry, now, change, defs)

        if kind == "identify":
            for name, value in event.traits.items():
                version = TraitVersion(value, source, event_id, at, now)
                self._record(part, "traits", name, version, change.traits, single)
        elif kind == "group" and event.group_id:
            version = TraitVersion(event.traits, source, event_id, at, now)
            self._record(part, "groups", event.group_id, version, change.groups, single)
        if event.consent:
            for key, granted in event.consent.items():
                # The collector validates consent at the edge; anything else here is ignored, not fatal,
                # because one malformed key must not stop a partition's stream.
                if type(granted) is bool and isinstance(key, str) and CONSENT_KEY_RE.match(key):
                    self._record(
                        part, "consent", key, ConsentState(granted, source, at, event_id), change.consent, single
                    )

        matching = defs.matching(kind, event.name, platform)
        if matching:
            self._contribute(part, matching, payload, event, now, change.computed, single)
        return change

    def update_traits(
        self, traits: Mapping[str, Any], *, source: str, at: float, event_id: str, now: float
    ) -> ProfileChange:
        """An API or CRM write of traits (None removes a trait). Idempotent on `event_id`."""
        if not isinstance(traits, Mapping):
            raise InvalidArgument("traits", f"{traits!r} must be an object of trait name -> value")
        for name in traits:
            if not isinstance(name, str) or not name:
                raise InvalidArgument("traits", f"{name!r} is not a trait name: use a non-empty string")
        self._check_write(source, at, event_id)
        change = ProfileChange(self.person_id)
        if self._seen(event_id):
            return change
        single = len(self.parts) == 1
        self._remember(self._root, event_id, at)
        change.event_ids.append(event_id)
        for name, value in traits.items():
            self._record(
                self._root, "traits", name, TraitVersion(value, source, event_id, at, now), change.traits, single
            )
        return change

    def set_consent(self, consent: Mapping[str, bool], *, source: str, at: float, event_id: str) -> ProfileChange:
        """Consent from the API or a CRM (same call, different source). Latest by event time wins."""
        if not isinstance(consent, Mapping) or not consent:
            raise InvalidArgument("consent", f"{consent!r} must be a non-empty object of consent key -> granted")
        for key, granted in consent.items():
            check_consent_key(key, "consent")
            if type(granted) is not bool:
                raise InvalidArgument(field_key(CONSENT, key), f"{granted!r} must be true (granted) or false (refused)")
        self._check_write(source, at, event_id)
        change = ProfileChange(self.person_id)
        if self._seen(event_id):
            return change
        single = len(self.parts) == 1
        self._remember(self._root, event_id, at)
        change.event_ids.append(event_id)
        for key, granted in consent.items():
            self._record(
                self._root, "consent", key, ConsentState(granted, source, at, event_id), change.consent, single
            )
        return change

    def set_scores(self, scores: Mapping[str, float], *, model: str, version: str, at: float) -> ProfileChange:
        """Model outputs become profile fields; per name the newest (at, model, version) wins."""
        # The exact types first: a stream's scores are a dict of str -> float, checked per name and value.
        if type(scores) is not dict and not isinstance(scores, Mapping):
            raise InvalidArgument("scores", f"{scores!r} must be an object of score name -> number")
        for name, value in scores.items():
            if not name or (type(name) is not str and not isinstance(name, str)):
                raise InvalidArgument("scores", f"{name!r} is not a score name: use a non-empty string")
            if type(value) is float:
                if isfinite(value):
                    continue
            elif not isinstance(value, bool) and isinstance(value, (int, float)) and isfinite(value):
                continue
            raise InvalidArgument(field_key(SCORES, name), f"{value!r} must be a finite number")
        if not isinstance(model, str) or not model:
            raise InvalidArgument("model", f"{model!r} must name the model that produced the scores")
        if not isinstance(version, str):
            raise InvalidArgument("version", f"{version!r} must be a string")
        change = ProfileChange(self.person_id)
        root_scores = self._root.scores
        self._root.scores_changed()
        if len(self.parts) == 1:
            # One part (most profiles): the current score is the root's own, so before and after are read
            # there rather than across parts. A score arrives once per event the person makes.
            changed = change.scores
            key = (at, model, version)
            for name, value in scores.items():
                current = root_scores.get(name)
                if current is None:
                    score = root_scores[name] = Score(float(value), model, version, at)
                    changed[name] = score.value
                elif key >= (current.at, current.model, current.version):
                    score = root_scores[name] = Score(float(value), model, version, at)
                    if _changed(current.value, score.value):
                        changed[name] = score.value
            return change
        self._scores_of_parts(scores, model, version, at, change.scores)
        return change

    def take_scores(
        self, scores: dict[str, float], model: str, version: str, at: float, moved: dict[str, float]
    ) -> None:
        """`set_scores` for a model's scores already checked (`scores.updated` as `apply.decode_scores` reads
        it: names non-empty strings, values finite floats, a model and a version), without a change of its
        own: the scores whose value moved go into `moved` (one person's several models of a batch fold into
        one change). A scores batch sets a few scores for hundreds of persons."""
        root = self._root
        root._scores_json = None  # `scores_changed`
        if len(self.parts) != 1:
            self._scores_of_parts(scores, model, version, at, moved)
            return
        root_scores = root.scores
        for name, value in scores.items():
            current = root_scores.get(name)
            if current is None:
                root_scores[name] = Score(value, model, version, at)
                moved[name] = value
            elif (at, model, version) >= (current.at, current.model, current.version):
                root_scores[name] = Score(value, model, version, at)
                before = current.value
                if before is not value and not (type(before) is float and before == value):
                    moved[name] = value

    def _scores_of_parts(
        self, scores: Mapping[str, float], model: str, version: str, at: float, changed: dict[str, float]
    ) -> None:
        """`set_scores` on a merged profile (the current score of a name is the newest over the parts): the
        scores whose current value moved go into `changed`."""
        root_scores = self._root.scores
        for name, value in scores.items():
            score = Score(float(value), model, version, at)
            before = self._score(name)
            current = root_scores.get(name)
            if current is None or score.key() >= current.key():
                root_scores[name] = score
            after = self._score(name)
            if before is None or _changed(before.value, after.value):
                changed[name] = after.value

    # --- merges ----------------------------------------------------------------------------------

    def merge(self, loser: Profile, *, merge_id: str, at: float, defs: ComputedTraits, now: float) -> ProfileChange:
        """Absorb `loser` (all its parts and merge records); `loser` is left empty. Idempotent on merge_id."""
        change = ProfileChange(self.person_id)
        if loser is self or loser.person_id == self.person_id:
            raise InvalidArgument("loser", f"profile {self.person_id!r} cannot absorb itself")
        if loser.person_id in self.parts or any(m.merge_id == merge_id for m in self.merges):
            return change
        clash = self.parts.keys() & loser.parts.keys()
        if clash:
            raise FailedPrecondition(
                f"persons {sorted(clash)} are already part of profile {self.person_id!r}; split them out first"
            )
        before = self._view(None)  # what was last reported: windows as of their last prune
        retracted = self._retract_duplicates(loser, defs)
        incoming = [entry for part in loser.parts.values() for entry in part.timeline]
        self.parts.update(loser.parts)
        self.merges.extend(loser.merges)
        self.merges.append(MergeRecord(merge_id, self.person_id, loser.person_id, at))
        self._owners = None
        self._align(defs, now)
        dropped = self._enforce_retention(now, defs)
        incoming_ids = {id(entry) for entry in incoming}
        dropped_ids = {id(entry) for entry in dropped}
        change.timeline_added = sorted(entry for entry in incoming if id(entry) not in dropped_ids)
        # The loser's copies of events this profile had go from the store too (their records are keyed by
        # the loser's origin): loaded again, the profile would hold such an event twice.
        change.timeline_removed = retracted + [entry for entry in dropped if id(entry) not in incoming_ids]
        _diff(before, self._view(None), change)
        change.merged = list(loser.parts)
        loser.parts = {loser.person_id: Part(loser.person_id)}
        loser._root = loser.parts[loser.person_id]
        loser.merges = []
        loser._owners = None
        return change

    def split(
        self, loser_id: str, *, merge_id: str, defs: ComputedTraits, now: float, given: Collection[str] = ()
    ) -> tuple[Profile, ProfileChange, ProfileChange]:
        """Undo merge `merge_id`: `loser_id`'s part and every part merged into it move to a restored profile.

        `given`: the identifiers (`type:value`) identity gave the restored person (`identity.unmerged`'s
        loser_identifiers): a part staying here that saw one (an event of the shared tablet attributed to
        it) no longer lists it, and the restored profile does: each profile lists what identity resolves to
        its person.

        Returns (restored profile, this profile's change, the restored profile's change). The restored
        change lists everything it holds (it reappears); this profile's change what it lost.
        """
        found = next((m for m in self.merges if m.merge_id == merge_id), None)
        if found is None or found.loser != loser_id or loser_id not in self.parts:
            raise NotFound(f"merge {merge_id!r} of person {loser_id!r} is not part of profile {self.person_id!r}")
        subtree = {loser_id}
        grew = True
        while grew:
            grew = False
            for merge in self.merges:
                if merge is not found and merge.winner in subtree and merge.loser not in subtree:
                    subtree.add(merge.loser)
                    grew = True
        before = self._view(None)
        moved = {origin: part for origin, part in self.parts.items() if origin in subtree}
        self.parts = {origin: part for origin, part in self.parts.items() if origin not in subtree}
        restored = Profile(
            loser_id,
            retention=self.retention,
            parts=moved,
            merges=[m for m in self.merges if m.loser in subtree and m is not found],
        )
        self.merges = [m for m in self.merges if m.loser not in subtree]
        if given:
            given = frozenset(given)
            for part in self.parts.values():
                if not given.isdisjoint(part.identifiers):
                    part.identifiers = {key: at for key, at in part.identifiers.items() if key not in given}
            # When identity's links were last used is not known here: as of the restored person's last event.
            root = moved[loser_id]
            seen_at = root.last_seen if root.last_seen is not None else now
            for key in given:
                root.identifiers.setdefault(key, seen_at)
            root._identifiers_json = None
        self._owners = None
        self._align(defs, now)
        restored._align(defs, now)
        mine = ProfileChange(self.person_id, split=list(moved))
        mine.timeline_removed = restored._timeline() + self._enforce_retention(now, defs)
        _diff(before, self._view(None), mine)
        theirs = ProfileChange(loser_id, split_from=self.person_id)
        restored._enforce_retention(now, defs)
        theirs.timeline_added = list(restored._timeline())
        _diff(_empty_view(loser_id), restored._view(None), theirs)
        return restored, mine, theirs

    # --- time and definitions ----------------------------------------------------------------------

    def expire(self, defs: ComputedTraits, *, now: float) -> ProfileChange:
        """Take out windowed contributions (and timeline entries past their age) that aged out by `now`."""
        change = ProfileChange(self.person_id)
        names = {
            name
            for part in self.parts.values()
            for name, state in part.computed.items()
            if state.window is not None and name in defs and state.needs_prune(now)
        }
        for name in sorted(names):
            before = self._computed_value(name)
            for part in self.parts.values():
                state = part.computed.get(name)
                if state is not None and state.window is not None:
                    state.prune(now)
            after = self._computed_value(name)
            if _changed(before, after):
                change.computed[name] = after
        change.timeline_removed = self._enforce_retention(now, defs)
        return change

    def take_added_due(self) -> float | None:
        """The earliest time an entry `apply` added to a windowed state leaves it, of those added since the
        last call (None: none added). Only `apply` lowers a state's expiry without a walk of `next_expiry`
        after it (merges, splits, backfills and loads schedule the whole profile; a prune or removal only
        delays an expiry), so a schedule already at or before every state's expiry stays so when given
        this (`ExpirySchedule.schedule_applied`)."""
        due = self._added_due
        self._added_due = None
        return due

    def next_expiry(self) -> float | None:
        """The earliest time a windowed computed value changes with no new event (None: never)."""
        earliest = None
        for part in self.parts.values():
            for state in part.computed.values():
                entries = state.entries
                if entries:
                    at = entries[0][0] + state.window  # state.expires_at(), inline: every changed person, every batch
                    if earliest is None or at < earliest:
                        earliest = at
        return earliest

    def backfill(self, trait: ComputedTrait, *, now: float) -> ProfileChange:
        """(Re)compute `trait` from the retained timeline (events retention dropped are not seen)."""
        change = ProfileChange(self.person_id)
        before = self._computed_value(trait.name)
        for part in self.parts.values():
            state = self._rebuilt(part, trait, now)
            if state is None:
                part.computed.pop(trait.name, None)
            else:
                part.computed[trait.name] = state
        after = self._computed_value(trait.name)
        if after is MISSING:
            if before is not MISSING:
                change.computed[trait.name] = None
        elif before is MISSING or _changed(before, after):
            change.computed[trait.name] = after
        return change

    def drop_computed(self, name: str) -> ProfileChange:
        """Forget a computed trait whose definition was removed."""
        change = ProfileChange(self.person_id)
        for part in self.parts.values():
            if part.base is not None:
                part.base.forget(name)
            if part.computed.pop(name, None) is not None:
                change.computed[name] = None
        return change

    # --- reading ---------------------------------------------------------------------------------

    def view(self, *, now: float, as_of: float | None = None) -> ProfileView:
        """The person now; with `as_of`, traits, groups and consent as they were known at that event time.

        Windowed computed values are evaluated at `now` without changing the profile (`expire` does that).
        """
        return self._view(now, as_of)

    def _view(self, now: float | None, as_of: float | None = None) -> ProfileView:
        # now=None: windowed values as of their last prune, i.e. what the last change reported.
        parts = list(self.parts.values())
        if len(parts) == 1:
            part = parts[0]
            traits = _current_all(part.traits, as_of)
            groups = _current_all(part.groups, as_of)
            consent = {
                key: state.with_history(up_to(part.consent[key], as_of))
                for key, state in _current_all(part.consent, as_of).items()
            }
            scores = dict(part.scores)
            identifiers = set(part.identifiers)
            computed = {name: _copy(state.summary(now).result(state.op)) for name, state in part.computed.items()}
            first_seen, last_seen, count = part.first_seen, part.last_seen, part.event_count
        else:
            traits = _latest_all([p.traits for p in parts], as_of)
            groups = _latest_all([p.groups for p in parts], as_of)
            consent = {
                key: state.with_history(up_to(self.consent_history(key), as_of))
                for key, state in _latest_all([p.consent for p in parts], as_of).items()
            }
            scores = {name: self._score(name) for name in _keys(p.scores for p in parts)}
            identifiers = self.identifiers()
            computed = {name: _copy(self._computed_value(name, now)) for name in _keys(p.computed for p in parts)}
            firsts = [p.first_seen for p in parts if p.first_seen is not None]
            lasts = [p.last_seen for p in parts if p.last_seen is not None]
            first_seen = min(firsts) if firsts else None
            last_seen = max(lasts) if lasts else None
            count = sum(p.event_count for p in parts)
        return ProfileView(
            person_id=self.person_id,
            traits=traits,
            groups=groups,
            computed=computed,
            consent=consent,
            scores=scores,
            identifiers=identifiers,
            merged_from=[origin for origin in self.parts if origin != self.person_id],
            first_seen=first_seen,
            last_seen=last_seen,
            event_count=count,
        )

    def trait_history(self, name: str) -> list[TraitVersion]:
        return list(heapq.merge(*(p.traits.get(name, ()) for p in self.parts.values()), key=_history_key))

    def consent_history(self, key: str) -> list[ConsentState]:
        return list(heapq.merge(*(p.consent.get(key, ()) for p in self.parts.values()), key=_history_key))

    def timeline(self) -> list[TimelineEntry]:
        """Every retained entry, oldest first."""
        return list(self._timeline())

    def events(
        self,
        *,
        limit: int,
        before: Cursor | None = None,
        types: Iterable[str] = (),
        names: Iterable[str] = (),
    ) -> tuple[list[TimelineEntry], Cursor | None]:
        """Newest first. Pass the returned cursor as `before` for the next page; None when there is none."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidArgument("limit", f"{limit!r} must be a whole number of at least 1")
        types = frozenset(types)
        names = frozenset(names)
        timeline = self._timeline()
        end = len(timeline)
        if before is not None:
            try:
                cursor = (before[0], before[1])
                end = bisect_left(timeline, cursor, key=TimelineEntry.cursor)
            except (TypeError, IndexError, KeyError):
                raise InvalidArgument("before", f"{before!r} is not a cursor this call returned") from None
        page: list[TimelineEntry] = []
        for index in range(end - 1, -1, -1):
            entry = timeline[index]
            if (not types or entry.type in types) and (not names or entry.name in names):
                if len(page) == limit:
                    return page, page[-1].cursor()
                page.append(entry)
        return page, None

    def identifiers(self) -> set[str]:
        """Every identifier identity gave this person on their events (privacy deletion reaches each of them)."""
        if len(self.parts) == 1:
            return set(self._root.identifiers)
        return set().union(*(p.identifiers for p in self.parts.values()))

    def export(self, *, now: float | None = None) -> dict[str, Any]:
        """Everything held about the person, JSON-serialisable (a privacy access request).

        Computed values are as of `now` when given, else as of the last time the profile was touched.
        """
        parts = list(self.parts.values())

        def histories(attr: str) -> dict[str, Any]:
            out = {}
            for key in sorted(_keys(getattr(p, attr) for p in parts)):
                history = list(heapq.merge(*(getattr(p, attr).get(key, ()) for p in parts), key=_history_key))
                out[key] = {"current": history[-1].to_dict(), "history": [v.to_dict() for v in history]}
            return out

        contributions: dict[str, list[dict[str, Any]]] = {}
        for part in parts:
            for name, state in part.computed.items():
                for at, event_id, value in state.entries or ():
                    contributions.setdefault(name, []).append(
                        {**_exported_contribution(at, event_id, value), "origin": part.origin}
                    )
        view = self._view(now)
        return {
            "person_id": self.person_id,
            "merged_from": view.merged_from,
            "merges": [m.to_doc() for m in self.merges],
            "identifiers": sorted(view.identifiers),
            "first_seen": view.first_seen,
            "last_seen": view.last_seen,
            "event_count": view.event_count,
            "traits": histories("traits"),
            "groups": histories("groups"),
            "consent": histories("consent"),
            "computed": view.computed,
            "computed_contributions": {
                name: sorted(items, key=lambda c: (c["at"], c["event_id"])) for name, items in contributions.items()
            },
            "scores": {name: score.to_dict() for name, score in sorted(view.scores.items())},
            "timeline": [entry.to_doc() for entry in self._timeline()],
            # What retention dropped from the timeline, folded into the all-time traits (per part).
            "timeline_base": [
                {
                    "origin": part.origin,
                    "cut_at": part.base.at,
                    "cut_event_id": part.base.event_id,
                    "computed": {name: _copy(state.result()) for name, state in sorted(part.base.computed.items())},
                    "contributions": {
                        name: [_exported_contribution(at, event_id, value) for at, event_id, value in state.entries]
                        for name, state in sorted(part.base.computed.items())
                        if state.entries
                    },
                }
                for part in parts
                if part.base is not None
            ],
        }

    # --- persistence -----------------------------------------------------------------------------

    def to_json(self) -> bytes:
        """`to_doc()` as JSON (what the store keeps). A profile is written on every change, and most changes
        leave most computed states as they were (a score changes none): each state's encoding is kept
        with it and made again only after it changed, so a write costs what changed, not all 45 traits.

        The record is bounded as a whole: its computed states within COMPUTED_MAX_BYTES (`fit_computed`),
        its histories within HISTORY_MAX_BYTES (`to_doc`), and what the store keeps of it within
        RECORD_MAX_BYTES: past it with both budgets kept (quotes, escaped twice over; many parts), it is
        made again with both halved, up to 1/16 of them. Only a record past COMPUTED_MAX_BYTES / 2 is
        measured (escaping at most doubles it; its states are part of it): most cost a length. So are the
        identifiers (within IDENTIFIERS_MAX_BYTES, `fit_identifiers`), only in a record past half of that."""
        raw = orjson.dumps(self.to_doc(encoded=True))
        if len(raw) > IDENTIFIERS_MAX_BYTES // 2 and self.fit_identifiers(IDENTIFIERS_MAX_BYTES):
            raw = orjson.dumps(self.to_doc(encoded=True))
        if len(raw) <= COMPUTED_MAX_BYTES // 2:
            return raw
        squeeze = 1
        while True:
            if self.fit_computed(COMPUTED_MAX_BYTES // squeeze):
                raw = orjson.dumps(self.to_doc(encoded=True, squeeze=squeeze))
            if stored_size(raw) <= RECORD_MAX_BYTES or squeeze >= 16:
                return raw
            squeeze *= 2
            self.fit_identifiers(IDENTIFIERS_MAX_BYTES // squeeze)
            raw = orjson.dumps(self.to_doc(encoded=True, squeeze=squeeze))

    def take_trimmed(self) -> dict[str, int]:
        """What the record's bound took since the last call: {"computed": states coarsened, "history":
        histories fitted, "seen": writes that forgot remembered ids, "identifiers": writes that forgot listed
        identifiers, ...} (only those that happened); the engine counts them (`cdp.profile.record.trimmed`)."""
        trimmed = self._trimmed or {}
        self._trimmed = None
        for part in self.parts.values():
            if part._history_trims:
                trimmed["history"] = trimmed.get("history", 0) + part._history_trims
                part._history_trims = 0
        return trimmed

    def take_trim_moves(self) -> dict[str, Any]:
        """The computed values the record's bound moved since the last call (name -> value now): the
        engine adds them to the person's change, so readers of the change feed follow."""
        moved = self._trim_moves or {}
        self._trim_moves = None
        return moved

    def fit_computed(self, budget: int = COMPUTED_MAX_BYTES) -> bool:
        """Keep the computed states (live and the timeline base's, of every part) within `budget` bytes as
        stored. Past it, in this order, each step only while the states still take more than `budget`:

        1. "computed": the largest windowed states fold their exact contributions into buckets, losing
           nothing yet (`ComputedState.compact`), until they all take three quarters of it; past that
           still, the largest coarsen (`ComputedState.shrink`) to a common cap under which they would,
           measured again (a state may not come down to its cap: the next round's cap is lower), up to
           four rounds;
        2. "base": the timeline base stops covering the traits of its largest states (`TimelineBase.forget`):
           no value changes, but a rebuild of such a trait for this person (a point-in-time training set, a
           backfill) starts at the retained timeline, as for a trait defined after the cut;
        3. "reset": the largest live states are emptied, the trait reading as without a contribution until
           its next one. A state coarsened as far as it goes is its summary and newest contribution: only
           hundreds of traits holding event-sized values (32 KB) each come here.

        What was done is counted by step (`take_trimmed`); True when anything was."""
        parts = self.parts.values()
        # Every write of a record past COMPUTED_MAX_BYTES / 2 comes here: the sizes kept with the encodings the
        # write is about to use (each measured once per encoding), added up.
        total = 0
        for part in parts:
            for state in part.computed.values():
                total += state.stored_bytes()
            if part.base is not None:
                for state in part.base.computed.values():
                    total += state.stored_bytes()
        if total <= budget:
            return False
        names = {name for part in parts for name in part.computed}
        before = {name: self._computed_value(name) for name in names}
        try:
            return self._fit_computed(budget, total)
        finally:
            moves = self._trim_moves
            for name in names:
                after = self._computed_value(name)
                if _changed(before[name], after):
                    if moves is None:
                        moves = self._trim_moves = {}
                    moves[name] = after

    def _fit_computed(self, budget: int, total: int) -> bool:
        """`fit_computed` past its budget (`total` bytes held)."""
        parts = self.parts.values()
        states = [state for part in parts for state in part.computed.values()]
        for part in parts:
            if part.base is not None:
                states.extend(part.base.computed.values())
        sizes = [state.stored_bytes() for state in states]
        goal = budget * 3 // 4
        shrunk: set[int] = set()
        # Losing nothing first: the largest windowed states fold their exact entries into buckets.
        for index in sorted(range(len(states)), key=sizes.__getitem__, reverse=True):
            if total <= goal:
                break
            if states[index].compact():
                shrunk.add(index)
                size = states[index].stored_bytes()
                total += size - sizes[index]
                sizes[index] = size
        for _round in range(4 if total > goal else 0):
            cap = _level(sizes, goal)
            moved = False
            for index, state in enumerate(states):
                if sizes[index] > cap and state.shrink(cap):
                    shrunk.add(index)
                    moved = True
            sizes = [state.stored_bytes() for state in states]
            total = sum(sizes)
            if total <= goal or not moved:
                break
        self._count_trimmed("computed", len(shrunk))
        if total <= budget:
            return bool(shrunk)
        held = [
            (state.stored_bytes(), name, part.base)
            for part in parts
            if part.base is not None
            for name, state in part.base.computed.items()
        ]
        held.sort(key=lambda item: item[0], reverse=True)
        for size, name, base in held:
            if total <= goal:
                break
            base.forget(name)
            total -= size
            self._count_trimmed("base", 1)
        if total <= budget:
            return True
        live = [(state.stored_bytes(), name, part) for part in parts for name, state in part.computed.items()]
        live.sort(key=lambda item: item[0], reverse=True)
        for size, name, part in live:
            if total <= goal:
                break
            part.computed[name] = part.computed[name].cleared()
            total -= size
            self._count_trimmed("reset", 1)
        return True

    def _fit_seen(self, budget: int) -> None:
        """Keep the ids stored without a timeline entry (`Part.extra_seen`, of every part) within `budget` bytes
        as stored: past it, the profile's newest that fit in three quarters of it stay, in memory as in the
        store (a reload remembers what the profile did), and the write counts "seen" (`take_trimmed`). An
        event whose id was forgotten so would be applied again if it came again: see SEEN_MAX_BYTES."""
        total = 0
        for part in self.parts.values():
            extra = part.extra_seen()
            if extra:
                total += sum(map(len, extra)) + SEEN_ITEM_BYTES * len(extra)
        if total <= budget:
            return
        newest = sorted(
            (
                (at, event_id, origin)
                for origin, part in self.parts.items()
                for event_id, at in part.extra_seen().items()
            ),
            reverse=True,
        )
        room = budget * 3 // 4
        gone: dict[str, set[str]] = {}
        for at, event_id, origin in newest:
            room -= len(event_id) + SEEN_ITEM_BYTES
            if room < 0:
                gone.setdefault(origin, set()).add(event_id)
        for origin, ids in gone.items():
            part = self.parts[origin]
            part.seen = {event_id: at for event_id, at in part.seen.items() if event_id not in ids}  # `extra_seen` anew
        self._count_trimmed("seen", 1)

    def fit_identifiers(self, budget: int = IDENTIFIERS_MAX_BYTES) -> bool:
        """Keep the identifiers the profile lists (`Part.identifiers`, of every part) within `budget` bytes as
        stored: past it, those that fit in three quarters of it stay, the person's own before browser and
        device ids (SHARED_IDENTIFIER_TYPES), each newest first, in memory as in the store (a reload lists what
        the profile did), and the write counts "identifiers" (`take_trimmed`). True when any went.

        The list is a view of identity's links, which keep them all: an event carrying only forgotten ones
        goes to the root part (as one whose identifiers no part saw), an identifier seen again is listed
        again, and the export and a deletion's count name what the profile lists. A deletion still removes
        them all (the record goes whole; identity purges its links by person); a suppression hashes the
        person's own identifiers, which go last."""
        parts = self.parts
        total = 0
        for part in parts.values():
            total += part.identifiers_stored_bytes()
        if total <= budget:
            return False
        ranked = sorted(
            (
                (key.partition(":")[0] not in SHARED_IDENTIFIER_TYPES, at, key, origin)
                for origin, part in parts.items()
                for key, at in part.identifiers.items()
            ),
            reverse=True,
        )
        room = budget * 3 // 4
        gone: dict[str, set[str]] = {}
        dumps = orjson.dumps
        for _own, at, key, origin in ranked:
            room -= stored_size(dumps(key)) + len(dumps(at)) + 2  # each with its comma
            if room < 0:
                gone.setdefault(origin, set()).add(key)
        for origin, keys in gone.items():
            part = parts[origin]
            part.identifiers = {key: at for key, at in part.identifiers.items() if key not in keys}
        self._owners = None  # made again from what the parts list
        self._count_trimmed("identifiers", 1)
        return True

    def _count_trimmed(self, step: str, count: int) -> None:
        if count:
            trimmed = self._trimmed
            if trimmed is None:
                trimmed = self._trimmed = {}
            trimmed[step] = trimmed.get(step, 0) + count

    def to_doc(self, *, encoded: bool = False, squeeze: int = 1) -> dict[str, Any]:
        """The profile without its timeline (stored apart, one record per entry), JSON-serialisable (with
        `encoded`, only by orjson: see `to_json`; the histories then kept within their budget, divided by
        `squeeze`)."""
        budget = HISTORY_MAX_BYTES // len(self.parts) // squeeze
        if encoded:
            self._fit_seen(SEEN_MAX_BYTES // squeeze)
        return {
            "v": DOC_VERSION,
            "person_id": self.person_id,
            # Derivable from parts; kept at the top so a store can find the timelines to load (by origin).
            "merged_from": [origin for origin in self.parts if origin != self.person_id],
            "merges": [m.to_doc() for m in self.merges],
            # A store write (`encoded`) keeps the histories within HISTORY_MAX_BYTES, shared by the parts.
            "parts": [
                part.to_doc(encoded=encoded, history_budget=budget if encoded else None) for part in self.parts.values()
            ],
        }

    @classmethod
    def from_doc(
        cls,
        doc: Mapping[str, Any],
        timeline: Iterable[TimelineEntry | Mapping[str, Any]] = (),
        *,
        retention: Retention = DEFAULT_RETENTION,
    ) -> Profile:
        if doc.get("v", DOC_VERSION) != DOC_VERSION:
            raise InvalidArgument("v", f"profile document version {doc.get('v')!r} is not {DOC_VERSION}")
        parts = {}
        for part_doc in doc["parts"]:
            part = Part.from_doc(part_doc)
            parts[part.origin] = part
        profile = cls(
            doc["person_id"],
            retention=retention,
            parts=parts,
            merges=[MergeRecord.from_doc(m) for m in doc.get("merges", [])],
        )
        for item in timeline:
            entry = item if isinstance(item, TimelineEntry) else TimelineEntry.from_doc(item)
            part = parts.get(entry.origin, profile._root)
            part.timeline.append(entry)
            part.seen[entry.event_id] = entry.at
        for part in parts.values():
            part.timeline.sort()
            part._extra = None
        return profile

    # --- internals -------------------------------------------------------------------------------

    def _seen(self, event_id: str) -> bool:
        return any(event_id in part.seen for part in self.parts.values())

    def _remember(self, part: Part, event_id: str, at: float) -> None:
        seen = part.seen
        seen[event_id] = at
        part._seen_only(event_id, at)
        keep = max(self.retention.max_events, MIN_SEEN_IDS)
        if len(seen) > keep + (keep >> 2):  # trim in steps so the sort is amortised over many events
            newest = sorted(seen.items(), key=lambda item: (item[1], item[0]))[-keep:]
            part.seen = dict(newest)  # a new dict: the part's `extra_seen` is made again

    def _check_write(self, source: Any, at: Any, event_id: Any) -> None:
        if not isinstance(event_id, str) or not event_id:
            raise InvalidArgument("event_id", f"{event_id!r} must be a non-empty id: every write is idempotent on it")
        if not isinstance(source, str) or not source:
            raise InvalidArgument("source", f"{source!r} must name where the value comes from, e.g. 'api'")
        if isinstance(at, bool) or not isinstance(at, (int, float)) or not isfinite(at):
            raise InvalidArgument("at", f"{at!r} must be a time in epoch seconds")

    def _owner_map(self) -> dict[str, str]:
        owners = self._owners
        if owners is None:
            owners = {}
            for origin, part in self.parts.items():
                for key in part.identifiers:
                    owners.setdefault(key, origin)
            self._owners = owners
        return owners

    def _attribute(self, identifiers: tuple[str, ...]) -> Part:
        owners = self._owner_map()
        for key in identifiers:
            origin = owners.get(key)
            if origin is not None:
                return self.parts[origin]
        return self._root

    def _record(self, part: Part, attr: str, key: str, version: Any, out: dict[str, Any], single: bool) -> None:
        """Add a version to a history; report the new current value in `out` when it changed."""
        histories = getattr(part, attr)
        history = histories.get(key)
        if history is None:
            # A new trait, group or consent key of a person whose histories are past their budget as last
            # written is not kept: only current versions are left there, and keys without end (traits named
            # after each order, 30 KB an identify) took the record past the store's 8 MiB in 280 events,
            # after which every event of the person failed its partition's batch (the timeline keeps it).
            if part._written_history_bytes > HISTORY_MAX_BYTES // len(self.parts):
                return
            history = histories[key] = []
        if single:
            before = history[-1] if history else None
            if not record(history, version):
                return
        else:
            before = latest([getattr(p, attr).get(key, ()) for p in self.parts.values()])
            record(history, version)
            if latest([getattr(p, attr).get(key, ()) for p in self.parts.values()]) is not version:
                return
        field_name = "granted" if attr == "consent" else "value"
        old = getattr(before, field_name) if before is not None else None
        new = getattr(version, field_name)
        if _changed(old, new):
            out[key] = new

    def _contribute(
        self,
        part: Part,
        matching: tuple[ComputedTrait, ...],
        payload: Mapping[str, Any],
        event: ProfileEvent,
        now: float,
        out: dict[str, Any],
        single: bool,
    ) -> None:
        computed = part.computed
        at, event_id = event.at, event.event_id
        scope = None
        for trait in matching:
            if trait.reads_event:
                if scope is None:
                    scope = EventScope(payload, event)
                value = trait.extract(scope)
            else:
                value = trait.extract(payload)
            if value is MISSING:
                continue
            name = trait.name
            state = computed.get(name)
            if single:
                if state is None:
                    before = MISSING
                    state = computed[name] = ComputedState.for_trait(trait)
                elif state.signature != trait.signature:
                    before = state.agg.result(state.op)
                    state = computed[name] = ComputedState.for_trait(trait)
                else:
                    before = state.agg.result(state.op)
                    if state.entries:
                        state.prune(now)
                state.add(at, event_id, value, now)
                after = state.agg.result(state.op)
            else:
                before = self._computed_value(name)
                for other in self.parts.values():
                    stale = other.computed.get(name)
                    if stale is not None and stale.signature != trait.signature:
                        del other.computed[name]  # contributions made under another definition
                    elif stale is not None and stale.window is not None:
                        stale.prune(now)
                state = computed.get(name)
                if state is None:
                    state = computed[name] = ComputedState.for_trait(trait)
                state.add(at, event_id, value, now)
                after = self._computed_value(name)
            window = state.window
            if window is not None:
                # The expiry this entry brings (one aged out already was not added: its due is past).
                due = at + window
                if due > now and ((added := self._added_due) is None or due < added):
                    self._added_due = due
            if before is MISSING or _changed(before, after):
                out[name] = after

    def _computed_value(self, name: str, now: float | None = None) -> Any:
        """The value over all parts (as of `now`, or as of each part's last prune); MISSING if none has it."""
        states = [part.computed[name] for part in self.parts.values() if name in part.computed]
        if not states:
            return MISSING
        if len(states) == 1:
            return states[0].summary(now).result(states[0].op)
        return combined_result(states[0].op, [state.summary(now) for state in states])

    def _score(self, name: str) -> Score | None:
        best = None
        for part in self.parts.values():
            score = part.scores.get(name)
            if score is not None and (best is None or score.key() > best.key()):
                best = score
        return best

    def _timeline(self) -> list[TimelineEntry]:
        if len(self.parts) == 1:
            return self._root.timeline
        return list(heapq.merge(*(part.timeline for part in self.parts.values())))

    def _add_entry(
        self, part: Part, entry: TimelineEntry, now: float, change: ProfileChange, defs: ComputedTraits
    ) -> None:
        retention = self.retention
        max_age = retention.max_age_seconds
        if max_age is not None and entry.at + max_age <= now:
            self._fold(part, [entry], defs)  # already past retention: dropped at once
            return
        timeline = part.timeline
        if len(self.parts) == 1:
            if len(timeline) >= retention.max_events and entry < timeline[0]:
                self._fold(part, [entry], defs)  # older than everything kept in a full timeline
                return
            if not timeline or entry > timeline[-1]:
                timeline.append(entry)
            else:
                _insort_entry(timeline, entry)
            part._entered(entry)
            change.timeline_added.append(entry)
            removed = change.timeline_removed
            start = len(removed)
            if len(timeline) > retention.max_events:
                removed.append(timeline.pop(0))
            if max_age is not None:
                while timeline and timeline[0].at + max_age <= now:
                    removed.append(timeline.pop(0))
            if len(removed) > start:
                part._left(removed[start:])
                self._fold(part, removed[start:], defs)
            return
        if sum(len(p.timeline) for p in self.parts.values()) >= retention.max_events:
            oldest = min((p.timeline[0] for p in self.parts.values() if p.timeline), default=None)
            if oldest is not None and entry < oldest:
                self._fold(part, [entry], defs)
                return
        _insort_entry(timeline, entry)
        part._entered(entry)
        change.timeline_added.append(entry)
        change.timeline_removed.extend(self._enforce_retention(now, defs))

    def _enforce_retention(self, now: float, defs: ComputedTraits) -> list[TimelineEntry]:
        """Drop entries past the age limit, then the oldest beyond the count limit, over all parts; each
        part folds what it lost into its base."""
        dropped: list[TimelineEntry] = []
        max_age = self.retention.max_age_seconds
        parts = list(self.parts.values())
        lost: dict[int, list[TimelineEntry]] = {}
        if max_age is not None:
            for index, part in enumerate(parts):
                timeline = part.timeline
                count = 0
                while count < len(timeline) and timeline[count].at + max_age <= now:
                    count += 1
                if count:
                    lost[index] = timeline[:count]
                    del timeline[:count]
                    part._left(lost[index])
        excess = sum(len(p.timeline) for p in parts) - self.retention.max_events
        if excess > 0:
            cut = dict.fromkeys(range(len(parts)), 0)
            for _ in range(excess):
                index = min(
                    (i for i, p in enumerate(parts) if cut[i] < len(p.timeline)),
                    key=lambda i: parts[i].timeline[cut[i]],
                )
                cut[index] += 1
            for index, count in cut.items():
                if count:
                    gone = parts[index].timeline[:count]
                    lost.setdefault(index, []).extend(gone)
                    del parts[index].timeline[:count]
                    parts[index]._left(gone)
        for index, entries in lost.items():
            self._fold(parts[index], entries, defs)
            dropped.extend(entries)
        if len(lost) > 1 or excess > 0:
            dropped.sort()
        return dropped

    def _fold(self, part: Part, entries: list[TimelineEntry], defs: ComputedTraits) -> None:
        """Fold entries retention takes off `part`'s timeline (already taken off) into its base."""
        base = part.base
        if base is None:
            # The first loss. The base is complete for the all-time traits held now only if nothing was
            # lost before it (a profile an older release stored may have dropped events without a base):
            # every event the part counted is then either still retained or among these.
            own = sum(1 for e in part.timeline if not e.platform) + sum(1 for e in entries if not e.platform)
            sigs = {t.name: t.signature for t in defs} if own >= part.event_count else {}
            first = entries[0]
            base = part.base = TimelineBase(first.at, first.event_id, sigs)
        for entry in entries:
            base.fold(entry, defs)

    def _rebuilt(self, part: Part, trait: ComputedTrait, now: float) -> ComputedState | None:
        """A part's state for `trait` recomputed from its retained timeline, on top of what its base folded
        when the base covers the trait; None when nothing contributes."""
        state = None
        base = part.base
        if base is not None and base.covers(trait):
            folded = base.computed.get(trait.name)
            if folded is not None:
                state = folded.copy()
                if state.window is not None:
                    state.prune(now)
        for entry in part.timeline:
            value = _contribution(trait, entry)
            if value is not MISSING:
                if state is None:
                    state = ComputedState.for_trait(trait)
                state.add(entry.at, entry.event_id, value, now)
        return state

    def _align(self, defs: ComputedTraits, now: float) -> None:
        """After parts moved: drop states of removed definitions, rebuild changed ones, prune windows."""
        for part in self.parts.values():
            base = part.base
            if base is not None:
                for name, sig in list(base.sigs.items()):
                    trait = defs.get(name)
                    if trait is None or trait.signature != sig:
                        base.forget(name)
            for name, state in list(part.computed.items()):
                trait = defs.get(name)
                if trait is None:
                    del part.computed[name]
                elif state.signature != trait.signature:
                    rebuilt = self._rebuilt(part, trait, now)
                    if rebuilt is None:
                        del part.computed[name]
                    else:
                        part.computed[name] = rebuilt
                elif state.window is not None:
                    state.prune(now)

    def _retract_duplicates(self, loser: Profile, defs: ComputedTraits) -> list[TimelineEntry]:
        """Events applied to both persons before the merge reached the profile count once: the loser's
        copy is taken out (its timeline entry says what to subtract; without it, windows still drop it).
        Returns the loser's timeline entries taken out (their stored records are to be deleted)."""
        mine = set().union(*(part.seen for part in self.parts.values()))
        retracted: list[TimelineEntry] = []
        for part in loser.parts.values():
            duplicates = mine & part.seen.keys()
            if not duplicates:
                continue
            entries = {entry.event_id: entry for entry in part.timeline if entry.event_id in duplicates}
            retracted.extend(entries.values())
            part.timeline = [entry for entry in part.timeline if entry.event_id not in duplicates]
            part._extra = None  # ids leave `seen` below
            for event_id in duplicates:
                entry = entries.get(event_id)
                del part.seen[event_id]
                if entry is None:
                    for state in part.computed.values():
                        if state.window is not None:
                            state.remove_entry(event_id)
                    continue
                if not entry.platform:
                    part.event_count -= 1
                for trait in defs.matching(entry.type, entry.name, entry.platform):
                    state = part.computed.get(trait.name)
                    value = _replayed(trait, entry)
                    if state is not None and value is not MISSING and state.signature == trait.signature:
                        state.remove(event_id, entry.at, value)
            for histories in (part.traits, part.groups, part.consent):
                for key, history in list(histories.items()):
                    kept = [version for version in history if version.event_id not in duplicates]
                    if len(kept) != len(history):
                        if kept:
                            histories[key] = kept
                        else:
                            del histories[key]
        return retracted


def _level(sizes: list[int], goal: int) -> int:
    """The largest cap under which `sizes`, each cut to it, add up to at most `goal`."""
    ordered = sorted(sizes)
    left, rest = len(ordered), goal
    for size in ordered:
        if size * left > rest:
            return rest // left
        rest -= size
        left -= 1
    return ordered[-1] if ordered else goal


def _exported_contribution(at: float, event_id: str, value: Any) -> dict[str, Any]:
    """A windowed state's item as an export shows it: one contribution, or a bucket of coalesced ones (a busy
    window, `aggregates`) with its oldest contribution's time, its cell's width and its summary (its event id
    is empty: no event's, and it sorts first among those of its time)."""
    if event_id == BUCKET:
        width, summary = value
        return {"at": at, "event_id": event_id, "coalesced": {"width": width, "summary": summary}}
    return {"at": at, "event_id": event_id, "value": value}


def _insort_entry(timeline: list[TimelineEntry], entry: TimelineEntry) -> None:
    """Insert keeping (at, event_id) order (entries are tuples: their order is the timeline order)."""
    timeline.insert(bisect_left(timeline, entry), entry)


def _history_key(version: Any) -> tuple[float, str]:
    return (version.at, version.event_id)


def _keys(mappings: Iterable[Mapping[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for mapping in mappings:
        seen.update(dict.fromkeys(mapping))
    return list(seen)


def _current_all(histories: Mapping[str, list[Any]], at: float | None) -> dict[str, Any]:
    if at is None:
        return {key: history[-1] for key, history in histories.items() if history}
    out = {}
    for key, history in histories.items():
        version = as_of(history, at)
        if version is not None:
            out[key] = version
    return out


def _latest_all(all_histories: list[Mapping[str, list[Any]]], at: float | None) -> dict[str, Any]:
    out = {}
    for key in _keys(all_histories):
        version = latest([histories.get(key, ()) for histories in all_histories], at)
        if version is not None:
            out[key] = version
    return out


def _copy(value: Any) -> Any:
    # Cached results (unique lists) are shared with the state; a view hands out its own copy.
    return list(value) if type(value) is list else value


def _empty_view(person_id: str) -> ProfileView:
    return ProfileView(person_id, {}, {}, {}, {}, {}, set(), [], None, None, 0)


def _diff(before: ProfileView, after: ProfileView, change: ProfileChange) -> None:
    """Record in `change` every current value that differs between two views (None = gone)."""

    def section(old: Mapping[str, Any], new: Mapping[str, Any], out: dict[str, Any], read: Any, presence: bool) -> None:
        # A trait that is absent and one whose current version removed it read the same (None); a computed
        # trait or score appearing or disappearing is a change even when its value is None.
        for key in _keys((old, new)):
            a = read(old[key]) if key in old else None
            b = read(new[key]) if key in new else None
            if _changed(a, b) or (presence and (key in old) != (key in new)):
                out[key] = b

    section(before.traits, after.traits, change.traits, lambda v: v.value, False)
    section(before.groups, after.groups, change.groups, lambda v: v.value, False)
    section(before.consent, after.consent, change.consent, lambda c: c.granted, False)
    section(before.scores, after.scores, change.scores, lambda s: s.value, True)
    section(before.computed, after.computed, change.computed, lambda v: v, True)
