"""The hot state: every profile of the owned partitions in memory, and what became of the others.

A person is in exactly one of: `profiles` (alive), `tombstones` (merged away: events for it are applied
to the person it was merged into), `deleted` (a bare marker: events received before the deletion are
dropped), or none of them (never seen). `versions` holds the store version the next write of each
person's record expects; a write that finds another version fails, and the engine then drops all of
this and reloads it from the store (`reset` + `warm`).

`whole` holds the partitions every stored record of which is in memory (loaded at start, by `warm`, or
when the partition arrived): a person of one of them that none of the four holds has no record, so
`load` takes it as never seen without asking the store (most events of a busy platform come from
persons seen for the first time, and that read was a round trip per batch). A record another replica
wrote meanwhile (a shared store, a merge combined by the survivor's owner) is then found by the write
expecting no record: it fails, the engine drops the cache and reloads it from the store, as it does
for every record another replica changed under it. `reset` empties `whole`; a partition that leaves is
taken out of it before its persons are forgotten.

`views` holds what readers derived from a profile (the API's `GetProfile` answer, built once per change
rather than per read). Every change to a profile is written, and every write of a person's record goes
through `versioned_put` (or, for a model score, `scores_put`: the person's scores record, see
`records.py`), which drops that person's view; `reset` drops them all. So a view is never
older than the last write of its profile, and a deleted or merged-away person's view is gone with it.
The same funnel tells the engine which persons have a write not yet durable (`on_write`, see
`ProfileEngine.profile`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from cdp_kit.storage import Put, Store
from cdp_profile.domain import Profile, Retention, TimelineEntry
from cdp_profile.expiry import ExpirySchedule
from cdp_profile.records import (
    PROFILES,
    SCORES,
    TIMELINE,
    decode_profile,
    encode_scores,
    head_entries,
    overlay_scores,
    row_entries,
    timeline_prefix,
)
from cdp_profile.timeline import StoredTimeline

# origin -> its timeline rows as read: (row key, the row's entries), see timeline.py
Rows = dict[str, list[tuple[str, list[TimelineEntry]]]]

_RELEASE_SLICE = 200  # profiles freed per turn of the event loop (`_release_later`)


def _release_later(objects: list) -> None:
    """Drop the last references to `objects` a slice per turn of the running event loop (at once when
    there is none): whatever else the loop has to do runs between the slices."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return

    def release() -> None:
        del objects[-_RELEASE_SLICE:]
        if objects:
            loop.call_soon(release)

    if objects:
        loop.call_soon(release)


