"""Orchestration's state: what the store holds, and the per-partition hot cache in front of it.

Collections (one writer each: the engine of the person's partition, except journeys, written by the API):

| collection                   | key                                   | holds                                        |
|------------------------------|---------------------------------------|----------------------------------------------|
| `orchestration_persons`      | person id                             | the person's view (flat fields, segments, and `pending`: since when they lag behind the person's events, when the record was written while they did), arbiter state (`records.person_record`), live instance ids, last entry per journey, wake timer, the next scheduled-entry slot per journey, `early` (event ids a profile change listed before the event reached the engine), the identifiers their events came with (`ids`: the latest userId and anonymousId, which outcome events are sent under), what came from each person merged into them (`merged_from`) and the survivor they were merged into (`merged_into`), the fingerprint of the profile fields kept (`reads`, `reads.py`; absent: every field); a part the person lacks (empty) is left out |
| `orchestration_instances`    | instance id                           | `records.instance_record` (indexed by person_id, journey_id); an ended one is swept after CDP_ORCHESTRATION_HISTORY_DAYS (400) from its end or its goal window's end, whichever is later (`history.py`); a running one stays |
| `orchestration_decisions`    | `<person>:<inverted µs>:<action>:<kind>:<n>` | every arbiter decision, newest first in key order (and the latest refused entry per journey, `<person>:~entry:<journey>`); swept after CDP_ORCHESTRATION_HISTORY_DAYS from its `at` (`history.py`) |
| `orchestration_approvals`    | action id                             | actions held by the approval gate and their answer; a decided one is swept after CDP_ORCHESTRATION_HISTORY_DAYS from its answer (`history.py`) |
| `orchestration_stats`        | `<journey>:<version>:<partition>`     | entered, converted, ended by reason, decisions by kind, split variants [entries, conversions] |
| `orchestration_enrollments`  | `<journey>:<idempotency key>`         | Enroll's answer, so a retried call gets the first one, with its `journey_id` and `person_id` (indexed: a deletion deletes the person's answers, whose keys are the caller's and may carry personal data; the "deleted" answer an Enroll for a forgotten person gets names no one, and answers written before a build that kept the person id age out only); swept after CDP_ORCHESTRATION_HISTORY_DAYS (`history.py`) |
| `orchestration_outcomes`     | outcome event messageId               | outcome events that are not a send's own (in-app opens), until the collector took them |
| `orchestration_forgotten`    | `<privacy request id>:<person id>`    | a privacy deletion applied to the person (counts only, no personal data) |
| `orchestration_deleted`      | person id                             | a privacy deletion accepted for the person (when, which request; no personal data), written as soon as the notice reaches the handler: no dispatcher sends to them; swept with the tombstones |
| `orchestration_rules`        | rules document digest                 | the count or sum computed traits (field keys) the arbiter's rules were compiled with (`arbiter_rules.py`); no personal data |
| `orchestration_tombstones`   | person id                             | a person a privacy deletion forgot (when, which request; no personal data): whatever reaches the engine for them afterwards is dropped; swept after CDP_ORCHESTRATION_TOMBSTONE_DAYS (35), when nothing for them can still arrive |
| `orchestration_members`      | `<segment>:<person id>`               | the segments' members as the persons' records hold them (`{"person_id"}`, indexed: a deletion finds them), written with the record (`keep_members`): what publishing a scheduled journey reads to arm its segment's members (`api_journeys`), not every person; `~built` marks a store whose records were all indexed (`prepare_store` indexes an earlier build's once); a person record with segments carries `indexed: 1`, and one without it (an earlier build's, written during a rolling upgrade) has its rows written again at the person's next input |
| `orchestration_arming`       | `<journey id>:<uuid>`                 | a publish arming a scheduled journey's members, from before the version is saved until every member was sent its `arm` command: one left by a crash is done again at the next start (`api_journeys.resume_arming`); no personal data |

The dispatchers (`dispatch.py`, one per channel) write `orchestration_sends` (action id -> its send record and
outcome; while the action is still being tried, status "pending" with its attempts and hand-backs, no content),
swept after CDP_ORCHESTRATION_HISTORY_DAYS from its last write (`history.py`).

Counters are kept per partition so each has one writer; the API sums them. The hot cache holds a
`Person` per recently seen person with their live instances; anything dropped from it is durable (the
engine has one batch in flight) and read back on the next stimulus.
"""

