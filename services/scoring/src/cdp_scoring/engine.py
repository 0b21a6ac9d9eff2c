"""The scoring engine: the stream in, profile fields held in memory, and the wiring of the parts.

Where a rule lives:
- deployments.py: the registry of model versions, its storage and announcements, the sessions;
- rounds.py: scoring what changed, a round at a time across partitions, and publishing the scores;
- requests.py: the synchronous paths (gRPC);
- this module: `profiles.changed.<p>` in, the held fields (cdp_kit.held), replay and snapshots.

Online path, per batch of `profiles.changed.<p>` messages:
1. each change updates the person's flat fields ("computed.orders_90d" -> 3); the batch is folded so a
   burst of changes to one person is scored once;
2. models whose inputs changed are run, one matrix per model version (live or, for a canary's share of
   persons, the canary; shadow versions beside them, compared and never published);
3. the scores go out columnar, one `ScoresUpdatedBatch` per model version on `scores.updated.<p>`, which
   the profile service stores as profile fields; the batch is acknowledged once JetStream has them.

The fields are state derived from the `PROFILES` stream, and that stream is their log: they are
snapshotted to the store every few seconds with the stream position they include, and a restart loads
the snapshot and replays the stream from that position up to where the consumer had got (no scoring
while replaying: those scores were published before). Nothing is written per change, so the store is
not on the latency path. A redelivered message (its first delivery failed, or the process died before
acknowledging it) re-scores its persons whether or not their fields look changed, so no score is lost.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import orjson
from google.protobuf.message import DecodeError

from cdp.profile.v1 import profile_pb2
from cdp_kit.bus import Delivery, Partitioner, subjects
from cdp_kit.held import Codec, HeldFields, ProfileSource, apply_updates
from cdp_kit.profile_fields import change_fields
from cdp_kit.storage import Store
from cdp_kit.telemetry import LATENCY_BUCKETS_MS, Telemetry
from cdp_kit.timestamps import to_seconds
from cdp_scoring.deployments import MODELS, Deployments
from cdp_scoring.domain.registry import ModelEntry, Registry
from cdp_scoring.modelstore import ModelStore
from cdp_scoring.requests import Requests
from cdp_scoring.requests import ScoreResult as ScoreResult  # re-exported: the API reads it from here
from cdp_scoring.rounds import Rounds, VersionStats
from cdp_scoring.runtime import LoadedModel

log = logging.getLogger("cdp.scoring.engine")

FIELDS = "scoring_fields"
CHECKPOINTS = subjects.checkpoints_collection("scoring")
MODELS_CHANGED = subjects.SCORING_MODELS_CHANGED
# Kept with a person's fields: the time of the latest change applied (no profile field starts with "$").
CHANGED_AT = "$changed_at"

TraitDefiner = Callable[[Sequence[Mapping[str, Any]]], Awaitable[None]]


class ScoringEngine(Deployments, Rounds, Requests):
    def __init__(
        self,
        store: Store,
        models: ModelStore,
        publisher,
        *,
        partitions: int,
        owned: Iterable[int],
        telemetry: Telemetry,
        threads: int = 1,
        profile_source: ProfileSource | None = None,
        define_traits: TraitDefiner | None = None,
        announce: Callable[[str], Awaitable[None]] | None = None,
        snapshot_interval: float = 10.0,
        round_linger: float = 0.005,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.model_store = models
        self.publisher = publisher
        self.partitions = partitions
        self.owned = frozenset(owned)
        self.threads = threads
        self.define_traits = define_traits
        self.announce = announce
        self.snapshot_interval = snapshot_interval
        self.round_linger = round_linger
        self.clock = clock
        self.registry = Registry()
        self.sessions: dict[tuple[str, str], LoadedModel] = {}
        self.stats: dict[tuple[str, str], VersionStats] = {}
        self._partition = Partitioner(partitions)
        # Each person's flat fields, snapshotted with the stream positions they include (see cdp_kit.held).
        self.held: HeldFields[dict[str, Any]] = HeldFields(
            store,
            collection=FIELDS,
            checkpoints=CHECKPOINTS,
            owns=lambda person: self._partition(person) in self.owned,
            codec=FIELDS_CODEC,
            fetch=profile_source,
            versioned=True,
            clock=clock,
            chunk=256,
        )
        self.fields = self.held.persons
        # partition subject -> the last stream position the fields include (snapshotted with them)
        self.applied = self.held.applied
        self.snapshotted = self.held.snapshotted
        # "m:<model>" -> the stored version of the model's registry entry
        self.versions: dict[str, int] = {}
        # field path -> models reading it (rebuilt when the registry changes)
        self._readers: dict[str, set[str]] = {}
        self._registry_lock = asyncio.Lock()
        self._round: list[tuple[dict[str, set[str]], dict[str, float], set[str], asyncio.Future]] = []
        self._round_ready = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        meter = telemetry.meter
        self._m_rows = meter.create_counter(
            "cdp.scoring.rows", unit="{row}", description="rows scored, by model, version and role"
        )
        self._m_published = meter.create_counter(
            "cdp.scoring.scores.published", unit="{score}", description="score updates published, by model"
        )
        self._m_inference = meter.create_histogram(
            "cdp.scoring.inference.duration",
            unit="ms",
            description="time to score one model's rows of a round (waiting for its batched onnxruntime call included)",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        self._m_freshness = meter.create_histogram(
            "cdp.scoring.freshness",
            unit="ms",
            description="profile change to published scores, per batch (its oldest change)",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        self._m_shadow = meter.create_histogram(
            "cdp.scoring.shadow.abs_diff",
            unit="1",  # a score's own scale: a probability, or a CLV in currency units
            description="absolute difference between a shadow or canary version's score and live's",
            explicit_bucket_boundaries_advisory=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 10, 100),
        )

    # --- life cycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """The registry and its sessions, then the last snapshot of the fields (see `replay`)."""
        async for record in self.store.scan_all(MODELS):
            entry = ModelEntry.from_doc(record.doc)
            self.registry.models[entry.name] = entry
            self.versions[f"m:{entry.name}"] = record.version
        for version in self.registry.active():
            await self._load_session(version)
        self._reindex()
        await self.held.load()
        self._tasks.append(asyncio.create_task(self._snapshot_loop(), name="scoring snapshots"))
        self._tasks.append(asyncio.create_task(self._scoring_loop(), name="scoring rounds"))

    def background(self, coro, name: str) -> None:
        """A task that lives no longer than the engine (it may finish early, unlike a runtime loop)."""
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        try:
            await self.snapshot()
        except Exception as exc:  # the next start replays further back instead; nothing is lost
            log.warning("final snapshot failed: %r", exc)

    async def replay(self, messages: AsyncIterator[tuple[str, int, bytes]]) -> int:
        """Bring the fields from the snapshot up to where the consumer had got: apply (subject, stream
        position, payload) in stream order, without scoring. Returns the changes applied."""
        return await self.held.replay(messages, self._replay_message)

    async def _replay_message(self, _subject: str, _seq: int, data: bytes) -> int:
        applied = 0
        for change in profile_pb2.ProfileChangedBatch.FromString(data).changes:
            if change.person_id:
                self._apply_change(change)
                applied += 1
        return applied

    # --- the stream path --------------------------------------------------------------------------

    async def handle(self, batch: Sequence[Delivery]) -> None:
        """Consumer handler for `profiles.changed.<p>`: apply, score, publish; acknowledged after."""
        subject = batch[0].subject
        applied = self.applied.get(subject, 0)
        touched: dict[str, set[str]] = {}
        changed_at: dict[str, float] = {}
        forced: set[str] = set()
        oldest = math.inf
        for delivery in batch:
            message = profile_pb2.ProfileChangedBatch()
            try:
                message.ParseFromString(delivery.data)
            except DecodeError as exc:
                delivery.reject("invalid_message", f"not a cdp.profile.v1.ProfileChangedBatch: {exc}")
                continue
            if delivery.stream_seq <= applied:
                # Applied before (by the replay, or by an attempt whose scores JetStream did not store):
                # applying it again could take the fields back in time. Its persons are scored again on
                # what they hold now, as of their latest change.
                for change in message.changes:
                    fields = self.fields.get(change.person_id)
                    if fields is not None:
                        forced.add(change.person_id)
                        touched.setdefault(change.person_id, set())
                        changed_at[change.person_id] = fields.get(CHANGED_AT, 0.0)
                continue
            again = getattr(delivery, "num_delivered", 1) > 1
            for change in message.changes:
                person = change.person_id
                if not person:
                    continue
                at = to_seconds(change.at)
                if at < oldest:
                    oldest = at
                paths = self._apply_change(change, at)
                if person not in self.fields:
                    touched.pop(person, None)
                    forced.discard(person)
                    continue
                if again:
                    forced.add(person)
                if paths or again:
                    known = touched.get(person)
                    if known is None:
                        touched[person] = paths
                    else:
                        known |= paths
                    changed_at[person] = max(changed_at.get(person, 0.0), at)
        self.applied[subject] = max(self.applied.get(subject, 0), batch[-1].stream_seq)
        if touched:
            # Scored and published with what the other partitions' handlers submitted meanwhile; a failure
            # fails the batch, whose retry re-scores its persons (its positions are applied by then).
            future = asyncio.get_running_loop().create_future()
            self._round.append((touched, changed_at, forced, future))
            self._round_ready.set()
            await future
            if oldest is not math.inf:
                self._m_freshness.record(max(0.0, (self.clock() - oldest) * 1000))

    def _apply_change(self, change: profile_pb2.ProfileChanged, at: float | None = None) -> set[str]:
        """Apply one profile change to the fields; the changed paths some model reads."""
        person = change.person_id
        if change.removed:
            self.held.remove(person)
            return set()
        updates = change_fields(change)
        updates[CHANGED_AT] = to_seconds(change.at) if at is None else at
        return self._apply(person, updates)

    def _apply(self, person: str, updates: Mapping[str, Any]) -> set[str]:
        fields = self.fields.get(person)
        if fields is None:
            fields = self.fields[person] = {}
        changed = apply_updates(fields, updates)
        if changed:
            self.held.mark(person)
        readers = self._readers
        return {p for p in changed if p in readers}

    # --- snapshots ------------------------------------------------------------------------------------

    async def _snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(self.snapshot_interval)
            try:
                await self.snapshot()
            except Exception as exc:  # kept dirty: the next round writes them; a restart replays further
                log.warning("fields snapshot failed (%r); retrying in %.0fs", exc, self.snapshot_interval)

    async def snapshot(self) -> int:
        """Write the fields changed since the last snapshot, then the stream positions they include
        (`cdp_kit.held`): a crash mid-way leaves positions older than some fields, and the replay from
        there applies the same changes again in order, ending in the same state."""
        return await self.held.snapshot()


# A person's fields as stored: one JSON string (the fields are many small values; one string is cheaper
# to store and to load than a document of them).
FIELDS_CODEC: Codec[dict[str, Any], dict[str, Any]] = Codec(
    copy=dict.copy,
    encode=lambda fields: {"fields": orjson.dumps(fields).decode()},
    decode=lambda doc: orjson.loads(doc["fields"]),
)
