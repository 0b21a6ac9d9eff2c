"""The journeys every replica runs, read from the store and kept parsed in memory.

A journey is stored as one record (`orchestration_journeys`, keyed by journey id) holding its state, its
published versions as written, and its draft:

    {"state": "active", "versions": {"1": {...document...}}, "draft": null | {...},
     "counted": {"1": ["computed.orders"]}, "draft_counted": ["computed.orders"],
     "created_at": 1733300000.0, "updated_at": ..., "published_at": ...}

`counted` / `draft_counted`: the computed traits of kind count or sum a version's (the draft's) conditions
read as 0 where a person has none, as the profile service named them when it was saved (`Journey.counted`).
Each version is compiled with its own, so a restart, a reload and every replica read it the same way; a
version stored without them (by an earlier release) reads those traits as missing, as it did then.

A published version never changes, so a parsed `Journey` is cached for good; the record's state and its
draft are read again whenever the API changes the journey (and, on other replicas, when the change is
announced on `orchestration.journeys.changed`). The engine reads `live()` (journeys taking entries),
`version(id, v)` (any published version a running instance is on) and the entry index below.

The entry index (`entering_on_event(name)`, `entering_on_segment(segment)`, `scheduled_on(segment)`) holds the
live journeys by what can start them, so an event meets only the journeys whose entry names it (or names no
event) rather than every live journey. It is rebuilt whenever a record is taken or dropped (publish, pause,
resume, archive, a reload), which is the only way `records` changes, and keeps `live()`'s order.

Within one event name, a journey whose filter requires `properties.<key> = "<text>"` (one of the filter's
and-ed conditions, on a top-level property, with a text literal) is kept under that key and text:
`entering_on_event(name, properties)` gives it only for an event whose property holds that very text,
which is the only way the filter can hold (the language's `=` on text is equality of strings). The other
journeys of the name are always given. So an event is tested against the journeys it can enter, not
every journey entering on its name (with many journeys filtering one event on a category or a product,
those tests were most of the engine's time per event).

A stored version (or draft) the validation now refuses - stored by an earlier release, before a template
limit, say - does not stop the service loading: it is kept as stored (`invalid` holds why, as
`describe_error` gives it: type and field, never a problem's text, which quotes the journey), shown by
GetJourney and ListJourneys, and logged once. It is out of service: it takes no entries (it is not live, and
the journey's older versions do not take its place). When only templates are refused (what the template
limits added), its running instances carry on and each action whose template is refused fails, naming the
template's field; otherwise `version()` does not give it, so its instances hold where they are (a stimulus
reaching one is not applied) and an action of theirs already decided fails naming why. Publishing a fixed
version puts the journey back in service.

A change (a draft saved, published or discarded; a state moved) is decided on the record as read and saved
against the stored version it was read at (`change`): a change saved by anyone else in between (another call,
another replica) makes the save fail rather than be written over. The change is then decided again on what is
stored now when the call allows it (`redecide`: a state move always; a call about the draft only while the
draft is the one it read), or refused with `JourneyChanged` (ABORTED) naming the journey and what changed
(journey_changes.py).

The stored version is the journey's revision, shown to callers (`Journey.revision`); a caller that gives the
revision it read (`expected_revision`) has its change made only on the journey still at that revision:
refused (`JourneyChanged`) when anyone saved it since the caller read it, and never decided again on
something else, since the caller asked for the journey as it read it.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cdp_kit.bus.consumer import describe_error
from cdp_kit.errors import AlreadyExists, Conflict, NotFound
from cdp_kit.storage import Put, Store, VersionConflict
from cdp_orchestration.domain.document import Catalogue, parse_journey
from cdp_orchestration.domain.journey import EventEntry, Journey, ScheduleEntry, SegmentEntry
from cdp_orchestration.domain.lifecycle import JourneyRecord, State
from cdp_orchestration.journey_changes import (
    Changed,
    Decide,
    JourneyChanged,
    Redecide,
    Stored,
    what_changed,
)

JOURNEYS = "orchestration_journeys"
DRAFT = 0  # the version `invalid` keys a draft under
ATTEMPTS = 5  # decisions a change makes, each on the record as stored then, before it gives up (`change`)

log = logging.getLogger("cdp.orchestration")


def record_doc(record: JourneyRecord, previous: Mapping[str, Any] | None, now: float) -> dict[str, Any]:
    previous = previous or {}
    published = set(record.versions) - {int(v) for v in previous.get("versions", {})}
    kept = previous.get("counted") or {}
    counted = {}
    for v, j in sorted(record.versions.items()):
        # a version kept as stored (it no longer validates) has no conditions to say it: its stored set stays
        if found := sorted(j.counted) or kept.get(str(v)):
            counted[str(v)] = found
    draft_counted: list[str] = []
    if record.draft is not None:
        draft_counted = sorted(record.draft.counted)
        if not draft_counted and record.draft.document == previous.get("draft"):
            draft_counted = previous.get("draft_counted") or []
    return {
        "state": record.state.value,
        "versions": {str(v): dict(j.document) for v, j in sorted(record.versions.items())},
        "draft": dict(record.draft.document) if record.draft is not None else None,
        "counted": counted,
        "draft_counted": draft_counted,
        "name": (record.draft or record.live).name if (record.draft or record.live) else "",  # type: ignore[union-attr]
        "priority": (record.draft or record.live).priority if (record.draft or record.live) else 0,  # type: ignore[union-attr]
        "created_at": previous.get("created_at", now),
        "updated_at": now,
        "published_at": now if published else previous.get("published_at"),
    }


class Journeys:
    """Parsed journey records, by id."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.records: dict[str, JourneyRecord] = {}
        self.docs: dict[str, dict[str, Any]] = {}
        self._stored_at: dict[str, int] = {}  # journey id -> the stored version `docs` holds
        self._versions: dict[tuple[str, int], Journey] = {}
        self._unloadable: dict[tuple[str, int], Journey] = {}  # as stored, out of service
        #: (journey id, version or DRAFT) -> why the stored document no longer validates
        self.invalid: dict[tuple[str, int], str] = {}
        self._live: tuple[Journey, ...] = ()
        self._by_event: dict[str, tuple[Journey, ...]] = {}  # event name -> journeys entering on it
        self._any_event: tuple[Journey, ...] = ()  # journeys entering on an event of any name
        self._by_segment: dict[str, tuple[Journey, ...]] = {}
        self._scheduled: dict[str, tuple[Journey, ...]] = {}  # segment -> scheduled journeys over it
        # Paused journeys by what would start them, so a trigger they turn away is recorded (NOT_ENTERED).
        self._paused_by_event: dict[str, tuple[Journey, ...]] = {}
        self._paused_any_event: tuple[Journey, ...] = ()
        self._paused_by_segment: dict[str, tuple[Journey, ...]] = {}
        # One more whenever `records` changes (`_index`): what reads the journeys' fields follows it (`reads.py`).
        self.generation = 0

    async def load(self) -> None:
        """Every stored journey taken in (at start, and on each ListJourneys: journeys created or changed
        through other replicas). A record whose stored version is the one held is the one held: it is not
        taken in again, and the index is rebuilt only when one was. Taking each in again parsed every
        journey's draft (a draft is not kept parsed by version) and bumped `generation`, so the next batch
        computed the fields read again (`reads.py`): a ListJourneys over 500 journeys took 0.75 s."""
        taken = False
        async for stored in self.store.scan_all(JOURNEYS):
            if self._stored_at.get(stored.key) == stored.version and stored.key in self.records:
                continue
            self._take(stored.key, stored.doc, stored.version, index=False)
            taken = True
        if taken or self.generation == 0:
            self._index()

    async def reload(self, journey_id: str) -> JourneyRecord | None:
        read = await self.read(journey_id)
        return read.record if read is not None else None

    async def read(self, journey_id: str) -> Stored | None:
        """The journey as stored now (None: there is none), taken in as `reload` does."""
        stored = await self.store.get(JOURNEYS, journey_id)
        if stored is None:
            self.records.pop(journey_id, None)
            self.docs.pop(journey_id, None)
            self._stored_at.pop(journey_id, None)
            self._index()
            return None
        return Stored(self._take(journey_id, stored.doc, stored.version), stored.doc, stored.version)

    def _take(self, journey_id: str, doc: dict[str, Any], version: int, *, index: bool = True) -> JourneyRecord:
        versions = {}
        counted = doc.get("counted") or {}
        for text, document in doc.get("versions", {}).items():
            key = (journey_id, int(text))
            if key not in self._versions and key not in self._unloadable:
                parsed = self._parse(key, document, frozenset(counted.get(text) or ()))
                if parsed is not None:
                    self._versions[key] = parsed
                else:
                    self._unloadable[key] = _as_stored(key, document)
            versions[int(text)] = self._versions.get(key) or self._unloadable[key]
        draft = None
        if doc.get("draft"):
            draft = self._parse((journey_id, DRAFT), doc["draft"], frozenset(doc.get("draft_counted") or ()))
            if draft is None:
                written = doc["draft"].get("version") if isinstance(doc["draft"], Mapping) else None
                draft = _as_stored((journey_id, written if isinstance(written, int) else 0), doc["draft"])
        else:
            self.invalid.pop((journey_id, DRAFT), None)
        record = JourneyRecord(journey_id, State(doc["state"]), versions, draft)
        self.records[journey_id] = record
        self.docs[journey_id] = doc
        self._stored_at[journey_id] = version
        if index:
            self._index()
        return record

    def _parse(self, key: tuple[str, int], document: Any, counted: frozenset[str]) -> Journey | None:
        """The journey `document` describes, its conditions reading the `counted` fields it was stored with as
        0 where missing. When it no longer validates, why is in `invalid` (logged once) and the journey is as
        stored, its refused templates failing every render (`parse_journey(as_stored=True)`), or None when
        something other than a template is refused."""
        as_saved = Catalogue(counted=counted)
        try:
            journey = parse_journey(document, as_saved)
        except Exception as exc:
            reason = describe_error(exc)
            if self.invalid.get(key) != reason:
                what = "its draft" if key[1] == DRAFT else f"version {key[1]}"
                log.error(
                    "journey %s: %s, as stored, no longer validates (%s); it is out of service until a fixed "
                    "version is published (cdpctl journey validate names every problem)",
                    key[0],
                    what,
                    reason,
                )
            self.invalid[key] = reason
            try:  # a template the validation now refuses: the rest of the journey still runs
                return parse_journey(document, as_saved, as_stored=True)
            except Exception:
                return None
        self.invalid.pop(key, None)
        return journey

    def usable(self, journey: Journey | None) -> bool:
        """Whether a published version may take entries (it validates as the service reads journeys now)."""
        return journey is not None and (journey.id, journey.version) not in self.invalid

    def _index(self) -> None:
        self.generation += 1
        live = tuple(
            r.live for r in self.records.values() if r.accepts_entries and r.live is not None and self.usable(r.live)
        )
        names = {name for j in live if isinstance(j.entry, EventEntry) for name in j.entry.event.names}
        by_event: dict[str, list[Journey]] = {name: [] for name in names}
        any_event: list[Journey] = []
        by_segment: dict[str, list[Journey]] = {}
        scheduled: dict[str, list[Journey]] = {}
        for journey in live:
            entry = journey.entry
            if isinstance(entry, EventEntry):
                named = entry.event.names
                if not named:
                    any_event.append(journey)
                # A journey entering on any name stays among every name's journeys, in live() order.
                for name in named or names:
                    by_event[name].append(journey)
            elif isinstance(entry, SegmentEntry):
                by_segment.setdefault(entry.segment, []).append(journey)
        for record in self.records.values():
            # Scheduled journeys are armed while published, paused or not (the slot checks at firing).
            if self.usable(record.live) and isinstance(record.live.entry, ScheduleEntry):  # type: ignore[union-attr]
                scheduled.setdefault(record.live.entry.segment, []).append(record.live)
        paused_by_event: dict[str, list[Journey]] = {}
        paused_any: list[Journey] = []
        paused_by_segment: dict[str, list[Journey]] = {}
        for record in self.records.values():
            journey = record.live
            if record.state is not State.PAUSED or journey is None or not self.usable(journey):
                continue
            if isinstance(journey.entry, EventEntry):
                if not journey.entry.event.names:
                    paused_any.append(journey)
                for name in journey.entry.event.names:
                    paused_by_event.setdefault(name, []).append(journey)
            elif isinstance(journey.entry, SegmentEntry):
                paused_by_segment.setdefault(journey.entry.segment, []).append(journey)
        self._paused_by_event = {name: tuple(js) for name, js in paused_by_event.items()}
        self._paused_any_event = tuple(paused_any)
        self._paused_by_segment = {segment: tuple(js) for segment, js in paused_by_segment.items()}
        self._live = live
        self._by_event = {name: tuple(js) for name, js in by_event.items()}
        # Each journey's place in `live()`, found once: per event name it made the index quadratic in the
        # live journeys (70 ms of a publish's 97 ms at 500).
        rank = {id(journey): position for position, journey in enumerate(live)}
        self._keyed = {name: _keyed(js, rank) for name, js in by_event.items()}
        self._any_event = tuple(any_event)
        self._by_segment = {segment: tuple(js) for segment, js in by_segment.items()}
        self._scheduled = {segment: tuple(js) for segment, js in scheduled.items()}

    def get(self, journey_id: str) -> JourneyRecord:
        record = self.records.get(journey_id)
        if record is None:
            raise NotFound(f"journey {journey_id} does not exist")
        return record

    def live(self) -> list[Journey]:
        """The live version of every journey taking entries now."""
        return list(self._live)

    def entering_on_event(self, name: str, properties: Mapping[str, Any] | None = None) -> tuple[Journey, ...]:
        """The live journeys an event called `name` may enter (its filter and condition still to check), in
        `live()` order; with the event's `properties`, only those whose required text values it has."""
        keyed = self._keyed.get(name)
        if keyed is None:
            return self._any_event
        if properties is None or not keyed.by_value:
            return self._by_event[name]
        hits: list[tuple[int, Journey]] = []
        for key, by_text in keyed.by_value.items():
            value = properties.get(key)
            if isinstance(value, str):
                hits += by_text.get(value, ())
        if not hits:
            return keyed.always
        hits += keyed.always_ranked
        hits.sort(key=lambda hit: hit[0])
        return tuple(journey for _, journey in hits)

    def entering_on_segment(self, segment: str) -> tuple[Journey, ...]:
        """The live journeys entering (or exiting) on `segment` (entered vs exited still to check)."""
        return self._by_segment.get(segment, ())

    def paused_on_event(self, name: str) -> tuple[Journey, ...]:
        """The paused journeys an event called `name` would enter were they active (filter still to check)."""
        named = self._paused_by_event.get(name, ())
        return named + self._paused_any_event if self._paused_any_event else named

    def paused_on_segment(self, segment: str) -> tuple[Journey, ...]:
        """The paused journeys entering (or exiting) on `segment`."""
        return self._paused_by_segment.get(segment, ())

    def scheduled_on(self, segment: str) -> tuple[Journey, ...]:
        """The live version of every scheduled journey over `segment`, whatever its record's state."""
        return self._scheduled.get(segment, ())

    def revision(self, journey_id: str) -> int:
        """The revision (stored version) of the record `get` gives: 1 when created, one more per change saved."""
        return self._stored_at.get(journey_id, 0)

    def version(self, journey_id: str, version: int) -> Journey | None:
        return self._versions.get((journey_id, version))

    def published(self) -> list[Journey]:
        """Every published version read since the start, whatever its journey's state (as stored when it no
        longer validates): any of them may have instances running."""
        return [*self._versions.values(), *self._unloadable.values()]

    async def save(self, record: JourneyRecord, *, basis: Stored | None = None) -> dict[str, Any]:
        """Store the record, a change decided on `basis` (the journey as read from the store), expecting the
        version `basis` was read at: VersionConflict when anyone has saved the journey since. Without
        `basis`, the change is taken to be decided on this object's own copy (`get`), and its version is
        expected. A call serving a request decides on a `read` of its own (`change`): this object's copy is
        shared by every call in flight."""
        if basis is not None:
            previous, expected = basis.doc, basis.version
        else:
            previous, expected = self.docs.get(record.id), self._stored_at.get(record.id, 0)
        doc = record_doc(record, previous, time.time())
        written = await self.store.bulk_write([Put(JOURNEYS, record.id, doc, expected_version=expected)])
        self._take(record.id, doc, written.versions[0])
        return doc

    async def add(self, record: JourneyRecord) -> dict[str, Any]:
        """Store a new journey; AlreadyExists when one with its id is stored (created first by anyone)."""
        try:
            return await self.save(record, basis=Stored(record, {}, 0))
        except VersionConflict:
            raise AlreadyExists(f"journey {record.id} exists; UpdateJourney changes its draft") from None

    async def change(self, journey_id: str, decide: Decide, *, redecide: Redecide, expected: int = 0) -> Changed:
        """Read the journey, `decide` its change (a record to save, or None for none) and save it against the
        version read. When someone saved the journey in between, the journey is read again and, when
        `redecide(read before, read now)` allows, the change decided again on it (up to ATTEMPTS
        decisions); otherwise JourneyChanged says what changed. NotFound when there is no such journey.

        `expected` (not 0): the revision the caller read; the change is made only on the journey at it
        (JourneyChanged when it is at another, or when someone saves it before this call does)."""
        read = await self._existing(journey_id)
        if expected and read.version != expected:
            raise JourneyChanged.since_revision(journey_id, expected, read)
        for _ in range(ATTEMPTS):
            decided = decide(read.record)
            if inspect.isawaitable(decided):
                decided = await decided
            if decided is None:
                return Changed(read, None)
            try:
                await self.save(decided, basis=read)
            except VersionConflict:
                now = await self._existing(journey_id)
                if expected:
                    what = what_changed(read.record, now.record)
                    raise JourneyChanged.since_revision(journey_id, expected, now, what) from None
                if not redecide(read.record, now.record):
                    what = what_changed(read.record, now.record)
                    raise JourneyChanged(journey_id, what, draft=now.record.draft is not None) from None
                log.info("journey %s: saved by another call meanwhile; deciding again on what is stored", journey_id)
                read = now
                continue
            return Changed(read, decided)
        raise Conflict(
            f"journey {journey_id} kept changing while this call saved it (saved by others {ATTEMPTS} times "
            "between this call's read and its save): try again, or find what keeps changing it",
            reason="journey_changed",
        )

    async def _existing(self, journey_id: str) -> Stored:
        read = await self.read(journey_id)
        if read is None:
            raise NotFound(f"journey {journey_id} does not exist")
        return read