from __future__ import annotations

import collections
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

from cdp_kit.bus import OutMessage
from cdp_kit.storage import Delete, Put, Store
from cdp_orchestration import wakes as wakes_module
from cdp_orchestration.domain.arbiter import Decision, PersonState
from cdp_orchestration.domain.instance import Instance, Status
from cdp_orchestration.domain.records import (
    instance_from_record,
    person_from_record,
    person_record,
    user_data,
    user_data_from,
)
from cdp_orchestration.domain.view import PersonView
from cdp_orchestration.wakes import Live, WakeIndex

INSTANCES = "orchestration_instances"
PERSONS = "orchestration_persons"
DECISIONS = "orchestration_decisions"
APPROVALS = "orchestration_approvals"
STATS = "orchestration_stats"
ENROLLMENTS = "orchestration_enrollments"
FORGOTTEN = "orchestration_forgotten"
TOMBSTONES = "orchestration_tombstones"
SENDS = "orchestration_sends"  # written by the dispatchers (`dispatch.py`)
OUTCOMES = "orchestration_outcomes"
MEMBERS = "orchestration_members"
ARMING = "orchestration_arming"
MEMBERS_BUILT = "~built"  # the marker of `prepare_store`'s one indexing of the records (no segment id starts so)

MAX_PARKED = 16  # event entries a person may have waiting for the profile (`Person.parked`)

_FAR = 10**19  # decision keys hold (FAR - microseconds): a key-ordered scan reads the newest first


def decision_key(person_id: str, decision: Decision, index: int) -> str:
    return f"{person_id}:{decision_order(decision.at)}:{decision.action_id}:{decision.kind.value}:{index}"


def decision_order(at: float) -> str:
    """What follows the person id in a decision's key: newest first in key order (always 20 digits, the first
    a 0, so `decisions_prefix` reads the arbiter's decisions and nothing else)."""
    return f"{_FAR - int(at * 1_000_000):020d}"


def decisions_prefix(person_id: str) -> str:
    """The keys of the person's arbiter decisions (those of `decision_key`), newest first."""
    return f"{person_id}:0"


# A person's refused entries are kept in the decision collection too, one per journey (the latest), under
# `<person>:~entry:<journey id>`: a privacy deletion and an export read every key under `<person>:`, so these
# go and are exported with the person's decisions; ListDecisions merges them in by their time.
def not_entered_key(person_id: str, journey_id: str) -> str:
    return f"{not_entered_prefix(person_id)}{journey_id}"


def not_entered_prefix(person_id: str) -> str:
    return f"{person_id}:~entry:"


def member_key(segment: str, person_id: str) -> str:
    return f"{segment}:{person_id}"


def members_prefix(segment: str) -> str:
    """The keys of the segment's members (a segment id holds no `:`, as segmentation checks it; a catalogue
    file's that did would read another segment's members too: more `arm` commands, each a no-op)."""
    return f"{segment}:"


def keep_members(batch: Batch, person: Person) -> None:
    """The person's rows of `MEMBERS` follow their segments: one put per segment joined and one delete per
    segment left since the record was last written (a segment change writes the record anyway)."""
    segments, indexed = person.segments, person.indexed
    if segments == indexed:
        return
    person_id = person.person_id
    for segment in segments - indexed:
        batch.put(MEMBERS, member_key(segment, person_id), {"person_id": person_id})
    for segment in indexed - segments:
        batch.delete(MEMBERS, member_key(segment, person_id))
    person.indexed = frozenset(segments)


