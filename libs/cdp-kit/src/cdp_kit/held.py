"""Profile fields a service holds per person, derived from `profiles.changed`, and made durable by
snapshots rather than by a write per change (scoring and segmentation).

    held = HeldFields(store, collection="scoring_fields", checkpoints="scoring_checkpoints",
                      owns=lambda person: partition(person) in owned, codec=FIELDS_CODEC,
                      fetch=profile.fields)
    await held.load()                                   # the last snapshot and the positions it includes
    await held.replay(held.since(js, subjects.PROFILES, durables), apply)  # to where the consumers got
    ...
    fields = held.persons.setdefault(person, {}); apply_updates(fields, updates); held.mark(person)
    held.applied[subject] = seq                         # the stream position the held state includes
    ...
    await held.snapshot()                               # every few seconds, and on stop

What a person holds is the service's own type (`codec` turns it into a stored document and back);
this module owns the algorithm around it:

- **Dirty and gone.** `mark` a person whose state changed, `remove` one deleted or merged away. A
  snapshot writes the marked persons and deletes the removed ones, in small chunks (the event loop and
  the latency of the stream path never wait long), then the stream positions (`applied`) they include,
  then any `marks` the service keeps beside the positions (keys starting with "$"). Positions go last: a
  crash mid-way leaves persons newer than the positions, and the replay from there applies the same
  changes again in stream order (the services make that end in the same state).
- **A consistent cut.** The persons are copied (`codec.copy`) at one instant with no `mutating` block
  in flight, and while `behind()` says results of applied changes are not yet published, no snapshot
  is taken at all: the snapshot never holds state whose consequences the bus has not got.
- **Erasure.** After a snapshot that deleted persons, `store.erase()`: a deleted person's fields leave
  no bytes in the store's files.
- **A failed snapshot** loses nothing: its persons are marked again (those still held), its removals
  kept, and the next snapshot writes them; a restart meanwhile replays from the older positions.
- **Forget.** `forget(which)` drops persons (a partition handed over or rebuilt) as if never held:
  the next snapshot neither writes nor deletes them; whoever holds them next loads them back.
- **Fetch on a miss.** A person first seen on the stream (or asked for by an RPC) is read from the
  profile service with `fetch` when one is configured.

It knows nothing of the consumer loop: positions are whatever the caller records in `applied`, and the
replay takes any iterator of (subject, stream position, payload).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from nats.js.client import JetStreamContext

from cdp_kit.bus.consumer import delivered_since
from cdp_kit.storage import Delete, Put, Store

P = TypeVar("P")
C = TypeVar("C")

ProfileSource = Callable[[str], Awaitable[dict[str, Any] | None]]
ReplayApply = Callable[[str, int, bytes], Awaitable[int]]


@dataclass(frozen=True, slots=True)
class Codec(Generic[P, C]):
    """How a service's per-person state is copied for a snapshot, stored, and read back.

    `copy` runs for every dirty person at one instant (keep it cheap: a shallow copy); `encode` turns
    a copy into the stored document later, a chunk at a time; `decode` reads a stored document."""

    copy: Callable[[P], C]
    encode: Callable[[C], dict[str, Any]]
    decode: Callable[[Mapping[str, Any]], P]


class _Absent:
    __slots__ = ()


_ABSENT = _Absent()


def apply_updates(fields: dict[str, Any], updates: Mapping[str, Any]) -> dict[str, Any]:
    """Apply flat field updates (None: the field is gone) to a person's fields in place; returns the
    paths that changed, each with the value it had before (None: absent)."""
    changed: dict[str, Any] = {}
    for path, value in updates.items():
        if value is None:
            old = fields.pop(path, None)
            if old is not None:
                changed[path] = old
        else:
            old = fields.get(path, _ABSENT)
            if old != value:
                fields[path] = value
                changed[path] = None if old is _ABSENT else old
    return changed


class HeldFields(Generic[P]):
    def __init__(
        self,
        store: Store,
        *,
        collection: str,
        checkpoints: str,
        owns: Callable[[str], bool],
        codec: Codec[P, Any],
        fetch: ProfileSource | None = None,
        versioned: bool = False,
        behind: Callable[[], bool] | None = None,
        marks: Callable[[], Mapping[str, dict[str, Any]]] | None = None,
        clock: Callable[[], float],
        chunk: int = 500,
    ) -> None:
        self.store = store
        self.collection = collection
        self.checkpoints = checkpoints
        self.owns = owns
        self.codec = codec
        self.fetch_source = fetch
        # Written with the store's optimistic versions (a second writer of the same collection is caught).
        self.versioned = versioned
        self.behind = behind
        self._marks = marks
        self.clock = clock
        self.chunk = chunk
        self.persons: dict[str, P] = {}
        self.versions: dict[str, int] = {}
        # partition subject -> the last stream position the held state includes / the snapshot includes
        self.applied: dict[str, int] = {}
        self.snapshotted: dict[str, int] = {}
        # "$"-keyed records of the checkpoints collection, as loaded (the service's own marks).
        self.loaded_marks: dict[str, dict[str, Any]] = {}
        # Set when the service's marks changed: a snapshot is due even with no person dirty.
        self.marks_dirty = False
        self._dirty: set[str] = set()
        self._gone: set[str] = set()
        self._lock = asyncio.Lock()
        # Work that changes state and then publishes what it found runs inside `mutating`; a snapshot
        # copies the state only when none is in flight.
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._thawed = asyncio.Event()
        self._thawed.set()

    # --- state ------------------------------------------------------------------------------------

    def mark(self, person_id: str) -> None:
        """The person's state changed: written by the next snapshot. A person removed and seen again
        before it stays among the removed too: its old record is overwritten rather than deleted, and the
        store is still erased after the snapshot, so nothing of the removed person stays in its files."""
        self._dirty.add(person_id)

    def remove(self, person_id: str) -> P | None:
        """The person is gone (deleted, or merged into another): forgotten, and deleted from the store
        (then erased) by the next snapshot. Returns what was held, if anything."""
        held = self.persons.pop(person_id, None)
        if held is not None:
            self._dirty.discard(person_id)
            self._gone.add(person_id)
        return held

    def forget(self, which: Callable[[str], bool]) -> int:
        """Drop what is held of the persons `which` selects, without touching the store: their partition
        went to another replica, or is being rebuilt from the snapshot and the stream after it. Unlike
        `remove`, the next snapshot neither writes nor deletes them. Returns how many were held."""
        dropped = [person for person in self.persons if which(person)]
        for person in dropped:
            del self.persons[person]
        for person in [p for p in self.versions if which(p)]:
            del self.versions[person]
        self._dirty = {p for p in self._dirty if not which(p)}
        self._gone = {p for p in self._gone if not which(p)}
        return len(dropped)

    async def fetch(self, person_id: str) -> dict[str, Any] | None:
        """A person's flat fields from the profile service (None: unknown there, or no profile service)."""
        if self.fetch_source is None:
            return None
        return await self.fetch_source(person_id)

    @contextlib.asynccontextmanager
    async def mutating(self) -> AsyncIterator[None]:
        """Around work that changes the held state and then publishes what it found: a snapshot never
        copies the state half-way through one."""
        while not self._thawed.is_set():  # a snapshot is copying the state
            await self._thawed.wait()
        self._inflight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    # --- start: the snapshot, then the stream from its positions -----------------------------------

    async def load(self, *, page_size: int = 2000) -> None:
        """The stream positions (and marks) of the last snapshot, then the persons this replica owns."""
        async for record in self.store.scan_all(self.checkpoints):
            if record.key.startswith("$"):
                self.loaded_marks[record.key] = record.doc
                continue
            self.applied[record.key] = self.snapshotted[record.key] = record.doc.get("stream_seq", 0)
        async for record in self.store.scan_all(self.collection, page_size=page_size):
            if self.owns(record.key):
                self.persons[record.key] = self.codec.decode(record.doc)
                self.versions[record.key] = record.version

    def since(
        self, js: JetStreamContext, stream: str, durables: Mapping[str, str]
    ) -> AsyncIterator[tuple[str, int, bytes]]:
        """What each subject's durable consumer (subject -> durable) was given after the snapshot."""
        return delivered_since(js, stream, durables, self.applied)

    async def replay(self, messages: AsyncIterator[tuple[str, int, bytes]], apply: ReplayApply) -> int:
        """Apply (subject, stream position, payload) in stream order with `apply` (it returns the changes
        it applied), skipping what the held state includes; advances `applied`. Returns the changes."""
        applied = 0
        async for subject, seq, data in messages:
            if seq <= self.applied.get(subject, 0):
                continue
            applied += await apply(subject, seq, data)
            self.applied[subject] = seq
        return applied

    # --- snapshots --------------------------------------------------------------------------------

    async def snapshot(self, *, copied: Callable[[], None] | None = None) -> int:
        """Write the persons changed since the last snapshot, then the stream positions they include,
        then the service's marks. Returns the records written (0: nothing to do, or not now).

        `copied` is called once the state has been copied (or found to need no snapshot): a caller
        holding its changes back for a consistent cut may let them go on while the copies are written."""
        async with self._lock:
            self._thawed.clear()
            try:
                while self._inflight:
                    await self._idle.wait()
                if self.behind is not None and self.behind():
                    return 0  # the state is ahead of what the bus has: not until that is published
                dirty, gone = self._dirty, self._gone
                positions = {s: q for s, q in self.applied.items() if q != self.snapshotted.get(s)}
                if not dirty and not gone and not positions and not self.marks_dirty:
                    return 0
                self._dirty, self._gone, marks_dirty = set(), set(), self.marks_dirty
                self.marks_dirty = False
                copy = self.codec.copy
                copies = [(p, copy(held)) for p in dirty if (held := self.persons.get(p)) is not None]
                at = self.clock()
                marks = dict(self._marks()) if self._marks is not None else {}
            finally:
                self._thawed.set()
                if copied is not None:
                    copied()
            records: list[Put | Delete] = [
                *(Put(self.checkpoints, s, {"stream_seq": q, "at": at}) for s, q in positions.items()),
                *(Put(self.checkpoints, key, doc) for key, doc in marks.items()),
            ]
            written = 0
            try:
                ops: list[Put | Delete] = [Delete(self.collection, p) for p in gone - dirty]
                encode = self.codec.encode
                for person_id, copied in copies:
                    expected = self.versions.get(person_id, 0) if self.versioned else None
                    ops.append(Put(self.collection, person_id, encode(copied), expected_version=expected))
                    if len(ops) >= self.chunk:
                        written += await self._write(ops)
                        ops = []
                        await asyncio.sleep(0)
                written += await self._write(ops)
                if records:
                    await self.store.bulk_write(records)
            except BaseException:
                # Written again next time (a person changed meanwhile is in the new dirty set anyway).
                self._dirty |= {p for p in dirty if p in self.persons}
                self._gone |= gone - self._dirty
                self.marks_dirty = self.marks_dirty or marks_dirty
                raise
            self.snapshotted.update(positions)
            if gone:  # removed (deleted or merged) persons leave no bytes in the store's files
                await self.store.erase()
            return written + len(records)

    async def _write(self, ops: list[Put | Delete]) -> int:
        if not ops:
            return 0
        await self.store.bulk_write(ops)
        for op in ops:
            if isinstance(op, Put):
                if op.expected_version is not None:
                    self.versions[op.key] = op.expected_version + 1
            else:
                self.versions.pop(op.key, None)
        return len(ops)
