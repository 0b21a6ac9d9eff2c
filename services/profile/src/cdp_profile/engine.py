"""The profile engine: hot profiles in memory, written behind to the store, changes on the bus.

Paths that change a profile (the partitioned streams `events.resolved.<p>`, `scores.updated.<p>` and
identity's merges and unmerges `identity.*.<p>`, API writes, computed-trait expiry and backfill, deletion) all end the
same way:
1. the domain applies the change in memory and reports a compact `ProfileChange` (`apply.py` for the
   consumed streams; `backfill.py`, `expiry.py` and `privacy.py` for the rest);
2. the change's writes (the touched profiles, each a versioned put holding its newest timeline entries,
   and the timeline pages written or deleted: `timeline.py`) are queued on the engine's one `WriteChain`, so every write lands in the order the changes
   were made in memory, whichever path made them (merges and API writes touch persons of any partition);
3. once the write is durable, the changes are published on `profiles.changed.<p>`.
The partitioned streams run on the kit's `PartitionedEngine` (`stream.py`): it adds the partition's
checkpoint and an outbox record of the change messages to each batch's write, publishes, acknowledges,
and pipelines (batch n+1 applied while n is written). A write that fails drops the whole cache (`recover`):
the writes queued after it fail too, the unacknowledged batches are redelivered onto the store's state,
so nothing is counted twice.

Reads answer from durable state only. A change is in memory before its write lands (a batch is applied
while the one before it is being written; an API write waits for its own), and a crash in between loses
it until the stream brings it again, if ever (a deletion or a merge may come first). So every write of a
person's record notes the number of the chain's submission that carries it (`HotProfiles.versioned_put`
-> `_noted`; nothing awaits between that and the submit), and `profile()` waits, at most
`DURABLE_READ_WAIT` seconds, until the writes noted for the person asked and the person holding its data
have landed (milliseconds: the next group commit); if one fails, the read is UNAVAILABLE (retry: the
cache is being rebuilt from the store). A person with nothing in flight costs a lookup and a comparison.

This module holds the hot state and the out-of-stream paths; what a message does to a profile is not
here. Merged-away persons keep a tombstone (`merged_into`) so late events are applied to the survivor;
deleted persons keep a marker without personal data, so events already in flight at deletion time do
not bring them back (see `state.py`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Coroutine, Iterable, Mapping, Sequence
from typing import Any

import orjson

from cdp_kit.auth import Caller
from cdp_kit.bus import Delivery, OutMessage, Partitioner
from cdp_kit.engine import WriteChain
from cdp_kit.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from cdp_kit.identifier_hash import IdentifierHashKeys
from cdp_kit.storage import Delete, Put, Store, WriteOp
from cdp_kit.storage.model import MAX_DOCUMENT_BYTES
from cdp_kit.telemetry import LATENCY_BUCKETS_MS, Telemetry
from cdp_profile.apply import Applied, apply_identity
from cdp_profile.backfill import Backfill as Backfill  # also imported from here by code that predates backfill.py
from cdp_profile.backfill import ComputedTraitCatalogue
from cdp_profile.changes import change_messages
from cdp_profile.domain import ComputedTrait, ComputedTraits, Profile, ProfileChange, Retention, TimelineEntry
from cdp_profile.domain.profile import COMPUTED_MAX_BYTES, HISTORY_MAX_BYTES
from cdp_profile.expiry import expire, expiry_loop
from cdp_profile.privacy import Privacy
from cdp_profile.records import (
    CHECKPOINTS,
    DELETIONS,
    checkpoint_leftovers,
    encode_profile,
)

# The store's vocabulary lives in records.py; these stay importable from here for the tests and tools
# written before it (the kill test reads the store with them).
from cdp_profile.records import DEFINITIONS as DEFINITIONS
from cdp_profile.records import PROFILES as PROFILES
from cdp_profile.records import decode_entry as decode_entry
from cdp_profile.records import decode_profile as decode_profile
from cdp_profile.state import HotProfiles
from cdp_profile.timeline import head_of, timeline_writes

log = logging.getLogger("cdp.profile.engine")

# A person's record trimmed to its bound is logged at most once in this many seconds (`_record_trimmed`),
# remembered for at most this many persons at once.
TRIM_LOG_SECONDS = 600.0
TRIM_LOG_PERSONS = 10_000

#: The most one UpdateTraits may set (its traits as JSON): a CRM's longest text fields (Salesforce's long
#: text area, 131,072 characters) fit many times over. A write the store then refused (a profile document
#: past 8 MiB: a 9 MiB trait) was answered UNAVAILABLE "retry", and every attempt dropped the whole cache and
#: reloaded every profile the replica holds from the store, the partitions' events waiting meanwhile.
UPDATE_TRAITS_MAX_BYTES = 1024 * 1024

# How long a read waits for a person's pending writes to land before it answers UNAVAILABLE.
DURABLE_READ_WAIT = 5.0


class ProfileEngine:
    def __init__(
        self,
        store: Store,
        publisher,
        *,
        partitions: int,
        owned: Iterable[int],
        retention: Retention,
        telemetry: Telemetry,
        max_computed_traits: int = 500,
        clock: Callable[[], float] = time.time,
        identifier_hash_keys: IdentifierHashKeys | None = None,
        timeline_pages: bool = True,
    ) -> None:
        self.store = store
        # False: each timeline entry added is written as a row of its own, as releases before pages did
        # (CDP_PROFILE_TIMELINE_PAGES, for a rolling upgrade from one; timeline.py).
        self.timeline_pages = timeline_pages
        self.publisher = publisher
        self.partitions = partitions
        self.owned = frozenset(owned)
        self.retention = retention
        self.clock = clock
        self._partition = Partitioner(partitions)
        # Every write of the service, stream batches and the rest, lands in the order it was made.
        self.chain = WriteChain(store)
        # Person -> the chain submission carrying its latest write (see the module docstring), and the
        # same by submission, oldest first, to drop what has landed.
        self._unlanded: dict[str, int] = {}
        self._notes: deque[tuple[int, list[str]]] = deque()
        self.hot = HotProfiles(
            store, retention=retention, owns=self.owns, on_write=self._noted, partition_of=self._partition
        )
        self.catalogue = ComputedTraitCatalogue(self, max_held=max_computed_traits)
        self.privacy = Privacy(self, identifier_hash_keys)
        # The partitioned engines running on this hot state (`stream.py`): a deletion waits for them.
        self.streams: list = []
        # Bumped when a recovery starts: a batch applied across a recovery is refused (`fresh`).
        self.epoch = 0
        self._steady = asyncio.Event()  # cleared while the hot state is being rebuilt
        self._steady.set()
        self._recovering = asyncio.Lock()
        self._applied_epoch: dict[Any, int] = {}
        self._tasks: list[asyncio.Task] = []
        meter = telemetry.meter
        self._m_events = meter.create_counter(
            "cdp.profile.events", unit="{event}", description="events applied, by outcome"
        )
        self._m_changes = meter.create_counter(
            "cdp.profile.changes", unit="{change}", description="profile changes published, by cause"
        )
        self._m_commit = meter.create_histogram(
            "cdp.profile.commit.duration",
            unit="ms",
            description="time to write the changes made outside the partitioned streams",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        self._trim_logged: dict[str, float] = {}  # person -> when its trim was last logged
        self._m_trimmed = meter.create_counter(
            "cdp.profile.record.trimmed",
            unit="{record}",
            description="profile writes that coarsened computed states or trimmed histories to keep the record "
            "within the store's limit, by part",
        )
        self._m_freshness = meter.create_histogram(
            "cdp.profile.freshness",
            unit="ms",
            description="collector acceptance to the profile change being visible, per batch (its newest event)",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )

    # The hot state and the definitions, as the API and the tests read them.

    @property
    def profiles(self) -> dict[str, Profile]:
        return self.hot.profiles

    @property
    def backfills(self) -> dict[str, Backfill]:
        return self.catalogue.backfills

    @property
    def defs(self) -> ComputedTraits:
        return self.catalogue.defs

    @property
    def max_computed_traits(self) -> int:
        return self.catalogue.max_held

    def owns(self, person: str) -> bool:
        return self._partition(person) in self.owned

    def partition_of(self, person: str) -> int:
        return self._partition(person)

    # --- life cycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Definitions and the owned profiles from the store; leftovers published. The partitioned
        streams start after this (`stream.py`)."""
        await self._publish_legacy_leftovers()
        await self.store.ensure_index(DELETIONS, "pending")
        await self.catalogue.load(self.store)
        if self.owned:  # with leases nothing is owned yet: each partition is loaded as it is acquired
            await self._warm()
        # The warmed profiles live as long as the process: keep the collector from rescanning them.
        gc.freeze()
        try:
            await self.privacy.complete()  # deletions a stop or a JetStream outage left unfinished
        except Unavailable:
            self.privacy.retry_later()
        self.spawn(expiry_loop(self.expire_due), "profile expiry")
        self.catalogue.resume()

    async def _warm(self) -> None:
        """Load every owned profile; the partitions owned throughout are then held whole (`state.py`)."""
        owned = self.owned
        await self.hot.warm()
        self.hot.whole = set(owned & self.owned)

    async def _publish_legacy_leftovers(self) -> None:
        """Before the partitioned engine, a checkpoint kept its batch's change messages until they were
        published (`changes`); the engine keeps them in its outbox. A store written by an older release
        may still hold some: publish them (JetStream drops repeats by id) and write the checkpoint
        without them, keeping its position, so an upgrade neither loses nor replays anything."""
        async for record in self.store.scan_all(CHECKPOINTS):
            leftovers = checkpoint_leftovers(record.doc)
            if "changes" not in record.doc:
                continue
            if leftovers:
                await self.publish(leftovers)
            doc = {k: v for k, v in record.doc.items() if k != "changes"}
            await self.store.put(CHECKPOINTS, record.key, doc)

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Background work that lives until `stop`."""
        self._tasks.append(asyncio.create_task(work, name=name))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.chain.settle()

    # --- partitions moving between replicas (an ownership's hooks, __main__) -----------------------

    async def start_partition(self, partition: int) -> None:
        """This replica now holds `partition` (an ownership's `on_acquire`). What the cache holds of its
        persons may be stale (another replica wrote them since), so it is dropped and the partition's
        profiles are loaded from the store, as `start` loads the owned ones (windowed traits then expire
        here without waiting for an event); then every partitioned input starts on it."""
        if partition not in self.owned:
            self.hot.forget(lambda person: self._partition(person) == partition)
            self.owned = self.owned | {partition}
            delay = 0.1
            while True:
                try:
                    epoch = self.epoch
                    persons = [
                        record.key
                        async for record in self.store.scan_all(PROFILES, page_size=1000)
                        if self._partition(record.key) == partition
                    ]
                    await self.hot.load(persons)
                    # Every record of it is held now, unless it left meanwhile or a recovery dropped part
                    # of what was loaded (that recovery's reload covers it; reads go to the store till then).
                    if partition in self.owned and self.epoch == epoch:
                        self.hot.whole.add(partition)
                    break
                except Exception as exc:  # the store is unreachable: the lease is held, so keep trying
                    log.warning("profiles of partition %s not loaded (%s); retrying", partition, type(exc).__name__)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
        for stream in self.streams:
            await stream.start_partition(partition)

    async def stop_partition(self, partition: int) -> None:
        """`partition` goes to another replica (an ownership's `on_release`): its inputs drain (what
        they applied is written, published and acknowledged), the writes queued by other paths land,
        and the partition's persons leave the cache, so this replica neither writes them nor answers
        from a copy the new owner no longer updates. Returning lets the new owner start.

        Cancelled (the ownership cuts a release its lease no longer covers: `cdp_kit.ownership.leased`),
        the inputs abort and the partition is given up all the same, without waiting for the writes in
        flight: this replica stops owning the persons and forgets them."""
        try:
            await asyncio.gather(*(stream.stop_partition(partition) for stream in self.streams))
            self.owned = self.owned - {partition}
            await self.chain.settle()
        finally:
            # Nothing awaits from here on: no write for these persons can be queued before they are gone.
            self.owned = self.owned - {partition}
            self.hot.whole.discard(partition)
            self.hot.forget(lambda person: self._partition(person) == partition)

    # --- the hot state as the partitioned streams use it (stream.py) -------------------------------

    async def steady(self, key: Any) -> int:
        """Wait until no recovery is rebuilding the hot state; the epoch a batch of `key` applies in."""
        await self._steady.wait()
        self._applied_epoch[key] = self.epoch
        return self.epoch

    def fresh(self, epoch: int) -> None:
        """Raise if a recovery started since `epoch`: what was applied may sit on dropped state."""
        if epoch != self.epoch:
            raise Unavailable("the profile cache was rebuilt while the batch was applied; it will be retried")

    async def recover_stream(self, key: Any) -> None:
        """A batch of `key` failed: rebuild the hot state, unless a recovery has done so since it was
        applied (its writes had settled by then)."""
        if self._applied_epoch.get(key, self.epoch) < self.epoch:
            return
        await self.recover()

    async def recover(self) -> None:
        """A write failed: wait for every write queued so far, drop the cache and reload it from the
        store, start a fresh write chain. Concurrent callers share one recovery."""
        epoch = self.epoch
        async with self._recovering:
            if self.epoch != epoch:
                return  # another caller rebuilt it meanwhile
            self.epoch += 1
            self._steady.clear()
            try:
                await self.chain.settle()
                self.hot.reset()
                self._forget_notes()
                log.warning("profile cache dropped after a failed write; reloading from the store")
                await self._warm()
                self.chain.reset()
            finally:
                self._steady.set()

    # --- identity.merged / identity.unmerged as published before partitioning (legacy, __main__) ---

    async def handle_identity(self, batch: Sequence[Delivery]) -> None:
        """Consumer handler for the unpartitioned `identity.merged` / `identity.unmerged` an older
        identity published (each replica's durable; applied by the survivor's owner only). Merges now
        arrive on `identity.*.<p>`, applied by the partition's owner (`stream.MergesLogic`)."""
        await self._steady.wait()
        step = await apply_identity(self.hot, batch, self.defs, owns=self.owns, now=self.clock())
        if not step.changes:
            await self.commit({}, ops=step.ops)
            return
        now = self.clock()
        await self.commit(step.changes, ops=step.ops)
        await self.publish(self.messages_by_cause(step, default="merge", now=now))

    def messages_by_cause(self, step: Applied, *, default: str, now: float) -> list[OutMessage]:
        """The `profiles.changed` messages of a step whose changes have causes of their own (merges)."""
        by_cause: dict[str, dict[str, ProfileChange]] = {}
        for person, change in step.changes.items():
            by_cause.setdefault(step.causes.get(person, default), {})[person] = change
        return [m for cause, group in by_cause.items() for m in self.messages(group, cause=cause, now=now)]

    # --- synchronous paths (gRPC) -----------------------------------------------------------------

    async def profile(self, person_id: str, *, durable: bool = True) -> Profile:
        """The live profile of a person (following merges), read from the store if not ours.

        `durable` (reads): answered once every change it shows has been written (see the module
        docstring); writers pass False, their own write is ordered after the pending ones anyway.

        A person of a partition this replica does not own (asked while its partition moves, or on a
        replica that cannot forward) is read into a copy of its own and not kept: its owner writes it,
        so a kept copy would go stale, and its windowed traits would expire - and be written - here."""
        hot = self.hot if self.owns(person_id) else HotProfiles(self.store, retention=self.retention, owns=self.owns)
        await hot.load([person_id])
        root = hot.root(person_id)
        chain = self.chain
        # Every write submitted has landed (an idle chain): nothing to wait for. Otherwise the common case
        # (nothing noted for these persons, or it landed) costs two lookups.
        if durable and chain.durable < chain.submitted and hot is self.hot:
            unlanded = self._unlanded
            if max(unlanded.get(person_id, 0), unlanded.get(root, 0)) > chain.durable:
                root = await self._landed(person_id, root)
        profile = hot.profiles.get(root)
        if profile is None:
            if root in hot.deleted:
                raise NotFound(f"person {person_id!r} was deleted", reason="deleted")
            raise NotFound(f"no profile for person {person_id!r}", reason="unknown_person")
        return profile

    def _noted(self, person: str) -> None:
        """A write of `person`'s record is about to be submitted (`HotProfiles.versioned_put`)."""
        number = self.chain.submitted + 1
        self._unlanded[person] = number
        notes = self._notes
        if notes and notes[-1][0] == number:
            notes[-1][1].append(person)
            return
        durable = self.chain.durable
        while notes and notes[0][0] <= durable:
            landed, persons = notes.popleft()
            for someone in persons:
                if self._unlanded.get(someone) == landed:
                    del self._unlanded[someone]
        notes.append((number, [person]))

    def _forget_notes(self) -> None:
        self._unlanded.clear()
        self._notes.clear()

    def _pending(self, person: str) -> asyncio.Future | None:
        number = self._unlanded.get(person)
        return None if number is None else self.chain.landing(number)

    async def _landed(self, person_id: str, root: str) -> str:
        """Wait until the writes noted for `person_id` and for the person holding its data have landed;
        the latter, as it is then. UNAVAILABLE if one fails or they take longer than DURABLE_READ_WAIT."""
        deadline = None
        loop = asyncio.get_running_loop()
        while (write := self._pending(person_id) or self._pending(root)) is not None:
            if deadline is None:
                deadline = loop.time() + DURABLE_READ_WAIT
            try:
                await asyncio.wait_for(asyncio.shield(write), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise Unavailable("the profile's latest change is not written yet; retry", retry_after=1.0) from None
            except asyncio.CancelledError:
                if write.cancelled():
                    raise Unavailable("the profile's latest change was not written; retry", retry_after=1.0) from None
                raise
            except Exception:
                # The cache is rebuilt from the store (`recover`); the read is answered from there on retry.
                raise Unavailable("the profile's latest change was not written; retry", retry_after=1.0) from None
            # Meanwhile the person may have been merged, or the cache rebuilt: look again.
            await self.hot.load([person_id])
            root = self.hot.root(person_id)
        return root

    def owned_profile_or_fail(self, person: str) -> None:
        partition = self._partition(person)
        if partition not in self.owned:
            raise FailedPrecondition(
                f"person {person!r} is in partition {partition}, which this replica does not own; "
                "send writes to the replica that owns it",
                reason="not_owner",
            )

    async def update_traits(
        self,
        person_id: str,
        traits: dict[str, Any],
        consent: dict[str, bool],
        *,
        source: str,
        at: float | None,
        request_id: str,
    ) -> tuple[Profile, ProfileChange]:
        size = len(orjson.dumps(traits)) if traits else 0
        if size > UPDATE_TRAITS_MAX_BYTES:
            raise InvalidArgument(
                "traits", f"{size} bytes as JSON, over the {UPDATE_TRAITS_MAX_BYTES} bytes one UpdateTraits may set"
            )
        if (keys := sum(len(key) for key in consent)) > UPDATE_TRAITS_MAX_BYTES:
            raise InvalidArgument(
                "consent", f"keys of {keys} characters, over the {UPDATE_TRAITS_MAX_BYTES} one UpdateTraits may set"
            )
        profile = await self.profile(person_id, durable=False)
        self.owned_profile_or_fail(profile.person_id)
        # A new name past the person's history budget would not be kept (Profile._record): said, not dropped.
        budget = HISTORY_MAX_BYTES // len(profile.parts)
        if (held := profile.parts[profile.person_id]._written_history_bytes) > budget:
            known = {name for part in profile.parts.values() for name in part.traits} | {
                key for part in profile.parts.values() for key in part.consent
            }
            if unknown := [name for name in (*traits, *consent) if name not in known]:
                raise InvalidArgument(
                    "traits" if unknown[0] in traits else "consent",
                    f"the person's traits and consent hold {held} bytes, over the {budget} a person keeps: "
                    f"no new name is kept ({len(unknown)} new); change the ones held or remove some (null)",
                )
        # Within the store's limit after the write, as near as the record before it and what it sets tell.
        if size + keys > 4096 and (held := len(profile.to_json())) + size + keys > MAX_DOCUMENT_BYTES:
            raise InvalidArgument(
                "traits",
                f"{size + keys} bytes would take the person's record of {held} bytes past the {MAX_DOCUMENT_BYTES} "
                "bytes the store keeps of one profile",
            )
        now = self.clock()
        at = now if at is None else at
        event_id = f"api:{request_id}"
        change = ProfileChange(person_id=profile.person_id)
        if traits:
            change.combine(profile.update_traits(traits, source=source, at=at, event_id=event_id, now=now))
        if consent:
            change.combine(profile.set_consent(consent, source=source, at=at, event_id=event_id))
        await self.write({profile.person_id: change} if change else {}, cause="api", now=now)
        return profile, change

    async def set_scores(
        self, person_id: str, scores: dict[str, float], *, model: str, version: str, at: float
    ) -> ProfileChange:
        profile = await self.profile(person_id, durable=False)
        self.owned_profile_or_fail(profile.person_id)
        change = profile.set_scores(scores, model=model, version=version, at=at)
        await self.write({profile.person_id: change} if change else {}, cause="score", now=self.clock())
        return change

    # Computed traits (backfill.py), expiry (expiry.py) and privacy (privacy.py), as the API calls them.

    async def define(self, trait: ComputedTrait, caller: Caller | None = None) -> Backfill:
        return await self.catalogue.define(trait, caller)

    async def undefine(self, name: str, caller: Caller | None = None) -> None:
        await self.catalogue.undefine(name, caller)

    async def expire_due(self) -> int:
        """Apply every expiry due now; returns the number of profiles whose values changed."""
        now = self.clock()
        changes = expire(self.hot.expiries, self.hot.profiles, self.defs, now=now)
        if changes:
            await self.write(changes, cause="expiry", now=now)
        return len(changes)

    async def export(self, person_id: str) -> tuple[str, dict[str, Any]]:
        return await self.privacy.export(person_id)

    async def delete(self, person_id: str, *, suppress: bool, request_id: str | None) -> dict[str, Any]:
        return await self.privacy.delete(person_id, suppress=suppress, request_id=request_id)

    # --- writing ----------------------------------------------------------------------------------

    def writes(
        self,
        changes: Mapping[str, ProfileChange],
        *,
        ops: Sequence[WriteOp] = (),
        dirty: Collection[str] = (),
    ) -> list[WriteOp]:
        """The store writes of these changes: `ops`, the timeline pages the entries added and removed write
        or delete (`timeline.py`), and each
        changed (or `dirty`: written although no visible value changed) live profile as a versioned put.
        Built right before it is queued on the chain (nothing awaits between), so the versions follow.

        Encoding a record may coarsen its computed states (`Profile.to_json`), which can move a value (a
        bucket leaving early, a state emptied): those go into the person's change, so the change messages
        are made after this."""
        out: list[WriteOp] = list(ops)
        profiles = self.hot.profiles
        persons = set(dirty)
        added: list[tuple[bool, TimelineEntry]] = []
        removing = False
        for person, change in changes.items():
            if change:  # a change that only lists copies of applied events rewrites nothing
                persons.add(person)
            if change.timeline_added:
                added.extend((True, entry) for entry in change.timeline_added)
            removing = removing or bool(change.timeline_removed)
        if removing:
            # Per entry, whether it is on a timeline after these changes, in their order: a split's survivor
            # lists as removed what the restored person's change adds (their part's entries, which stay
            # where they are stored).
            net: dict[tuple[str, float, str], tuple[bool, TimelineEntry]] = {}
            for change in changes.values():
                for entry in change.timeline_removed:
                    net[(entry.origin, entry.at, entry.event_id)] = (False, entry)
                for entry in change.timeline_added:
                    net[(entry.origin, entry.at, entry.event_id)] = (True, entry)
            added = list(net.values())
        if added:
            # Heads grow and move out as pages here, before the records holding them are encoded.
            out.extend(timeline_writes(added, self.hot.stored_of, out, pages=self.timeline_pages))
        for person in persons:
            profile = profiles.get(person)
            if profile is not None:  # else merged away or deleted: its marker is in `ops`
                out.append(self.hot.versioned_put(person, encode_profile(profile, head_of(profile.parts.values()))))
                trimmed = profile.take_trimmed()
                if trimmed:
                    self._record_trimmed(person, trimmed)
                    moved = profile.take_trim_moves()
                    change = changes.get(person)
                    if moved and change is not None:
                        change.computed.update(moved)
        return out

    def _record_trimmed(self, person: str, trimmed: Mapping[str, int]) -> None:
        """A write kept a record within the store's limit by coarsening or trimming (`Profile.to_json`): counted
        by part; logged unless only the histories, the remembered event ids or the listed identifiers were
        trimmed (routine for a person at their budget), at most once per person every TRIM_LOG_SECONDS: a person
        at the bound is trimmed on nearly every write, and a line per event of a busy person flooded the log (the
        metric counts every one)."""
        for part in trimmed:
            self._m_trimmed.add(1, {"part": part})
        if trimmed.keys() - {"history", "seen", "identifiers"}:
            now = time.monotonic()
            logged = self._trim_logged
            if now - logged.get(person, -TRIM_LOG_SECONDS) < TRIM_LOG_SECONDS:
                return
            if len(logged) >= TRIM_LOG_PERSONS:  # bounded: forget those logged longest ago
                for stale in [p for p, at in logged.items() if now - at >= TRIM_LOG_SECONDS] or list(logged):
                    del logged[stale]
            logged[person] = now
            log.warning(
                "profile record past its computed-trait budget (%d bytes): states coarsened %d, dropped from the "
                "timeline base %d, emptied %d",
                COMPUTED_MAX_BYTES,
                trimmed.get("computed", 0),
                trimmed.get("base", 0),
                trimmed.get("reset", 0),
                extra={"person_id": person},
            )

    def score_writes(self, changes: Mapping[str, ProfileChange]) -> list[WriteOp]:
        """The store writes of model score changes (`scores.updated`): each changed live person's scores
        record, not its whole profile (see `records.py`). Built right before it is queued, like `writes`."""
        profiles = self.hot.profiles
        return [self.hot.scores_put(person) for person in changes if person in profiles]

    async def write(
        self,
        changes: dict[str, ProfileChange],
        *,
        cause: str,
        now: float,
        ops: Sequence[Put | Delete] = (),
        dirty: Collection[str] = (),
    ) -> None:
        """Commit changes made outside the partitioned streams and publish them (the messages made after
        the writes: a write that coarsens a record adds the values it moved to the change, `writes`)."""
        await self.commit(changes, ops=ops, dirty=dirty)
        await self.publish(self.messages(changes, cause=cause, now=now))

    async def commit(
        self,
        changes: Mapping[str, ProfileChange],
        *,
        ops: Sequence[Put | Delete] = (),
        dirty: Collection[str] = (),
    ) -> None:
        """Queue the writes of changes made outside the partitioned streams on the chain and wait until
        they are durable. A failure rebuilds the cache (`recover`) and raises Unavailable."""
        started = time.perf_counter()
        write = self.chain.submit(self.writes(changes, ops=ops, dirty=dirty))
        try:
            await asyncio.shield(write)  # a caller going away must not cancel the writes queued with it
        except Exception as exc:
            log.warning("profile write failed (%s); the cache will be reloaded from the store", type(exc).__name__)
            await self.recover()
            raise Unavailable(f"profile write failed ({type(exc).__name__}); retry") from None
        self._m_commit.record((time.perf_counter() - started) * 1000)

    async def flush(self) -> None:
        """Wait until every write queued so far has landed (or failed)."""
        await self.chain.settle()

    # --- publishing -------------------------------------------------------------------------------

    def messages(self, changes: Mapping[str, ProfileChange], *, cause: str, now: float) -> list[OutMessage]:
        """The `profiles.changed` messages of these changes (see changes.py)."""
        count = sum(1 for change in changes.values() if change)
        if count:
            self._m_changes.add(count, {"cause": cause})
        return change_messages(changes, cause=cause, now=now, partition_of=self._partition)

    async def publish(self, messages: list[OutMessage]) -> None:
        """Publish durable changes made outside the partitioned streams; Unavailable if JetStream did not
        store them all (the caller's request or delivery is retried; repeats are dropped by id)."""
        if not messages:
            return
        results = await self.publisher.publish_batch(messages)
        failed = sum(1 for r in results if not r.ok)
        if failed:
            raise Unavailable(f"{failed} profile changes not stored by JetStream; retry")