def wake_id(person_id: str, at: float) -> str:
    return "w" + hashlib.sha256(f"wake\x1f{person_id}\x1f{at!r}".encode()).hexdigest()[:32]


def slot_id(journey_id: str, person_id: str, at: float) -> str:
    return "s" + hashlib.sha256(f"slot\x1f{journey_id}\x1f{person_id}\x1f{at!r}".encode()).hexdigest()[:32]


def stats_key(journey_id: str, version: int, partition: int) -> str:
    return f"{journey_id}:{version}:{partition}"


@dataclass(slots=True)
class Person:
    """One person as the engine holds them: their view, arbiter state, live instances and wake timer."""

    person_id: str
    fields: dict[str, Any] = field(default_factory=dict)
    segments: set[str] = field(default_factory=set)
    # The segments the person's rows of `MEMBERS` hold (those of the record last read or written).
    indexed: frozenset[str] = frozenset()
    state: PersonState | None = None
    # Instances that can still react, by id; `wakes` indexes them by what can move them (`wakes.py`).
    live: Live = field(default_factory=Live)
    entered: dict[str, float] = field(default_factory=dict)  # journey id -> last entered at
    wake: tuple[str, float] | None = None
    slots: dict[str, tuple[str, float]] = field(default_factory=dict)  # scheduled journey -> (timer id, at)
    # The latest userId / anonymousId seen on the person's events: identity resolves either to this person,
    # so outcome events sent under them land here (the person id itself is no identifier identity knows).
    ids: dict[str, str] = field(default_factory=dict)
    # Persons merged into this one -> what came from them (`merges.merged_from_record`), so an unmerge gives
    # it back and their decision history reads as this person's.
    merged_from: dict[str, dict[str, Any]] = field(default_factory=dict)
    merged_into: str = ""  # the survivor this person was merged into ("" while they are a person of their own)
    # The fields lag behind the person's events (`saw_event` / `profile_applied`): (the latest event id no
    # profile change has listed yet, or "" when read back from the record; when the earliest such event was
    # applied here), else None.
    pending: tuple[str, float] | None = None
    pending_written: bool = False  # the person record last written holds `pending`
    # The latest profile change applied here (its `ProfileChanged.at`, the profile's clock), and - while a
    # segment change decided on a later one came first (sources interleave) - (that change's time, since
    # when the fields lag behind it): `segment_ahead` / `change_seen`.
    changed_at: float = 0.0
    awaited: tuple[float, float] | None = None
    profiled: str = ""  # the last event id a profile change listed
    # Event ids profile changes listed before the events themselves reached the engine (sources interleave),
    # so they do not start a wait when they come: id -> the stream time of the change. A few per person at
    # most, kept on the record (`early`) when it is written, so a restart or the hot cache letting the person
    # go between the change and its event does not make the event wait `profile_wait`.
    early: dict[str, float] | None = field(default=None, repr=False, compare=False)
    # The fingerprint of the profile fields this person's copy is kept under (`reads.Keep`); None: every
    # field (a record of an earlier build, or no profile service configured).
    reads: str | None = None
    dirty: bool = False
    # A privacy deletion forgot the person (`privacy.forget`; a tombstone in the store): their record is
    # deleted, never written again, and what reaches the engine for them afterwards is dropped.
    forgotten: bool = False
    changed: dict[str, Instance] = field(default_factory=dict)  # instances to write in this batch
    # Entries refused and recorded since this replica read the person: journey id -> (rule, when recorded).
    # Not on the record; it keeps a busy trigger from rewriting the same refusal on every event
    # (`Applier.not_entered`).
    refusals: dict[str, tuple[str, float]] = field(default_factory=dict, repr=False, compare=False)
    # Event entries whose `if` was false while the fields lagged behind that very event: checked again when
    # the profile's change for it arrives (`engine`, "Entry conditions wait for the profile"). In memory only,
    # at most `MAX_PARKED`: (journey, the event, when it arrived).
    parked: list[tuple[Any, Any, float]] | None = field(default=None, repr=False, compare=False)
    # The arbiter state's record, kept with the state it was made of: the record is rewritten on every profile
    # change, the arbiter state (immutable, replaced when it changes) far less often.
    arbiter_record: tuple[PersonState, dict[str, Any]] | None = field(default=None, repr=False, compare=False)
    # The live instances by what can move them, once there are more than a few (`wakes.py`).
    wakes: WakeIndex | None = field(default=None, repr=False, compare=False)

    def view(self) -> PersonView:
        return PersonView(self.person_id, dict(self.fields), frozenset(self.segments), behind=self.behind())

    def ended(self, journeys: Any) -> list[Instance]:
        """The ended instances `live` holds (kept while they watch their goal)."""
        if self.wakes is None:
            return [i for i in self.live.values() if i.status is Status.ENDED]
        return self.wakes.ended(self.live, journeys)  # type: ignore[arg-type]

    def behind(self) -> float | None:
        """Since when the fields lag behind the person's events or a segment change (`PersonView.behind`)."""
        pending, awaited = self.pending, self.awaited
        behind = pending[1] if pending else None
        if awaited is not None and (behind is None or awaited[1] < behind):
            behind = awaited[1]
        return behind

    def offered(
        self, journeys: Any, now: float, *, event: str | None = None, fields: Any = (), segments: Any = ()
    ) -> list[Instance]:
        """The live instances an event called `event`, or a change of `fields` / `segments`, can move, in
        `live`'s order (`wakes.WakeIndex.pick`); every one while they are few (`wakes.INDEXED_ABOVE`)."""
        wakes = self.wakes
        if wakes is None:
            if len(self.live) <= wakes_module.INDEXED_ABOVE:
                return list(self.live.values())
            wakes = self.wakes = WakeIndex()
        return wakes.pick(
            self.live,  # type: ignore[arg-type]
            journeys,
            now,
            self.behind(),
            event=event,
            fields=fields,
            segments=segments,
        )

    def segment_ahead(self, change_at: float, at: float) -> None:
        """A segment change decided on the profile change of `change_at` reached the engine at `at`: until
        that change arrives here too, the fields lag behind what segmentation saw (a segment entered on a
        score this copy of the fields does not have yet)."""
        if change_at <= self.changed_at + _SAME_CHANGE:
            return
        awaited = self.awaited
        self.awaited = (max(change_at, awaited[0]), awaited[1]) if awaited is not None else (change_at, at)

    def change_seen(self, change_at: float) -> bool:
        """A profile change of `change_at` was applied; whether it ended a lag `segment_ahead` started."""
        if change_at > self.changed_at:
            self.changed_at = change_at
        awaited = self.awaited
        if awaited is None or change_at + _SAME_CHANGE < awaited[0]:
            return False
        self.awaited = None
        self.dirty = True
        return self.pending is None

    def saw_event(self, event_id: str, at: float) -> bool:
        """A resolved event of the person reached the engine at `at`: until a profile change lists it, the
        fields lag behind it. Per event, so in memory: the record carries since when they lag when it is
        written anyway (an entry, new identifiers, an action held), never for this alone. True when it ended
        a lag (its change came first, and covers the events seen before it)."""
        if not event_id:
            return False
        early = self.early
        if early and event_id in early:
            # Its change came first. Taken out whatever else holds, also when that change is the latest one
            # (`profiled`): left in, a copy of this event coming later (a client's retry) would read as the
            # event whose change came first, and end the lag of the events seen before the copy.
            del early[event_id]
            if self.pending is not None:
                # Its change came before it, and the profile applies a person's events in the order they
                # reach this engine: the events seen here before it are applied too, whether or not a change
                # listing them arrived (one listed by a change whose ids overflowed `_EARLY`, a copy).
                self.caught_up()
                return True
            return False
        if event_id == self.profiled:
            # The event the latest profile change listed: a copy of it (applied already), or the event itself
            # when its change came first and `early` no longer holds it.
            return False
        pending = self.pending
        self.pending = (event_id, pending[1] if pending is not None else at)
        return False

    def profile_applied(self, event_ids: list[str], at: float = 0.0) -> bool:
        """A profile change listed `event_ids` (at stream time `at`); whether the fields caught up with the
        person's events by it. The profile applies a person's events in the order they were resolved, so
        the change listing the latest one seen here covers the earlier ones too."""
        if not event_ids:
            return False
        self.profiled = event_ids[-1]
        pending = self.pending
        ahead = event_ids
        if pending is not None:
            # "": read back from the record, which keeps no event id: the next change of the person's events
            # ends it (a record rewritten for every event to keep the latest id would cost a write per event).
            if pending[0]:
                if pending[0] not in event_ids:
                    return False  # it applied earlier events of theirs only: the later one is still on its way
                # The ids it lists after the latest event seen here are events still on their way here: kept
                # as early ones, so none of them starts a wait the change has already ended.
                latest = len(event_ids) - 1 - event_ids[::-1].index(pending[0])  # a copy may be listed twice
                ahead = event_ids[latest + 1 :]
            self.caught_up()
            if ahead:
                self._early(ahead, at)
            return True
        # Every event seen here is covered already: these reached the profile first (or are its own writes).
        self._early(ahead, at)
        return False

    def _early(self, event_ids: list[str], at: float) -> None:
        early = self.early
        if early is None:
            early = self.early = {}
        for event_id in event_ids:
            early[event_id] = at
        while len(early) > _EARLY:
            del early[next(iter(early))]
        stale = at - _EARLY_SECONDS
        for event_id in [e for e, listed in early.items() if listed < stale]:
            del early[event_id]  # ids whose event never came here (an API write's), kept no longer
        # Written with the record when it is written (most changes move a field, and an overtaking one then
        # writes it anyway): the event may come after a restart, or after the cache let the person go. A
        # change moving no field writes nothing for this (`test_engine_writes`): should orchestration restart
        # between it and its event, that event waits for the next change of the person, at most profile_wait.

    def caught_up(self) -> None:
        """The fields cover every event of the person seen here."""
        self.pending = None
        if self.pending_written:
            self.dirty = True

    def record(self) -> dict[str, Any]:
        """The person as `load_persons` reads them back. Only the parts the person has are written: the
        record is written on most profile changes, and the store walks every value of a document it writes
        (empty lists and maps, and an arbiter state with nothing in it, were half of that walk for the
        many persons no journey has reached). `fields` and `segments` are always there."""
        state = self.state
        assert state is not None
        record: dict[str, Any] = {"fields": user_data(self.fields), "segments": sorted(self.segments)}
        if state.sent or state.deferred or state.awaiting or state.last_seen:
            cached = self.arbiter_record
            if cached is None or cached[0] is not state:
                cached = self.arbiter_record = (state, person_record(state))
            record["arbiter"] = cached[1]
        if self.live:
            record["live"] = sorted(self.live)
        if self.entered:
            record["entered"] = dict(self.entered)
        if self.wake:
            record["wake"] = list(self.wake)
        if self.slots:
            record["slots"] = {journey: list(slot) for journey, slot in self.slots.items()}
        if self.ids:
            record["ids"] = dict(self.ids)
        # Merge bookkeeping and the profile's lag likewise: most persons never merge, and their fields rarely
        # lag when this is written.
        if self.merged_from:
            record["merged_from"] = dict(self.merged_from)
        if self.merged_into:
            record["merged_into"] = self.merged_into
        self.pending_written = self.pending is not None
        if self.pending is not None:
            record["pending"] = self.pending[1]
        if self.early:
            record["early"] = [[event_id, at] for event_id, at in self.early.items()]
        if self.changed_at:
            record["changed_at"] = self.changed_at
        if self.awaited is not None:
            record["awaited"] = list(self.awaited)
        if self.segments:
            # The engine writes the person's rows of `MEMBERS` with this record (`keep_members`): a record with
            # segments and without this mark was written by an earlier build, which kept no rows (`load_persons`).
            record["indexed"] = 1
        if self.reads is not None:
            record["reads"] = self.reads
        return record