class HotProfiles:
    def __init__(
        self,
        store: Store,
        *,
        retention: Retention,
        owns: Callable[[str], bool],
        on_write: Callable[[str], None] | None = None,
        partition_of: Callable[[str], int] | None = None,
    ) -> None:
        self.store = store
        self._on_write = on_write
        self.retention = retention
        self._owns = owns
        self._partition_of = partition_of
        self.whole: set[int] = set()  # partitions held whole: see the module docstring (needs partition_of)
        self.profiles: dict[str, Profile] = {}
        self.tombstones: dict[str, str] = {}  # merged-away person -> the person it was merged into
        self.deleted: dict[str, float] = {}  # deleted person -> when (events received before are dropped)
        self.versions: dict[str, int] = {}
        self.expiries = ExpirySchedule()
        self.views: dict[str, Any] = {}  # person -> what a reader derived from its profile (see above)

    async def warm(self) -> None:
        """Load every owned profile: they are the hot state, and windowed traits expire on their own."""
        timelines: Rows = {}
        async for record in self.store.scan_all(TIMELINE, page_size=2000):
            entries = row_entries(record.doc)
            if entries:
                timelines.setdefault(entries[0].origin, []).append((record.key, entries))
        scores = {record.key: record.doc async for record in self.store.scan_all(SCORES, page_size=2000)}
        async for record in self.store.scan_all(PROFILES, page_size=1000):
            if self._owns(record.key):
                self._adopt(record.key, record.doc, record.version, timelines, scores.get(record.key))

    def reset(self) -> None:
        """Forget everything (after a failed write the store is the truth)."""
        self.profiles.clear()
        self.tombstones.clear()
        self.deleted.clear()
        self.versions.clear()
        self.expiries.clear()
        self.views.clear()
        self.whole.clear()

    def forget(self, whose: Callable[[str], bool]) -> None:
        """Forget the persons `whose` selects (a partition that moved): the next use reads the store.

        It runs on the event loop with nothing awaited (see `ProfileEngine.stop_partition`), over every
        person held: `whose` is asked once per person, not once per collection holding it."""
        held = (self.profiles, self.tombstones, self.deleted, self.versions, self.views)
        # Every person held has a version (loaded or written), so one pass over `versions` finds them;
        # the others are walked only for the rare person held without one.
        versions = self.versions
        gone = [person for person in versions if whose(person)]
        for collection in held[:3] + held[4:]:
            gone.extend(p for p in collection if p not in versions and whose(p))
        profiles = self.profiles
        # Freed a slice at a time once this returns: a profile is hundreds of objects, and freeing a
        # partition's profiles at once held the loop for as long.
        _release_later([profiles.pop(person) for person in gone if person in profiles])
        for collection in held[1:]:
            pop = collection.pop
            for person in gone:
                pop(person, None)

    def _adopt(
        self,
        person: str,
        doc: dict,
        version: int,
        timelines: Rows,
        scores: dict | None = None,
    ) -> None:
        self.versions[person] = version
        if "merged_into" in doc:
            self.tombstones[person] = doc["merged_into"]
        elif "deleted_at" in doc:
            self.deleted[person] = doc["deleted_at"]
        else:
            origins = [person, *doc.get("merged_from", [])]
            rows = [row for origin in origins for row in timelines.get(origin, ())]
            head = head_entries(doc)
            profile = decode_profile(doc, [e for _, entries in rows for e in entries], self.retention, head)
            # What the store holds where (timeline.py), each row and head entry with the part holding it.
            parts, root = profile.parts, profile.parts[profile.person_id]
            for part in parts.values():
                part.stored = StoredTimeline()
            for key, entries in rows:
                parts.get(entries[0].origin, root).stored.adopt_row(key, entries)
            for entry in head:
                parts.get(entry.origin, root).stored.adopt_head((entry,))
            if scores is not None:
                overlay_scores(profile, scores)
            self.profiles[person] = profile
            self.expiries.schedule(profile)

    async def load(self, persons: Iterable[str]) -> None:
        """Bring persons (and whatever their tombstones point at) into memory from the store."""
        wanted = {p for p in persons if self._unknown(p)}
        while wanted:
            if self.whole:
                # Of a partition held whole: no record (see the module docstring).
                partition_of, whole = self._partition_of, self.whole
                absent = [p for p in wanted if partition_of(p) in whole]  # type: ignore[misc]
                for person in absent:
                    self.versions[person] = 0
                wanted.difference_update(absent)
                if not wanted:
                    break
            records = await self.store.get_many(PROFILES, sorted(wanted))
            follow: set[str] = set()
            timelines: Rows = {}
            alive = sorted(person for person, record in records.items() if "profile" in record.doc)
            scores = await self.store.get_many(SCORES, alive) if alive else {}
            for person, record in records.items():
                if "profile" in record.doc:
                    for origin in [person, *record.doc.get("merged_from", [])]:
                        async for row in self.store.scan_all(TIMELINE, prefix=timeline_prefix(origin)):
                            if entries := row_entries(row.doc):
                                timelines.setdefault(origin, []).append((row.key, entries))
                stored = scores.get(person)
                self._adopt(person, record.doc, record.version, timelines, stored.doc if stored else None)
                if person in self.tombstones:
                    follow.add(self.tombstones[person])
            for person in wanted - records.keys():
                self.versions.setdefault(person, 0)
            wanted = {p for p in follow if self._unknown(p)}

    def _unknown(self, person: str) -> bool:
        return (
            person not in self.profiles
            and person not in self.tombstones
            and person not in self.deleted
            and person not in self.versions
        )

    def root(self, person: str) -> str:
        """The person whose profile holds this one's data now (itself unless merged away)."""
        seen = 0
        while person in self.tombstones and seen < 64:
            person = self.tombstones[person]
            seen += 1
        return person

    def stored_of(self, entry: TimelineEntry) -> StoredTimeline | None:
        """Where the store holds the timeline of the part `entry` belongs to (None: no profile here holds
        that part). Made empty for a part that has stored nothing yet."""
        origin = entry.origin
        profile = self.profiles.get(origin)  # the part's own person, unless it was merged away
        if profile is None:
            profile = self.profiles.get(self.root(origin))
        part = profile.parts.get(origin) if profile is not None else None
        if part is None:
            return None
        if part.stored is None:
            part.stored = StoredTimeline()
        return part.stored

    def versioned_put(self, person: str, doc: dict) -> Put:
        """The write of a person's record, expecting the version this replica last wrote or read."""
        expected = self.versions.get(person, 0)
        self.versions[person] = expected + 1
        self.views.pop(person, None)
        if self._on_write is not None:
            self._on_write(person)
        return Put(PROFILES, person, doc, expected_version=expected)

    def scores_put(self, person: str) -> Put:
        """The write of a live person's scores record (`records.py`): a model score changed, nothing else.
        Ordered by the write chain like every write, so it needs no version of its own; the profile
        record and its version stay as they are."""
        self.views.pop(person, None)
        if self._on_write is not None:
            self._on_write(person)
        return Put(SCORES, person, encode_scores(self.profiles[person]))
