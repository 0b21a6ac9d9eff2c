"""The profile engine: hot profiles in memory, written behind to the store, changes on the bus.

Paths that change a profile (the `events.resolved.<p>` consumer, identity merges and unmerges, API
writes, computed-trait expiry and backfill, deletion) all end the same way:
1. the domain applies the change in memory and reports a compact `ProfileChange`;
2. the touched profiles are queued for the next *group commit*: one bulk write of every dirty profile,
   the timeline entries added and removed, and each partition's stream position with the change
   messages that position produced (so a crash between the write and the publish loses nothing:
   start-up publishes them again, and JetStream drops repeats by message id);
3. once the write is durable, the changes are published on `profiles.changed.<p>` and only then is the
   stream position acknowledged.
A write that fails drops the whole cache; the unacknowledged batches are redelivered onto the store's
state, so nothing is counted twice.

Merged-away persons keep a tombstone (`merged_into`) so late events are applied to the survivor;
deleted persons keep a marker without personal data, so events already in flight at deletion time
do not bring them back.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import heapq
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from google.protobuf.message import DecodeError

from cdp.events.v1 import events_pb2
from cdp.identity.v1 import identity_pb2
from cdp.privacy.v1 import privacy_pb2
from cdp.profile.v1 import profile_pb2
from cdp.scoring.v1 import scoring_pb2
from cdp_kit.bus import Delivery, OutMessage, Partitioner
from cdp_kit.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from cdp_kit.storage import Delete, Put, Store
from cdp_kit.telemetry import LATENCY_BUCKETS_MS, Telemetry
from cdp_profile.domain import ComputedTrait, ComputedTraits, Profile, ProfileChange, Retention, TimelineEntry
from cdp_profile.events import python_to_value, received_time, seconds_to_timestamp, timestamp_seconds, to_profile_event

log = logging.getLogger("cdp.profile.engine")

PROFILES = "profiles"
TIMELINE = "profile_timeline"
CHECKPOINTS = "profile_checkpoints"
DEFINITIONS = "profile_computed_traits"
DELETIONS = "profile_deletions"

CHANGED_SUBJECT = "profiles.changed"
DELETED_SUBJECT = "privacy.deleted"


# Profiles and timeline entries are stored as one JSON string each: they hold user data whose keys may
# be anything ("$set", "a.b"), which a document store may refuse as field names, and one string is also
# far cheaper for the storage port to check than a walk over every nested value.


def encode_profile(profile: Profile) -> dict[str, Any]:
    doc = profile.to_doc()
    return {"merged_from": doc["merged_from"], "profile": orjson.dumps(doc).decode()}


def decode_profile(doc: dict[str, Any], timeline: Iterable[TimelineEntry], retention: Retention) -> Profile:
    return Profile.from_doc(orjson.loads(doc["profile"]), timeline, retention=retention)


def encode_entry(entry: TimelineEntry) -> dict[str, Any]:
    return {"entry": orjson.dumps(entry.to_doc()).decode()}


def decode_entry(doc: dict[str, Any]) -> TimelineEntry:
    return TimelineEntry.from_doc(orjson.loads(doc["entry"]))


def timeline_key(entry: TimelineEntry) -> str:
    # Keyed by the part's origin person: merging and splitting profiles moves no timeline record.
    return f"{entry.origin}|{round(entry.at * 1000):015d}|{entry.event_id}"


def identifier_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(slots=True)
class _Pending:
    """What the next group commit writes, and who waits for it."""

    dirty: set[str] = field(default_factory=set)
    ops: list[Put | Delete] = field(default_factory=list)
    positions: dict[str, tuple[int, list[OutMessage]]] = field(default_factory=dict)
    waiters: list[asyncio.Future] = field(default_factory=list)


@dataclass(slots=True)
class Backfill:
    trait: ComputedTrait
    defined_at: float
    state: str = "backfilling"
    done: int = 0
    total: int = 0

    def doc(self) -> dict[str, Any]:
        return {
            # One JSON string: `where` keys and operators start with '$', which document stores reserve.
            "definition": json.dumps(self.trait.to_dict(), separators=(",", ":")),
            "defined_at": self.defined_at,
            "state": self.state,
            "done": self.done,
            "total": self.total,
        }


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
        # Every definition costs every matching event a contribution and every profile a value: bounded.
        self.max_computed_traits = max_computed_traits
        self.publisher = publisher
        self.partitions = partitions
        self.owned = frozenset(owned)
        self.retention = retention
        self.clock = clock
        self.defs = ComputedTraits([])
        self.backfills: dict[str, Backfill] = {}
        self.profiles: dict[str, Profile] = {}
        self.tombstones: dict[str, str] = {}  # merged-away person -> the person it was merged into
        self.deleted: dict[str, float] = {}  # deleted person -> when (events received before are dropped)
        self.versions: dict[str, int] = {}
        self.applied: dict[str, int] = {}  # partition subject -> last durable stream position
        self.unpublished: dict[str, list[OutMessage]] = {}  # per subject, changes durable but not yet published
        self._pending = _Pending()
        self._wake = asyncio.Event()
        self._failed = False
        self._expiries: list[tuple[float, str]] = []
        self._expiry_due: dict[str, float] = {}
        self._partition = Partitioner(partitions)
        self._tasks: list[asyncio.Task] = []
        self._publishing: set[str] = set()  # partitions between their commit and their publish
        self._scrub: set[str] = set()  # checkpoints to clear of change messages once those are published
        meter = telemetry.meter
        self._m_events = meter.create_counter("cdp_profile_events_total", description="events applied, by outcome")
        self._m_changes = meter.create_counter(
            "cdp_profile_changes_total", description="profile changes published, by cause"
        )
        self._m_flush = meter.create_histogram(
            "cdp_profile_flush_ms",
            unit="ms",
            description="time to write one group commit",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        self._m_freshness = meter.create_histogram(
            "cdp_profile_freshness_ms",
            unit="ms",
            description="collector acceptance to durable profile change, per batch (its newest event)",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )

    # --- life cycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Checkpoints, definitions and the owned profiles from the store; leftovers published."""
        async for record in self.store.scan_all(CHECKPOINTS):
            self.applied[record.key] = record.doc.get("stream_seq", 0)
            self.versions[f"c:{record.key}"] = record.version
            leftovers = [
                OutMessage(subject=m["subject"], payload=bytes.fromhex(m["payload"]), msg_id=m["msg_id"])
                for m in record.doc.get("changes", [])
            ]
            if leftovers:
                self.unpublished[record.key] = leftovers
        await self.store.ensure_index(DELETIONS, "pending")
        async for record in self.store.scan_all(DEFINITIONS):
            definition = record.doc["definition"]
            if isinstance(definition, str):
                definition = json.loads(definition)  # else an object, as written before operators existed
            backfill = Backfill(
                trait=ComputedTrait.from_dict(definition),
                defined_at=record.doc["defined_at"],
                state=record.doc.get("state", "ready"),
                done=record.doc.get("done", 0),
                total=record.doc.get("total", 0),
            )
            self.backfills[backfill.trait.name] = backfill
        self.defs = ComputedTraits([b.trait for b in self.backfills.values()])
        await self._warm()
        # The warmed profiles live as long as the process: keep the collector from rescanning them.
        gc.freeze()
        for subject in list(self.unpublished):
            await self._publish_leftovers(subject)
        await self._publish_deletions()
        self._tasks.append(asyncio.create_task(self._flush_loop(), name="profile group commit"))
        self._tasks.append(asyncio.create_task(self._expiry_loop(), name="profile expiry"))
        for backfill in self.backfills.values():
            if backfill.state == "backfilling":
                self._tasks.append(
                    asyncio.create_task(self._backfill(backfill), name=f"backfill {backfill.trait.name}")
                )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _warm(self) -> None:
        """Load every owned profile: they are the hot state, and windowed traits expire on their own."""
        timelines: dict[str, list[TimelineEntry]] = {}
        async for record in self.store.scan_all(TIMELINE, page_size=2000):
            entry = decode_entry(record.doc)
            timelines.setdefault(entry.origin, []).append(entry)
        async for record in self.store.scan_all(PROFILES, page_size=1000):
            if self._partition(record.key) in self.owned:
                self._adopt(record.key, record.doc, record.version, timelines)

    def _adopt(self, person: str, doc: dict, version: int, timelines: dict[str, list[TimelineEntry]]) -> None:
        self.versions[person] = version
        if "merged_into" in doc:
            self.tombstones[person] = doc["merged_into"]
        elif "deleted_at" in doc:
            self.deleted[person] = doc["deleted_at"]
        else:
            origins = [person, *doc.get("merged_from", [])]
            entries = [e for origin in origins for e in timelines.get(origin, ())]
            profile = decode_profile(doc, entries, self.retention)
            self.profiles[person] = profile
            self._schedule_expiry(profile)

    async def _load(self, persons: Iterable[str]) -> None:
        """Bring persons (and whatever their tombstones point at) into memory from the store."""
        wanted = {p for p in persons if self._unknown(p)}
        while wanted:
            records = await self.store.get_many(PROFILES, sorted(wanted))
            follow: set[str] = set()
            timelines: dict[str, list[TimelineEntry]] = {}
            for person, record in records.items():
                if "profile" in record.doc:
                    for origin in [person, *record.doc.get("merged_from", [])]:
                        async for entry in self.store.scan_all(TIMELINE, prefix=f"{origin}|"):
                            timelines.setdefault(origin, []).append(decode_entry(entry.doc))
                self._adopt(person, record.doc, record.version, timelines)
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
        seen = 0
        while person in self.tombstones and seen < 64:
            person = self.tombstones[person]
            seen += 1
        return person

    # --- the stream path --------------------------------------------------------------------------

    async def handle(self, batch: Sequence[Delivery]) -> None:
        """Consumer handler for `events.resolved.<p>`: apply, commit, publish; acked by the runner after."""
        subject = batch[0].subject
        await self._recover_if_failed()
        await self._publish_leftovers(subject)
        applied = self.applied.get(subject, 0)
        items: list[tuple[str, Any, float]] = []
        needs_context = self.defs.needs_context
        for delivery in batch:
            if delivery.stream_seq <= applied:
                continue  # applied before a crash; its changes were published from the checkpoint
            message = events_pb2.ResolvedEventBatch()
            try:
                message.ParseFromString(delivery.data)
            except DecodeError as exc:
                delivery.reject("invalid_message", f"not a cdp.events.v1.ResolvedEventBatch: {exc}")
                continue
            for resolved in message.events:
                if not resolved.person_id:
                    continue
                items.append(
                    (
                        resolved.person_id,
                        to_profile_event(resolved, needs_context=needs_context),
                        received_time(resolved.event),
                    )
                )
        last_seq = batch[-1].stream_seq
        if last_seq <= applied:
            return
        await self._load(person for person, _, _ in items)
        now = self.clock()
        changes: dict[str, ProfileChange] = {}
        outcomes = {"applied": 0, "deleted_person": 0}
        newest_received = 0.0
        for person, event, received in items:
            target = self.root(person)
            deleted_at = self.deleted.get(target)
            if deleted_at is not None:
                if received <= deleted_at:
                    outcomes["deleted_person"] += 1
                    continue
                del self.deleted[target]  # a new life after deletion: a fresh profile
            profile = self.profiles.get(target)
            if profile is None:
                profile = self.profiles[target] = Profile.new(target, retention=self.retention)
            change = profile.apply(event, self.defs, now=now)
            outcomes["applied"] += 1
            newest_received = max(newest_received, received)
            self._fold(changes, target, change)
        for person in changes:
            profile = self.profiles.get(person)
            if profile is not None:
                self._schedule_expiry(profile)
        messages = self._messages(changes, cause="event", now=now)
        for outcome, count in outcomes.items():
            if count:
                self._m_events.add(count, {"outcome": outcome})
        self._publishing.add(subject)
        try:
            await self._commit(changes, position=(subject, last_seq, messages))
            if newest_received:
                self._m_freshness.record(max(0.0, (self.clock() - newest_received) * 1000))
            await self._publish(subject, messages)
            await self._scrub_checkpoint(subject)
        finally:
            self._publishing.discard(subject)

    async def _scrub_checkpoint(self, subject: str) -> None:
        """A deletion came while this partition's change messages were kept for publishing: now that they
        are published, the checkpoint forgets them (they may hold the deleted person's values)."""
        if subject in self._scrub:
            self._scrub.discard(subject)
            doc = {"stream_seq": self.applied.get(subject, 0), "at": self.clock(), "changes": []}
            await self._commit({}, ops=[Put(CHECKPOINTS, subject, doc)])
            await self.store.erase()

    def _fold(self, changes: dict[str, ProfileChange], person: str, change: ProfileChange) -> None:
        if not change:
            return
        known = changes.get(person)
        if known is None:
            changes[person] = change
        else:
            known.combine(change)

    # --- identity merges and unmerges -------------------------------------------------------------

    async def handle_identity(self, batch: Sequence[Delivery]) -> None:
        """Consumer handler for `identity.merged` / `identity.unmerged`."""
        await self._recover_if_failed()
        changes: dict[str, ProfileChange] = {}
        causes: dict[str, str] = {}
        for delivery in batch:
            try:
                if delivery.subject == "identity.merged":
                    merged = identity_pb2.IdentityMerged.FromString(delivery.data)
                    await self._merge(
                        merged.winner, merged.loser, merged.merge_id, timestamp_seconds(merged.at), changes
                    )
                    causes.update(dict.fromkeys((merged.winner, merged.loser), "merge"))
                elif delivery.subject == "identity.unmerged":
                    unmerged = identity_pb2.IdentityUnmerged.FromString(delivery.data)
                    await self._unmerge(unmerged.winner, unmerged.loser, unmerged.merge_id, changes)
                    causes.update(dict.fromkeys((unmerged.winner, unmerged.loser), "unmerge"))
            except DecodeError as exc:
                delivery.reject("invalid_message", f"{delivery.subject}: {exc}")
        if not changes:
            await self._commit({})
            return
        now = self.clock()
        by_cause: dict[str, dict[str, ProfileChange]] = {}
        for person, change in changes.items():
            by_cause.setdefault(causes.get(person, "merge"), {})[person] = change
        messages = [m for cause, group in by_cause.items() for m in self._messages(group, cause=cause, now=now)]
        await self._commit(changes)
        await self._publish(None, messages)

    async def _merge(self, winner: str, loser: str, merge_id: str, at: float, changes) -> None:
        owner = self.root(winner)
        if self._partition(owner) not in self.owned:
            # The survivor lives on another replica, which cannot read this replica's store: the loser's
            # profile stays here, whole, rather than being dropped (profiles on two replicas are not
            # combined yet; see the README).
            if loser in self.profiles:
                log.warning(
                    "merge across replicas not combined", extra={"winner": winner, "loser": loser, "merge": merge_id}
                )
            return
        await self._load([winner, loser])
        owner = self.root(winner)
        if self.root(loser) == owner:
            return  # already merged (a redelivered notification)
        loser_root = self.root(loser)
        absorbed = self.profiles.pop(loser_root, None)
        self.tombstones[loser_root] = owner
        self._pending.ops.append(self._versioned_put(loser_root, {"merged_into": owner, "merge_id": merge_id}))
        self._pending.dirty.discard(loser_root)
        if absorbed is None:
            return
        survivor = self.profiles.get(owner)
        if survivor is None:
            survivor = self.profiles[owner] = Profile.new(owner, retention=self.retention)
        change = survivor.merge(absorbed, merge_id=merge_id, at=at, defs=self.defs, now=self.clock())
        self._fold(changes, owner, change)
        gone = ProfileChange(person_id=loser_root, merged_into=owner)
        self._fold(changes, loser_root, gone)
        self._schedule_expiry(survivor)

    async def _unmerge(self, winner: str, loser: str, merge_id: str, changes) -> None:
        await self._load([winner, loser])
        owner = self.root(winner)
        if self._partition(owner) not in self.owned:
            return
        survivor = self.profiles.get(owner)
        if survivor is None or loser not in survivor.parts:
            # Merged before it had a profile of its own: only the forwarding tombstone goes.
            if loser in self.tombstones and self.root(loser) == owner:
                del self.tombstones[loser]
                self._pending.ops.append(Delete(PROFILES, loser))
                self.versions.pop(loser, None)
            return
        restored, winner_change, loser_change = survivor.split(
            loser, merge_id=merge_id, defs=self.defs, now=self.clock()
        )
        self.tombstones.pop(loser, None)
        self.profiles[loser] = restored
        self._fold(changes, owner, winner_change)
        loser_change.split_from = owner
        self._fold(changes, loser, loser_change)
        self._schedule_expiry(survivor)
        self._schedule_expiry(restored)

    # --- the group commit -------------------------------------------------------------------------

    def _versioned_put(self, person: str, doc: dict) -> Put:
        expected = self.versions.get(person, 0)
        self.versions[person] = expected + 1
        return Put(PROFILES, person, doc, expected_version=expected)

    def _commit(
        self,
        changes: dict[str, ProfileChange],
        *,
        position: tuple[str, int, list[OutMessage]] | None = None,
        ops: Sequence[Put | Delete] = (),
    ) -> asyncio.Future:
        """Queue the changed profiles (and a stream position) for the next group commit."""
        pending = self._pending
        for person, change in changes.items():
            if person in self.profiles:
                pending.dirty.add(person)
            for entry in change.timeline_added:
                pending.ops.append(Put(TIMELINE, timeline_key(entry), encode_entry(entry)))
            for entry in change.timeline_removed:
                pending.ops.append(Delete(TIMELINE, timeline_key(entry)))
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
                profile = self.profiles.get(person)
                if profile is not None:
                    ops.append(self._versioned_put(person, encode_profile(profile)))
            for subject, (seq, messages) in pending.positions.items():
                doc = {
                    "stream_seq": seq,
                    "at": self.clock(),
                    "changes": [
                        {"subject": m.subject, "payload": m.payload.hex(), "msg_id": m.msg_id} for m in messages
                    ],
                }
                ops.append(Put(CHECKPOINTS, subject, doc))
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
        self._m_flush.record((time.perf_counter() - started) * 1000)
        for waiter in pending.waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _recover_if_failed(self) -> None:
        if not self._failed:
            return
        self._failed = False
        self.profiles.clear()
        self.tombstones.clear()
        self.deleted.clear()
        self.versions.clear()
        self._expiries.clear()
        self._expiry_due.clear()
        self.applied.clear()
        async for record in self.store.scan_all(CHECKPOINTS):
            self.applied[record.key] = record.doc.get("stream_seq", 0)
        log.warning("profile cache dropped after a failed write; reloading from the store")
        await self._warm()

    # --- publishing -------------------------------------------------------------------------------

    def _messages(self, changes: dict[str, ProfileChange], *, cause: str, now: float) -> list[OutMessage]:
        """One `ProfileChangedBatch` per partition; ids derived from the content so repeats dedupe."""
        grouped: dict[int, profile_pb2.ProfileChangedBatch] = {}
        stamp = seconds_to_timestamp(now)
        for person, change in changes.items():
            if not change:
                continue
            batch = grouped.get(self._partition(person))
            if batch is None:
                batch = grouped[self._partition(person)] = profile_pb2.ProfileChangedBatch()
            message = batch.changes.add(person_id=person, cause=cause, at=stamp)
            for name, value in change.traits.items():
                python_to_value(value, message.traits[name])
            for group, value in change.groups.items():
                python_to_value(value, message.groups[group])
            for name, value in change.computed.items():
                python_to_value(value, message.computed[name])
            # None: the decision or score left with the other side of a split; it is absent from now on.
            message.consent.update({k: v for k, v in change.consent.items() if v is not None})
            message.scores.update({k: v for k, v in change.scores.items() if v is not None})
            message.event_ids.extend(change.event_ids)
            message.merged.extend(change.merged)
            if change.split_from:
                message.split_from = change.split_from
            if change.merged_into or change.removed:
                message.removed = True
        out = []
        for partition, batch in grouped.items():
            payload = batch.SerializeToString()
            self._m_changes.add(len(batch.changes), {"cause": cause})
            out.append(
                OutMessage(
                    subject=f"{CHANGED_SUBJECT}.{partition}",
                    payload=payload,
                    msg_id="pc_" + hashlib.blake2b(payload, digest_size=16).hexdigest(),
                )
            )
        return out

    async def _publish(self, subject: str | None, messages: list[OutMessage]) -> None:
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
            await self._publish(subject, leftovers)
            if subject in self.applied:
                await self._scrub_checkpoint(subject)

    # --- synchronous paths (gRPC) -----------------------------------------------------------------

    async def profile(self, person_id: str) -> Profile:
        """The live profile of a person (following merges), read from the store if not ours."""
        await self._load([person_id])
        root = self.root(person_id)
        profile = self.profiles.get(root)
        if profile is None:
            if root in self.deleted:
                raise NotFound(f"person {person_id!r} was deleted", reason="deleted")
            raise NotFound(f"no profile for person {person_id!r}", reason="unknown_person")
        return profile

    def _owned_profile_or_fail(self, person: str) -> None:
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
        self._owned_profile_or_fail(profile.person_id)
        now = self.clock()
        at = now if at is None else at
        event_id = f"api:{request_id}"
        change = ProfileChange(person_id=profile.person_id)
        if traits:
            change.combine(profile.update_traits(traits, source=source, at=at, event_id=event_id, now=now))
        if consent:
            change.combine(profile.set_consent(consent, source=source, at=at, event_id=event_id))
        changes = {profile.person_id: change} if change else {}
        messages = self._messages(changes, cause="api", now=now)
        await self._commit(changes)
        await self._publish(None, messages)
        return profile, change

    async def handle_scores(self, batch: Sequence[Delivery]) -> None:
        """Consumer handler for `scores.updated.<p>`: model scores become profile fields.

        A score replaces the one of the same name only if it comes from a later profile change, so a
        redelivered or late batch changes nothing; the changes are published with cause "score"."""
        await self._recover_if_failed()
        changes: dict[str, ProfileChange] = {}
        for delivery in batch:
            try:
                message = scoring_pb2.ScoresUpdatedBatch.FromString(delivery.data)
            except DecodeError as exc:
                delivery.reject("invalid_message", f"not a cdp.scoring.v1.ScoresUpdatedBatch: {exc}")
                continue
            names, persons, values = list(message.scores), message.person_ids, message.values
            width = len(names)
            if not width or len(values) != width * len(persons) or len(message.at_ms) != len(persons):
                delivery.reject(
                    "invalid_message",
                    f"{len(persons)} persons, {width} scores, {len(values)} values, {len(message.at_ms)} times",
                )
                continue
            await self._load(persons)
            for i, person in enumerate(persons):
                target = self.root(person)
                profile = self.profiles.get(target)
                if profile is None or self._partition(target) not in self.owned:
                    # Deleted, or merged into a person another replica owns: nothing here to hold the score.
                    continue
                scores = dict(zip(names, values[i * width : (i + 1) * width], strict=True))
                try:
                    change = profile.set_scores(
                        scores, model=message.model, version=message.version, at=message.at_ms[i] / 1000
                    )
                except InvalidArgument as exc:
                    delivery.reject("invalid_score", str(exc))
                    break
                self._fold(changes, target, change)
        if not changes:
            return
        messages = self._messages(changes, cause="score", now=self.clock())
        await self._commit(changes)
        await self._publish(None, messages)

    async def set_scores(
        self, person_id: str, scores: dict[str, float], *, model: str, version: str, at: float
    ) -> ProfileChange:
        profile = await self.profile(person_id)
        change = profile.set_scores(scores, model=model, version=version, at=at)
        changes = {profile.person_id: change} if change else {}
        messages = self._messages(changes, cause="score", now=self.clock())
        await self._commit(changes)
        await self._publish(None, messages)
        return change

    # --- computed traits --------------------------------------------------------------------------

    async def define(self, trait: ComputedTrait) -> Backfill:
        """Define (or redefine) a computed trait and backfill it; at most `max_computed_traits` are held
        (ResourceExhausted past that: delete one first). Redefining a held name is always allowed."""
        known = self.backfills.get(trait.name)
        if known is not None and known.trait == trait:
            return known
        if known is None and len(self.backfills) >= self.max_computed_traits:
            raise ResourceExhausted(
                f"{len(self.backfills)} computed traits are defined, the most this deployment holds "
                f"(CDP_PROFILE_MAX_COMPUTED_TRAITS={self.max_computed_traits}); delete one first",
                retry_after=60.0,
                reason="computed_traits_exhausted",
            )
        backfill = Backfill(trait=trait, defined_at=self.clock())
        if known is not None:
            for profile in self.profiles.values():
                profile.drop_computed(trait.name)
        self.backfills[trait.name] = backfill
        self.defs = ComputedTraits([b.trait for b in self.backfills.values()])
        await self._commit({}, ops=[Put(DEFINITIONS, trait.name, backfill.doc())])
        self._tasks.append(asyncio.create_task(self._backfill(backfill), name=f"backfill {trait.name}"))
        return backfill

    async def undefine(self, name: str) -> None:
        if name not in self.backfills:
            raise NotFound(f"no computed trait named {name!r}", reason="unknown_trait")
        del self.backfills[name]
        self.defs = ComputedTraits([b.trait for b in self.backfills.values()])
        for person, profile in self.profiles.items():
            profile.drop_computed(name)
            self._pending.dirty.add(person)
        await self._commit({}, ops=[Delete(DEFINITIONS, name)])

    async def _backfill(self, backfill: Backfill, *, chunk: int = 500) -> None:
        """Replay the retained timelines into a new definition, reporting progress as it goes."""
        persons = sorted(self.profiles)
        backfill.total, backfill.done = len(persons), 0
        name = backfill.trait.name
        for start in range(0, len(persons), chunk):
            if self.backfills.get(name) is not backfill:
                return  # replaced or removed meanwhile
            now = self.clock()
            changes: dict[str, ProfileChange] = {}
            for person in persons[start : start + chunk]:
                profile = self.profiles.get(person)
                if profile is not None:
                    self._fold(changes, person, profile.backfill(backfill.trait, now=now))
                    self._pending.dirty.add(person)
                    self._schedule_expiry(profile)
            backfill.done = min(backfill.total, start + chunk)
            messages = self._messages(changes, cause="backfill", now=now)
            await self._commit(changes, ops=[Put(DEFINITIONS, name, backfill.doc())])
            await self._publish(None, messages)
            await asyncio.sleep(0)  # let the stream path run between chunks
        if self.backfills.get(name) is backfill:
            backfill.state = "ready"
            backfill.done = backfill.total
            await self._commit({}, ops=[Put(DEFINITIONS, name, backfill.doc())])
            log.info("computed trait %s backfilled over %d profiles", name, backfill.total)

    # --- expiry of windowed computed traits --------------------------------------------------------

    def _schedule_expiry(self, profile: Profile) -> None:
        """Remember when the profile's windowed values next change; one heap entry per earlier time."""
        due = profile.next_expiry()
        if due is None:
            return
        scheduled = self._expiry_due.get(profile.person_id)
        if scheduled is None or due < scheduled:
            self._expiry_due[profile.person_id] = due
            heapq.heappush(self._expiries, (due, profile.person_id))

    async def expire_due(self) -> int:
        """Apply every expiry due now; returns the number of profiles whose values changed."""
        now = self.clock()
        changes: dict[str, ProfileChange] = {}
        seen: set[str] = set()
        while self._expiries and self._expiries[0][0] <= now:
            due, person = heapq.heappop(self._expiries)
            if self._expiry_due.get(person) != due:
                continue  # superseded by an earlier time, already handled
            del self._expiry_due[person]
            profile = self.profiles.get(person)
            if profile is None or person in seen:
                continue
            seen.add(person)
            self._fold(changes, person, profile.expire(self.defs, now=now))
            self._schedule_expiry(profile)
        if changes:
            messages = self._messages(changes, cause="expiry", now=now)
            await self._commit(changes)
            await self._publish(None, messages)
        return len(changes)

    async def _expiry_loop(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.expire_due()
            except Exception as exc:  # the next round tries again; the values are computed on read too
                log.warning("expiry round failed: %r", exc)

    # --- privacy ----------------------------------------------------------------------------------

    async def delete(self, person_id: str, *, suppress: bool, request_id: str | None) -> dict[str, Any]:
        request_id = request_id or uuid.uuid4().hex
        done = await self.store.get(DELETIONS, request_id)
        if done is not None:
            return done.doc["result"]
        profile = await self.profile(person_id)
        person = profile.person_id
        self._owned_profile_or_fail(person)
        view = profile.view(now=self.clock())
        origins = [person, *view.merged_from]
        hashes = sorted(identifier_hash(k) for k in profile.identifiers())
        ops: list[Put | Delete] = []
        timeline_keys = set()
        for origin in origins:
            async for record in self.store.scan_all(TIMELINE, prefix=f"{origin}|"):
                timeline_keys.add(record.key)
        timeline_keys.update(timeline_key(e) for e in profile.events(limit=1_000_000)[0])
        ops.extend(Delete(TIMELINE, key) for key in sorted(timeline_keys))
        now = self.clock()
        # Absorbed persons' tombstones and the person itself become bare markers: no personal data,
        # just enough to drop events that were already in flight.
        self.profiles.pop(person, None)
        self._pending.dirty.discard(person)
        for origin in origins:
            self.tombstones.pop(origin, None)
            self.deleted[origin] = now
            ops.append(self._versioned_put(origin, {"deleted_at": now, "request_id": request_id}))
        result = {
            "request_id": request_id,
            "person_id": person,
            "identifiers": len(hashes),
            "timeline_events": len(timeline_keys),
            "suppressed": suppress,
        }
        notice = privacy_pb2.PrivacyDeleted(
            request_id=request_id,
            person_id=person,
            identifier_hashes=hashes,
            suppress=suppress,
            at=seconds_to_timestamp(now),
            merged_person_ids=origins[1:],
        )
        ops.append(
            Put(DELETIONS, request_id, {"result": result, "notice": notice.SerializeToString().hex(), "pending": True})
        )
        # Checkpoints keep the change messages of their batch until published; those already published
        # may still hold the person's values, so they go too.
        for subject, seq in self.applied.items():
            if subject not in self._publishing and subject not in self.unpublished:
                ops.append(Put(CHECKPOINTS, subject, {"stream_seq": seq, "at": now, "changes": []}))
        # The others still need theirs until they are published; they are cleared right after.
        self._scrub.update(self._publishing, self.unpublished)
        gone = ProfileChange(person_id=person, removed=True)
        messages = self._messages({person: gone}, cause="delete", now=now)
        await self._commit({}, ops=ops)
        await self._publish_deletions()
        await self._publish(None, messages)
        await self.store.erase()  # the deletion is durable: no bytes of the person left in the files
        log.info("person deleted", extra={"person": person, "request_id": request_id, "suppress": suppress})
        return result

    async def _publish_deletions(self) -> None:
        """Publish privacy.deleted notices written but not yet published, then drop the hashes."""
        # Only the unpublished ones: the collection keeps every request's result for idempotency.
        for record in await self.store.find(DELETIONS, "pending", True, limit=1000):
            notice = record.doc["notice"]
            results = await self.publisher.publish_batch(
                [OutMessage(subject=DELETED_SUBJECT, payload=bytes.fromhex(notice), msg_id=f"privacy:{record.key}")]
            )
            if results[0].ok:
                await self.store.put(DELETIONS, record.key, {"result": record.doc["result"], "published": True})
            else:
                raise Unavailable(f"privacy.deleted not stored by JetStream ({results[0].error}); retry the request")