_EARLY = 16  # early event ids kept per person (`Person.early`)
# Segmentation rounds a profile change's time to the microsecond when it names it: times this close are the
# same change.
_SAME_CHANGE = 0.001
# Seconds of stream time an early id is kept: its event reaches the engine within the sourcing lag of the
# two streams (both are sourced by the server, also while orchestration is stopped), far below this.
_EARLY_SECONDS = 600.0


class Partition:
    """One partition's hot state: persons, least recently used first, and its counters."""

    def __init__(self) -> None:
        self.persons: collections.OrderedDict[str, Person] = collections.OrderedDict()
        self.stats: dict[str, dict[str, Any]] = {}
        self.stats_loaded = False
        # Person -> actions they have held for the profile (`engine._after`): what `cdp.orchestration.held`
        # reports. Persons the cache let go stay counted (their actions are still held, in the store).
        self.holding: dict[str, int] = {}


@dataclass(slots=True)
class Batch:
    """What applying one batch changes: the writes (last one per key wins), the messages, who was touched."""

    partition: int
    writes: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    deletes: set[tuple[str, str]] = field(default_factory=set)
    messages: list[OutMessage] = field(default_factory=list)
    touched: dict[str, Person] = field(default_factory=dict)
    stats: set[str] = field(default_factory=set)

    def put(self, collection: str, key: str, doc: dict[str, Any]) -> None:
        self.deletes.discard((collection, key))
        self.writes[(collection, key)] = doc

    def delete(self, collection: str, key: str) -> None:
        self.writes.pop((collection, key), None)
        self.deletes.add((collection, key))

    def ops(self) -> list[Put | Delete]:
        return [Put(c, k, d) for (c, k), d in self.writes.items()] + [Delete(c, k) for c, k in sorted(self.deletes)]