def _as_stored(key: tuple[str, int], document: Any) -> Journey:
    """A version that no longer validates, as stored: enough to show it and to store it again unchanged."""
    document = document if isinstance(document, Mapping) else {}
    name, priority = document.get("name"), document.get("priority")
    return Journey(
        id=key[0],
        version=key[1],
        name=name if isinstance(name, str) else "",
        priority=priority if isinstance(priority, int) else 0,
        category="",
        timezone="UTC",
        entry=None,  # type: ignore[arg-type]  # never indexed: `usable` keeps it out
        reentry="",
        cooldown=None,
        max_concurrent=0,
        exits=(),
        goal=None,
        start="",
        nodes={},
        document=document,
    )


@dataclass(frozen=True, slots=True)
class _Keyed:
    """One event name's journeys: by (property key, required text), and the rest (`always`); each with its
    position in `live()`, to give them back in that order."""

    by_value: dict[str, dict[str, tuple[tuple[int, Journey], ...]]]
    always: tuple[Journey, ...]
    always_ranked: tuple[tuple[int, Journey], ...]


def _keyed(journeys: list[Journey], rank: Mapping[int, int]) -> _Keyed:
    """`rank`: each live journey's position in `live()`, by `id`."""
    by_value: dict[str, dict[str, list[tuple[int, Journey]]]] = {}
    always: list[tuple[int, Journey]] = []
    for journey in journeys:
        required = _required_text(journey)
        ranked = (rank[id(journey)], journey)
        if required is None:
            always.append(ranked)
        else:
            key, text = required
            by_value.setdefault(key, {}).setdefault(text, []).append(ranked)
    return _Keyed(
        {key: {text: tuple(hits) for text, hits in texts.items()} for key, texts in by_value.items()},
        tuple(journey for _, journey in always),
        tuple(always),
    )


def _required_text(journey: Journey) -> tuple[str, str] | None:
    """(key, text) when the journey's entry filter requires `properties.<key> = "<text>"`, else None."""
    entry = journey.entry
    if not isinstance(entry, EventEntry):
        return None
    for condition in entry.event.field_conditions:
        if (
            condition.op == "="
            and len(condition.path) == 2
            and condition.path[0] == "properties"
            and isinstance(condition.value, str)
        ):
            return condition.path[1], condition.value
    return None
