"""The profile engine: hot profiles in memory, written behind to the store, changes on the bus.

Paths that change a profile (the `events.resolved.<p>` consumer, identity merges and unmerges, model
scores, API writes, computed-trait expiry and backfill, deletion) all end the same way:
1. the domain applies the change in memory and reports a compact `ProfileChange` (`apply.py` for the
   consumed streams; `backfill.py`, `expiry.py` and `privacy.py` for the rest);
2. the touched profiles are queued for the next *group commit*: one bulk write of every dirty profile,
   the timeline entries added and removed, and each partition's stream position with the change
   messages that position produced (so a crash between the write and the publish loses nothing:
   start-up publishes them again, and JetStream drops repeats by message id);
3. once the write is durable, the changes are published on `profiles.changed.<p>` and only then is the
   stream position acknowledged (by the consumer runner, when the handler returns).
A write that fails drops the whole cache; the unacknowledged batches are redelivered onto the store's
state, so nothing is counted twice.

This module is the machinery (consume, commit, publish, recover); what a message does to a profile
is not here. Merged-away persons keep a tombstone (`merged_into`) so late events are applied to the
survivor; deleted persons keep a marker without personal data, so events already in flight at
deletion time do not bring them back (see `state.py`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Collection, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cdp_kit.bus import Delivery, OutMessage, Partitioner
from cdp_kit.errors import FailedPrecondition, NotFound, Unavailable
from cdp_kit.storage import Delete, Put, Store
from cdp_kit.telemetry import LATENCY_BUCKETS_MS, Telemetry
from cdp_profile.apply import Applied, apply_events, apply_identity, apply_scores, decode_events
from cdp_profile.backfill import Backfill as Backfill  # also imported from here by code that predates backfill.py
from cdp_profile.backfill import ComputedTraitCatalogue
from cdp_profile.changes import change_messages
from cdp_profile.domain import ComputedTrait, ComputedTraits, Profile, ProfileChange, Retention
from cdp_profile.expiry import expire, expiry_loop
from cdp_profile.privacy import Privacy
from cdp_profile.records import (
    CHECKPOINTS,
    DELETIONS,
    TIMELINE,
    checkpoint_leftovers,
    checkpoint_position,
    encode_checkpoint,
    encode_entry,
    encode_profile,
    timeline_key,
)

# The store's vocabulary lives in records.py; these stay importable from here for the tests and tools
# written before it (the kill test reads the store with them).
from cdp_profile.records import DEFINITIONS as DEFINITIONS
from cdp_profile.records import PROFILES as PROFILES
from cdp_profile.records import decode_entry as decode_entry
from cdp_profile.records import decode_profile as decode_profile
from cdp_profile.state import HotProfiles

log = logging.getLogger("cdp.profile.engine")


@dataclass(slots=True)
class _Pending:
    """What the next group commit writes, and who waits for it."""

    dirty: set[str] = field(default_factory=set)
    ops: list[Put | Delete] = field(default_factory=list)
    positions: dict[str, tuple[int, list[OutMessage]]] = field(default_factory=dict)
    waiters: list[asyncio.Future] = field(default_factory=list)


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
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.partitions = partitions
        self.owned = frozenset(owned)
        self.retention = retention
        self.clock = clock
        self._partition = Partitioner(partitions)
        self.hot = HotProfiles(store, retention=retention, owns=self.owns)
        self.catalogue = ComputedTraitCatalogue(self, max_held=max_computed_traits)
        self.privacy = Privacy(self)
        self.applied: dict[str, int] = {}  # partition subject -> last durable stream position
        self.unpublished: dict[str, list[OutMessage]] = {}  # per subject, changes durable but not yet published
        self._pending = _Pending()
        self._wake = asyncio.Event()
        self._failed = False
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
            description="time to write one group commit",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        self._m_freshness = meter.create_histogram(
            "cdp.profile.freshness",
            unit="ms",
            description="collector acceptance to durable profile change, per batch (its newest event)",
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

    # --- life cycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Checkpoints, definitions and the owned profiles from the store; leftovers published."""
        async for record in self.store.scan_all(CHECKPOINTS):
            self.applied[record.key] = checkpoint_position(record.doc)
            leftovers = checkpoint_leftovers(record.doc)
            if leftovers:
                self.unpublished[record.key] = leftovers
        await self.store.ensure_index(DELETIONS, "pending")
        await self.catalogue.load(self.store)
        await self.hot.warm()
        # The warmed profiles live as long as the process: keep the collector from rescanning them.
        gc.freeze()
        for subject in list(self.unpublished):
            await self._publish_leftovers(subject)
        await self.privacy.publish_deletions()
        self.spawn(self._flush_loop(), "profile group commit")
        self.spawn(expiry_loop(self.expire_due), "profile expiry")
        self.catalogue.resume()

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Background work that lives until `stop`."""
        self._tasks.append(asyncio.create_task(work, name=name))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    # --- the stream paths: decode and apply (apply.py), commit, publish; acked by the runner after ---

    async def handle(self, batch: Sequence[Delivery]) -> None:
        """Consumer handler for `events.resolved.<p>`."""
        subject = batch[0].subject
        await self._recover_if_failed()
        await self._publish_leftovers(subject)
        applied = self.applied.get(subject, 0)
        items = decode_events(batch, after=applied, needs_context=self.defs.needs_context)
        last_seq = batch[-1].stream_seq
        if last_seq <= applied:
            return
        await self.hot.load(person for person, _, _ in items)
        now = self.clock()
        step = apply_events(self.hot, items, self.defs, now=now)
        messages = self.messages(step.changes, cause="event", now=now)
        for outcome, count in step.outcomes.items():
            if count:
                self._m_events.add(count, {"outcome": outcome})
        with self.privacy.scrub.between_commit_and_publish(subject):
            await self.commit(step.changes, ops=step.ops, position=(subject, last_seq, messages))
            if step.newest_received:
                self._m_freshness.record(max(0.0, (self.clock() - step.newest_received) * 1000))
            await self.publish(subject, messages)
            await self.privacy.scrub_checkpoint(subject)

    async def handle_identity(self, batch: Sequence[Delivery]) -> None:
        """Consumer handler for `identity.merged` / `identity.unmerged`."""
        await self._recover_if_failed()
        step = await apply_identity(self.hot, batch, self.defs, owns=self.owns, now=self.clock())
        if not step.changes:
            await self.commit({}, ops=step.ops)
            return
        await self._write_by_cause(step, default="merge")

    async def handle_scores(self, batch: Sequence[Delivery]) -> None:
        """Consumer handler for `scores.updated.<p>`: model scores become profile fields."""
        await self._recover_if_failed()
        step = await apply_scores(self.hot, batch, owns=self.owns)
        if step.changes:
            await self.write(step.changes, cause="score", now=self.clock(), ops=step.ops)

    async def _write_by_cause(self, step: Applied, *, default: str) -> None:
        now = self.clock()
        by_cause: dict[str, dict[str, ProfileChange]] = {}
        for person, change in step.changes.items():
            by_cause.setdefault(step.causes.get(person, default), {})[person] = change
        messages = [m for cause, group in by_cause.items() for m in self.messages(group, cause=cause, now=now)]
        await self.commit(step.changes, ops=step.ops)
        await self.publish(None, messages)

    # --- synchronous paths (gRPC) -----------------------------------------------------------------

    async def profile(self, person_id: str) -> Profile:
        """The live profile of a person (following merges), read from the store if not ours."""
        await self.hot.load([person_id])
        root = self.hot.root(person_id)
        profile = self.hot.profiles.get(root)
        if profile is None:
            if root in self.hot.deleted:
                raise NotFound(f"person {person_id!r} was deleted", reason="deleted")
            raise NotFound(f"no profile for person {person_id!r}", reason="unknown_person")
        return profile

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
        profile = await self.profile(person_id)
        self.owned_profile_or_fail(profile.person_id)
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
        profile = await self.profile(person_id)
        change = profile.set_scores(scores, model=model, version=version, at=at)
        await self.write({profile.person_id: change} if change else {}, cause="score", now=self.clock())
        return change

    # Computed traits (backfill.py), expiry (expiry.py) and privacy (privacy.py), as the API calls them.

    async def define(self, trait: ComputedTrait) -> Backfill:
        return await self.catalogue.define(trait)

    async def undefine(self, name: str) -> None:
        await self.catalogue.undefine(name)

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

    # --- the group commit -------------------------------------------------------------------------

    async def write(
        self,
        changes: dict[str, ProfileChange],
        *,
        cause: str,
        now: float,
        ops: Sequence[Put | Delete] = (),
        dirty: Collection[str] = (),
    ) -> None:
        """Commit changes made outside the stream paths and publish them (no stream position moves)."""
        messages = self.messages(changes, cause=cause, now=now)
        await self.commit(changes, ops=ops, dirty=dirty)
        await self.publish(None, messages)

    def commit(
        self,
        changes: Mapping[str, ProfileChange],
        *,
        position: tuple[str, int, list[OutMessage]] | None = None,
        ops: Sequence[Put | Delete] = (),
        dirty: Collection[str] = (),
    ) -> asyncio.Future:
        """Queue the changed profiles (and a stream position) for the next group commit; the future
        resolves once they are durable. `dirty`: profiles to write although no visible value changed."""
        pending = self._pending
        profiles = self.hot.profiles
        for person, change in changes.items():
            if person in profiles:
                pending.dirty.add(person)
            for entry in change.timeline_added:
                pending.ops.append(Put(TIMELINE, timeline_key(entry), encode_entry(entry)))
            for entry in change.timeline_removed:
                pending.ops.append(Delete(TIMELINE, timeline_key(entry)))
        pending.dirty.update(dirty)
        pending.ops.extend(ops)
        if position is not None:
            subject, seq, messages = position
            pending.positions[subject] = (seq, messages)
        future = asyncio.get_running_loop().create_future()
        pending.waiters.append(future)
        self._wake.set()
        return future

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        pending, self._pending = self._pending, _Pending()
        if not pending.waiters and not pending.dirty and not pending.ops:
            return
        started = time.perf_counter()
        try:
            ops: list[Put | Delete] = list(pending.ops)
            for person in pending.dirty:
                profile = self.hot.profiles.get(person)
                if profile is not None:  # else merged away or deleted since: its marker is in `ops`
                    ops.append(self.hot.versioned_put(person, encode_profile(profile)))
            for subject, (seq, messages) in pending.positions.items():
                ops.append(Put(CHECKPOINTS, subject, encode_checkpoint(seq, self.clock(), messages)))
            if ops:
                await self.store.bulk_write(ops)
        except Exception as exc:
            self._failed = True
            log.warning("profile write failed (%r); the cache will be reloaded from the store", exc)
            for waiter in pending.waiters:
                if not waiter.done():
                    waiter.set_exception(Unavailable(f"profile write failed ({exc!r}); the batch will be retried"))
            return
        for subject, (seq, _messages) in pending.positions.items():
            self.applied[subject] = max(self.applied.get(subject, 0), seq)
        self._m_commit.record((time.perf_counter() - started) * 1000)
        for waiter in pending.waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _recover_if_failed(self) -> None:
        if not self._failed:
            return
        self._failed = False
        self.hot.reset()
        self.applied.clear()
        async for record in self.store.scan_all(CHECKPOINTS):
            self.applied[record.key] = checkpoint_position(record.doc)
        log.warning("profile cache dropped after a failed write; reloading from the store")
        await self.hot.warm()

    # --- publishing -------------------------------------------------------------------------------

    def messages(self, changes: Mapping[str, ProfileChange], *, cause: str, now: float) -> list[OutMessage]:
        """The `profiles.changed` messages of these changes (see changes.py)."""
        count = sum(1 for change in changes.values() if change)
        if count:
            self._m_changes.add(count, {"cause": cause})
        return change_messages(changes, cause=cause, now=now, partition_of=self._partition)

    async def publish(self, subject: str | None, messages: list[OutMessage]) -> None:
        """Publish durable changes; those JetStream did not store are kept (by consumed subject) for the
        next batch of that subject, and the caller gets Unavailable (the batch is not acknowledged)."""
        if not messages:
            return
        results = await self.publisher.publish_batch(messages)
        failed = [m for m, r in zip(messages, results, strict=True) if not r.ok]
        if failed:
            key = subject or "_other"
            self.unpublished.setdefault(key, []).extend(failed)
            raise Unavailable(f"{len(failed)} profile changes not stored by JetStream; they will be published again")

    async def _publish_leftovers(self, subject: str) -> None:
        leftovers = self.unpublished.pop(subject, None)
        if leftovers:
            await self.publish(subject, leftovers)
            if subject in self.applied:
                await self.privacy.scrub_checkpoint(subject)