def stats_doc() -> dict[str, Any]:
    return {"entered": 0, "converted": 0, "ended": {}, "variants": {}, "decisions": {}}


async def load_persons(store: Store, hot: Partition, person_ids: set[str], reads: str | None = None) -> None:
    """Bring the persons not in the cache in from the store (new persons start empty, their fields kept under
    `reads`, the fingerprint of the fields kept now: `reads.Keep`)."""
    missing = [p for p in person_ids if p not in hot.persons]
    if not missing:
        return
    stored = await store.get_many(PERSONS, missing)
    tombstones = await store.get_many(TOMBSTONES, missing)
    live_ids = [i for r in stored.values() for i in r.doc.get("live", [])]
    instances = await store.get_many(INSTANCES, live_ids) if live_ids else {}
    for person_id in missing:
        record = stored.get(person_id)
        person = Person(person_id, state=PersonState(person_id), forgotten=person_id in tombstones, reads=reads)
        if record is not None and not person.forgotten:
            doc = record.doc
            person.reads = doc.get("reads")  # none: every field was kept
            # A part the person did not have is absent (`Person.record`); records written before that hold
            # every part, empty or not.
            person.fields = user_data_from(doc["fields"])
            person.segments = set(doc.get("segments") or ())
            if doc.get("indexed"):
                person.indexed = frozenset(person.segments)
            elif person.segments:
                # Written by an earlier build (a replica of it during a rolling upgrade, after `index_members`
                # ran): its rows may lack segments joined since. Written again at the person's next input,
                # with a row for each of their segments (a row already there is written again, unchanged).
                person.dirty = True
            if doc.get("arbiter"):
                person.state = person_from_record(doc["arbiter"])
            person.entered = dict(doc.get("entered") or {})
            person.wake = tuple(doc["wake"]) if doc.get("wake") else None  # type: ignore[assignment]
            person.slots = {journey: (slot[0], slot[1]) for journey, slot in doc.get("slots", {}).items()}
            person.ids = dict(doc.get("ids") or {})
            person.merged_from = dict(doc.get("merged_from") or {})
            person.merged_into = doc.get("merged_into") or ""
            if doc.get("pending") is not None:
                person.pending = ("", doc["pending"])
                person.pending_written = True
            if doc.get("early"):
                person.early = {event_id: at for event_id, at in doc["early"]}
            person.changed_at = doc.get("changed_at") or 0.0
            if doc.get("awaited"):
                person.awaited = (doc["awaited"][0], doc["awaited"][1])
            for instance_id in doc.get("live") or ():
                if instance_id in instances:
                    person.live[instance_id] = instance_from_record(instances[instance_id].doc)
        hot.persons[person_id] = person


