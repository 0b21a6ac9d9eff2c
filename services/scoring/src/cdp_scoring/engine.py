"""The scoring engine: profile fields held in memory, the models, and the wiring of the parts.

Where a rule lives:
- deployments.py: the registry of model versions, its storage and announcements, the sessions;
- stream.py: `profiles.changed.<p>` on the kit's partitioned engine, partitions restored from the
  snapshot plus the stream and dropped as ownership moves, snapshots at quiescent points;
- rounds.py: scoring what changed, a round at a time across partitions;
- requests.py: the synchronous paths (gRPC);
- drift.py: the scored rows counted against each version's training reference;
- published.py: what each person's scores were when last published (an update that changes nothing is
  not published);
- this module: the held fields (cdp_kit.held) and how a profile change updates them.

The fields are state derived from the `PROFILES` stream, and that stream is their log: nothing is
written per change. They are snapshotted (`scoring_fields`, and the stream position each partition's
snapshot includes in `scoring_snapshots`) at points where every change applied has its scores durable,
and a partition comes back from its snapshot plus a replay of the stream up to the engine's checkpoint.
Invariant: what the held fields of a partition include never runs ahead of the scores made durable for
it, except between a batch's apply and its commit - and the batch is applied again after a crash or a
failed commit on fields rebuilt without it, so its changes are scored again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import orjson

from cdp.profile.v1 import profile_pb2
from cdp_kit.bus import Partitioner, subjects
from cdp_kit.held import Codec, HeldFields, ProfileSource
from cdp_kit.profile_fields import COMPUTED, CONSENT, SCORES, TRAITS, value_to_python
from cdp_kit.storage import Put, Store, VersionConflict
from cdp_kit.telemetry import LATENCY_BUCKETS_MS, Telemetry
from cdp_kit.timestamps import to_seconds
from cdp_scoring.deployments import MODELS, Deployments
from cdp_scoring.domain.registry import ModelEntry, Registry
from cdp_scoring.drift import DriftMonitor
from cdp_scoring.modelstore import ModelStore
from cdp_scoring.published import EPOCH_KEY, PUBLISHED, STAMP, LastPublished
from cdp_scoring.requests import Requests
from cdp_scoring.requests import ScoreResult as ScoreResult  # re-exported: the API reads it from here
from cdp_scoring.rounds import Rounds, VersionStats
from cdp_scoring.runtime import LoadedModel

log = logging.getLogger("cdp.scoring.engine")

SERVICE = "scoring"
FIELDS = "scoring_fields"
# The stream position each partition's snapshot of the fields includes, keyed by its subject. The
# partitioned engine's own checkpoints (`scoring_checkpoints`, the same keys) run ahead of them: they
# say up to where scores are durable.
SNAPSHOTS = "scoring_snapshots"
CHECKPOINTS = subjects.checkpoints_collection(SERVICE)
# Written once SNAPSHOTS holds the positions (before the engine, they were kept in CHECKPOINTS).
LAYOUT = "$layout"
MODELS_CHANGED = subjects.SCORING_MODELS_CHANGED
# Kept with a person's fields: the time of the latest change applied (no profile field starts with "$").
CHANGED_AT = "$changed_at"
# The roots of flat field keys (cdp_kit.profile_fields), as prefixes.
_COMPUTED, _TRAITS, _CONSENT, _SCORES = (root + "." for root in (COMPUTED, TRAITS, CONSENT, SCORES))
_ABSENT = object()

TraitDefiner = Callable[[Sequence[Mapping[str, Any]]], Awaitable[None]]


class ScoringEngine(Deployments, Rounds, Requests):
    def __init__(
        self,
        store: Store,
        models: ModelStore,
        publisher,
        *,
        partitions: int,
        telemetry: Telemetry,
        threads: int = 1,
        profile_source: ProfileSource | None = None,
        define_traits: TraitDefiner | None = None,
        announce: Callable[[str], Awaitable[None]] | None = None,
        round_linger: float = 0.005,
        clock: Callable[[], float] = time.time,
        drift: DriftMonitor | None = None,
        resolution: int | None = None,
    ) -> None:
        self.store = store
        self.model_store = models
        self.publisher = publisher
        self.partitions = partitions
        # Partitions whose fields are complete: restored, and applied up to where the engine has got.
        self.ready: set[int] = set()
        # True from a quiescent point (stream.py) until the next batch is applied: a snapshot's copy of
        # the fields is taken only then.
        self.at_cut = False
        self.threads = threads
        self.define_traits = define_traits
        self.announce = announce
        self.round_linger = round_linger
        self.clock = clock
        # Counts the rows the stream path scores into each version's drift bins (drift.py).
        self.drift = drift
        self.registry = Registry()
        self.sessions: dict[tuple[str, str], LoadedModel] = {}
        self.stats: dict[tuple[str, str], VersionStats] = {}
        self._partition = Partitioner(partitions)
        # Each person's flat fields, snapshotted with the stream positions they include (see cdp_kit.held).
        self.held: HeldFields[dict[str, Any]] = HeldFields(
            store,
            collection=FIELDS,
            checkpoints=SNAPSHOTS,
            owns=lambda person: self._partition(person) in self.ready,
            codec=FIELDS_CODEC,
            fetch=profile_source,
            versioned=True,
            behind=lambda: not self.at_cut,
            clock=clock,
            chunk=256,
        )
        self.fields = self.held.persons
        # The persons PRIVACY's privacy.deleted notices name (person -> request id), read at start, and the
        # same by partition: erased from each partition as it is restored, their changes skipped (notices.py).
        self.deleted: dict[str, str] = {}
        self.deleted_by_partition: dict[int, dict[str, str]] = {}
        # What each person's scores were when last published, kept in the fields (published.py);
        # `resolution`: decimal places published scores are rounded to (None: as the model gives them).
        self.published = LastPublished(self.fields, decimals=resolution)
        # score name -> the model producing it (rebuilt when the registry changes)
        self._score_models: dict[str, str] = {}
        # (model, version) -> (its spec, score name -> place in its order): `_score_positions`
        self._positions: dict[tuple[str, str], tuple[Any, dict[str, int]]] = {}
        # "m:<model>" -> the stored version of the model's registry entry
        self.versions: dict[str, int] = {}
        # field path -> models reading it (rebuilt when the registry changes)
        self._readers: dict[str, set[str]] = {}
        self._registry_lock = asyncio.Lock()
        self._round: list[tuple[int, dict[str, set[str]], dict[str, float], asyncio.Future, float]] = []
        self._round_ready = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        # Models whose live version is to score the persons held (deployments.py: score_held), in order.
        self._held_pending: dict[str, None] = {}
        self._held_task: asyncio.Task | None = None
        # Partitions being restored and checked (stream.py's start_partition): a pass over the persons held
        # waits for none to be (deployments.py: `arriving`), so that partitions taken one after the other
        # (a start) are scored in one pass, not one pass each.
        self._arriving = 0
        self._arrived = asyncio.Event()
        self._arrived.set()
        # A snapshot of the fields copied from the call on, written (stream.py's `snapshot_since`, set by
        # `scoring_stream`; None: no stream, nothing to snapshot): a pass that publishes outside the stream
        # path takes one, so that the stamps it hands out outlive a crash (requests.py: `_stamps_durable`).
        self.snapshot_fields: Callable[[], Awaitable[bool]] | None = None
        meter = telemetry.meter
        self._m_rows = meter.create_counter(
            "cdp.scoring.rows", unit="{row}", description="rows scored, by model, version and role"
        )
        self._m_published = meter.create_counter(
            "cdp.scoring.scores.published", unit="{score}", description="score updates published, by model"
        )
        self._m_unchanged = meter.create_counter(
            "cdp.scoring.scores.unchanged",
            unit="{score}",
            description="score updates not published: version and values as last published, by model",
        )
        self._m_not_finite = meter.create_counter(
            "cdp.scoring.scores.not_finite",
            unit="{score}",
            description="score updates not published: a score was not a finite number (NaN, an infinity), by model",
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
            description="profile change to its scores computed, per batch (its oldest change); they are "
            "published once the batch is durable (cdp.engine.commit.duration, cdp.engine.publish.duration)",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        self._m_round_wait = meter.create_histogram(
            "cdp.scoring.round.wait.duration",
            unit="ms",
            description="time a batch's persons waited for their scoring round to start (the linger, and the "
            "round before it)",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        self._m_restore = meter.create_histogram(
            "cdp.scoring.restore.duration",
            unit="ms",
            description="time to bring a partition's fields from its snapshot up to the engine's checkpoint",
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
        """The registry and its sessions; the fields come partition by partition (stream.py)."""
        async for record in self.store.scan_all(MODELS):
            entry = ModelEntry.from_doc(record.doc)
            self.registry.models[entry.name] = entry
            self.versions[f"m:{entry.name}"] = record.version
        for version in self.registry.active():
            await self._load_session(version)
        self._reindex()
        await self._move_snapshot_positions()
        await self._read_published_epoch()
        self._tasks.append(asyncio.create_task(self._scoring_loop(), name="scoring rounds"))

    async def _move_snapshot_positions(self) -> None:
        """Before the partitioned engine, the snapshot's positions were the only checkpoints (in
        CHECKPOINTS, the keys the engine now uses for its own). Once, copy them to SNAPSHOTS; the engine
        then starts from them too, and scores again what came after (duplicates, never a gap)."""
        if await self.store.get(SNAPSHOTS, LAYOUT) is not None:
            return
        positions = [
            Put(SNAPSHOTS, record.key, record.doc)
            async for record in self.store.scan_all(CHECKPOINTS)
            if not record.key.startswith("$")
        ]
        try:
            # expected_version=0: only if no replica did it meanwhile (its engine may have moved on).
            await self.store.bulk_write([*positions, Put(SNAPSHOTS, LAYOUT, {"version": 1}, expected_version=0)])
        except VersionConflict:
            pass

    async def _read_published_epoch(self) -> None:
        """The stored epoch of the last-published entries (published.py): one raised by a ScoreAll here
        or on another replica makes every entry written before it unknown."""
        record = await self.store.get(SNAPSHOTS, EPOCH_KEY)
        epoch = record.doc.get("epoch", 0) if record is not None else 0
        self.published.epoch = max(self.published.epoch, epoch)

    async def raise_published_epoch(self) -> None:
        """Before publishing outside the partitions' pipelines (ScoreAll): no entry written before now
        counts, here or after a restart (the epoch is stored first)."""
        record = await self.store.get(SNAPSHOTS, EPOCH_KEY)
        epoch = max(self.published.epoch, record.doc.get("epoch", 0) if record is not None else 0) + 1
        await self.store.put(SNAPSHOTS, EPOCH_KEY, {"epoch": epoch})
        self.published.epoch = epoch

    def background(self, coro, name: str) -> asyncio.Task:
        """A task that lives no longer than the engine (it may finish early, unlike a runtime loop)."""
        self._tasks = [task for task in self._tasks if not task.done()]
        task = asyncio.create_task(coro, name=name)
        self._tasks.append(task)
        return task

    async def stop(self) -> None:
        """After the stream has released its partitions (their last snapshot is written then)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    # --- the fields ---------------------------------------------------------------------------------

    async def load_partition(self, partition: int, *, page_size: int = 2000) -> int:
        """Forget what is held of `partition`, load its persons from the last snapshot; the stream
        position that snapshot includes."""
        subject = subjects.profiles_changed(partition)
        self.ready.discard(partition)
        partition_of = self._partition
        stamps = {
            person: held_stamps
            for person, held in self.fields.items()
            if partition_of(person) == partition
            and (held_stamps := {k: v for k, v in held.items() if k.startswith(STAMP)})
        }
        self.held.forget(lambda person: partition_of(person) == partition)
        self.held.applied.pop(subject, None)
        record = await self.store.get(SNAPSHOTS, subject)
        position = record.doc.get("stream_seq", 0) if record is not None else 0
        self.held.snapshotted[subject] = position
        await self._read_published_epoch()
        decode = FIELDS_CODEC.decode
        async for record in self.store.scan_all(FIELDS, page_size=page_size):
            if self._partition(record.key) == partition:
                self.fields[record.key] = decode(record.doc)
                self.held.versions[record.key] = record.version
        # A partition rebuilt here (a failed batch) keeps the stamps it held: updates stamped after the
        # snapshot (a ScoreAll's, the batches before the checkpoint) are published, and the replay does not
        # bring their stamps back (published.py: stamps never go backwards).
        for person, held in stamps.items():
            fields = self.fields.get(person)
            if fields is not None:
                raised = False
                for key, at in held.items():
                    if fields.get(key, -1) < at:
                        fields[key] = at
                        raised = True
                if raised:
                    self.held.mark(person)
        return position

    def forget_partition(self, partition: int) -> None:
        """`partition` went to another replica: nothing of it is held, written or deleted here any more."""
        self.ready.discard(partition)
        self.held.forget(lambda person: self._partition(person) == partition)
        subject = subjects.profiles_changed(partition)
        self.held.applied.pop(subject, None)
        self.held.snapshotted.pop(subject, None)

    def replay_message(self, data: bytes) -> int:
        """Apply one `profiles.changed` message to the fields without scoring (its scores were made
        durable when it was first applied). Returns the changes applied."""
        applied = 0
        for change in profile_pb2.ProfileChangedBatch.FromString(data).changes:
            if change.person_id:
                self._apply_change(change)
                # Its scores may have been published after the snapshot: unknown, published next time.
                self.published.forget(change.person_id)
                applied += 1
        return applied

    def apply_batch(
        self, messages: Iterable[profile_pb2.ProfileChangedBatch]
    ) -> tuple[dict[str, set[str]], dict[str, float], float]:
        """Apply a batch's changes to the fields, in stream order; fold them per person. Returns the
        persons to score (person -> the changed paths some model reads), each one's latest change time,
        and the batch's oldest change time (inf: none)."""
        touched: dict[str, set[str]] = {}
        changed_at: dict[str, float] = {}
        oldest = math.inf
        fields = self.fields
        for message in messages:
            for change in message.changes:
                person = change.person_id
                if not person:
                    continue
                at = to_seconds(change.at)
                if at < oldest:
                    oldest = at
                paths = self._apply_change(change, at)
                if person not in fields:  # removed: nothing to score
                    touched.pop(person, None)
                    changed_at.pop(person, None)
                    continue
                if paths:
                    known = touched.get(person)
                    if known is None:
                        touched[person] = paths
                    else:
                        known |= paths
                    changed_at[person] = max(changed_at.get(person, 0.0), at)
        return touched, changed_at, oldest

    def _apply_change(self, change: profile_pb2.ProfileChanged, at: float | None = None) -> set[str]:
        """Apply one profile change to the fields; the changed paths some model reads.

        The updates are those `cdp_kit.profile_fields.change_fields` reads from the change (None: the
        field is gone), then the change's time, applied as `cdp_kit.held.apply_updates` does; here in one
        pass over the change, with no mapping of updates in between: every change of the platform comes
        through here, and about half of them are echoes of scores just published (no model reads them)."""
        person = change.person_id
        if change.removed:
            self.held.remove(person)
            return set()
        if self.deleted and person in self.deleted:
            # A deletion notice names the person (notices.py): a change from before it (a replay, a consumer
            # created again at a restored store's checkpoint) brings nothing back and is not scored.
            return set()
        fields = self.fields.get(person)
        if fields is None:
            fields = self.fields[person] = {}
        get, changed = fields.get, []
        for root, values in ((_COMPUTED, change.computed), (_TRAITS, change.traits)):
            if values:
                for name, value in values.items():
                    kind = value.WhichOneof("kind")
                    if kind == "number_value":
                        new = value.number_value
                    elif kind == "string_value":
                        new = value.string_value
                    else:
                        new = value_to_python(value)
                    path = root + name
                    if new is None:
                        if fields.pop(path, None) is not None:
                            changed.append(path)
                    elif get(path, _ABSENT) != new:
                        fields[path] = new
                        changed.append(path)
        if change.consent:
            for key, granted in change.consent.items():
                path = _CONSENT + key
                if get(path, _ABSENT) != granted:
                    fields[path] = granted
                    changed.append(path)
        echoed = None
        if change.scores:
            for name, score in change.scores.items():
                path = _SCORES + name
                if get(path, _ABSENT) != score:
                    fields[path] = score
                    changed.append(path)
                    if echoed is None:
                        echoed = [path]
                    else:
                        echoed.append(path)
        changed_at = to_seconds(change.at) if at is None else at
        if get(CHANGED_AT, _ABSENT) != changed_at:
            fields[CHANGED_AT] = changed_at
            changed.append(CHANGED_AT)
        if not changed:
            return set()
        self.held.mark(person)
        if echoed is not None and PUBLISHED in fields:
            self.published.check_echo(person, fields, echoed, self._score_models, self._score_positions)
        readers = self._readers
        return {p for p in changed if p in readers}

    def _score_positions(self, model: str, version: str) -> Mapping[str, int] | None:
        """A registered version's score names -> their place in its order (None: not registered). Kept
        per version while the registry holds the same spec for it (every score echo asks)."""
        entry = self.registry.models.get(model)
        found = entry.versions.get(version) if entry is not None else None
        if found is None:
            return None
        spec = found.spec
        known = self._positions.get((model, version))
        if known is None or known[0] is not spec:
            known = self._positions[(model, version)] = (spec, {n: i for i, n in enumerate(spec.score_names)})
        return known[1]


# A person's fields as stored: one JSON string (the fields are many small values; one string is cheaper
# to store and to load than a document of them).
FIELDS_CODEC: Codec[dict[str, Any], dict[str, Any]] = Codec(
    copy=dict.copy,
    encode=lambda fields: {"fields": orjson.dumps(fields).decode()},
    decode=lambda doc: orjson.loads(doc["fields"]),
)