async def load_stats(store: Store, partition: int, hot: Partition) -> None:
    """Read this partition's counters back (at start, and after a failed commit)."""
    async for record in store.scan_all(STATS):
        if record.key.endswith(f":{partition}"):
            hot.stats[record.key] = record.doc
    hot.stats_loaded = True


async def prepare_store(store: Store) -> None:
    """The indexes the API reads instances by, and the segments' members (`MEMBERS`) of a store an earlier
    build wrote, indexed once."""
    await store.ensure_index(INSTANCES, "person_id")
    await store.ensure_index(INSTANCES, "journey_id")
    # A privacy deletion finds the person's approvals, Enroll answers and sends by these.
    await store.ensure_index(APPROVALS, "person_id")
    await store.ensure_index(ENROLLMENTS, "person_id")
    await store.ensure_index(SENDS, "person_id")
    await store.ensure_index(OUTCOMES, "person_id")
    await store.ensure_index(OUTCOMES, "reported")  # the ones still to post
    await store.ensure_index(MEMBERS, "person_id")  # a privacy deletion finds the person's rows
    await index_members(store)


async def index_members(store: Store, *, page: int = 1000) -> int:
    """Write the `MEMBERS` rows of every person record once, in a store whose records an earlier build wrote
    (a page of records at a time); the number of records read. A store that has the marker is left alone: the
    engine writes the rows with the records since. Rows of a record changed meanwhile by a replica of this
    build are its own to keep; one still of the earlier build (a rolling upgrade) writes records without rows
    (and without the mark `Person.record` writes), whose members a scheduled journey published meanwhile does
    not arm until this build's engine has written the person again (`load_persons`).

    A person forgotten by another replica's engine between this page's read and its rows' write would keep
    the rows written for them: each page's persons are read again after the write, and the rows of those
    gone are deleted (a forget committed later deletes them itself: `privacy.forget` drops the rows of every
    segment the record held)."""
    if await store.get(MEMBERS, MEMBERS_BUILT) is not None:
        return 0
    read, cursor = 0, None
    while True:
        found = await store.scan(PERSONS, cursor=cursor, limit=page)
        read += len(found.records)
        rows = {
            record.key: [member_key(segment, record.key) for segment in record.doc.get("segments") or ()]
            for record in found.records
        }
        ops: list[Put | Delete] = [
            Put(MEMBERS, key, {"person_id": person_id}) for person_id, keys in rows.items() for key in keys
        ]
        if ops:
            await store.bulk_write(ops)
            still = await store.get_many(PERSONS, [person_id for person_id, keys in rows.items() if keys])
            gone = [
                Delete(MEMBERS, key)
                for person_id, keys in rows.items()
                if keys and person_id not in still
                for key in keys
            ]
            if gone:
                await store.bulk_write(gone)
        cursor = found.next_cursor
        if cursor is None:
            break
    await store.put(MEMBERS, MEMBERS_BUILT, {"at": time.time()})
    return read
