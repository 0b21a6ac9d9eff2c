"""The scoring engine: profile fields in memory, models in sessions, scores on the bus.

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

Registry changes (deploy, promote, rollback) are stored, then announced on `scoring.models.changed` so
every replica reloads the entry: hot reload, without dropping a request (a request holds the session it
started with).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from google.protobuf.message import DecodeError

from cdp.profile.v1 import profile_pb2
from cdp.scoring.v1 import scoring_pb2
from cdp_kit.bus import Delivery, OutMessage, Partitioner, subjects
from cdp_kit.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from cdp_kit.held import Codec, HeldFields, ProfileSource, apply_updates
from cdp_kit.profile_fields import change_fields
from cdp_kit.storage import Put, Store
from cdp_kit.telemetry import LATENCY_BUCKETS_MS, Telemetry
from cdp_scoring.domain.registry import CANARY, LIVE, SHADOW, ModelEntry, Registry, Version
from cdp_scoring.modelstore import ModelStore
from cdp_scoring.runtime import LoadedModel, load_model

log = logging.getLogger("cdp.scoring.engine")

MODELS = "scoring_models"
FIELDS = "scoring_fields"
CHECKPOINTS = subjects.checkpoints_collection("scoring")
MODELS_CHANGED = subjects.SCORING_MODELS_CHANGED
MAX_UPDATES_PER_MESSAGE = 2000
# Kept with a person's fields: the time of the latest change applied (no profile field starts with "$").
CHANGED_AT = "$changed_at"

TraitDefiner = Callable[[Sequence[Mapping[str, Any]]], Awaitable[None]]


@dataclass(slots=True)
class VersionStats:
    rows: int = 0
    diff_sum: float = 0.0
    diff_rows: int = 0

    @property
    def mean_abs_diff(self) -> float:
        return self.diff_sum / self.diff_rows if self.diff_rows else 0.0


@dataclass(slots=True)
class ScoreResult:
    model: str
    version: str
    role: str
    scores: dict[str, float]
    features: list[float]


class ScoringEngine:
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
        self._m_rows = meter.create_counter("cdp_scoring_rows_total", description="rows scored, by model and role")
        self._m_published = meter.create_counter(
            "cdp_scoring_scores_published_total", description="score updates published, by model"
        )
        self._m_inference = meter.create_histogram(
            "cdp_scoring_inference_ms",
            unit="ms",
            description="time to score one model's rows of a round (waiting for its batched onnxruntime call included)",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        self._m_freshness = meter.create_histogram(
            "cdp_scoring_freshness_ms",
            unit="ms",
            description="profile change to published scores, per batch (its oldest change)",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        self._m_shadow = meter.create_histogram(
            "cdp_scoring_shadow_abs_diff",
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

    async def _load_session(self, version: Version) -> LoadedModel:
        key = (version.spec.name, version.version)
        loaded = self.sessions.get(key)
        if loaded is not None and loaded.sha256 == version.sha256:
            return loaded
        data = await self.model_store.get(version.spec.name, version.version, version.sha256)
        loaded = await asyncio.to_thread(load_model, data, threads=self.threads)
        self.sessions[key] = loaded
        self.stats.setdefault(key, VersionStats())
        return loaded

    def _reindex(self) -> None:
        readers: dict[str, set[str]] = {}
        for version in self.registry.active():
            for path in version.spec.paths:
                readers.setdefault(path, set()).add(version.spec.name)
        self._readers = readers

    # --- the registry -----------------------------------------------------------------------------

    async def deploy(self, data: bytes, *, role: str | None, canary_percent: float = 0.0) -> Version:
        loaded = await asyncio.to_thread(load_model, data, threads=self.threads)
        spec = loaded.spec
        async with self._registry_lock:
            version, created = self.registry.deploy(
                spec,
                sha256=loaded.sha256,
                size_bytes=loaded.size_bytes,
                role=role,
                canary_percent=canary_percent,
                now=self.clock(),
            )
            if not created:
                return version
            try:
                await self.model_store.put(spec.name, spec.version, data)
                if spec.computed_traits and self.define_traits is not None:
                    await self.define_traits(spec.computed_traits)
                await self._save_entry(spec.name)
            except BaseException:
                # Not stored: the registry must not keep a version it cannot load after a restart.
                entry = self.registry.models[spec.name]
                await self._reload_entry(spec.name)
                if not entry.versions:
                    self.registry.models.pop(spec.name, None)
                raise
            self.sessions[(spec.name, spec.version)] = loaded
            self.stats.setdefault((spec.name, spec.version), VersionStats())
            self._reindex()
        log.info(
            "model deployed",
            extra={"model": spec.name, "version": spec.version, "role": version.role, "sha256": loaded.sha256[:16]},
        )
        await self._announce(spec.name)
        return version

    async def promote(self, name: str, version: str) -> ModelEntry:
        async with self._registry_lock:
            target = self.registry.version(name, version)
            await self._load_session(target)
            self.registry.promote(name, version)
            await self._save_entry(name)
            self._reindex()
        log.info("model promoted", extra={"model": name, "version": version})
        await self._announce(name)
        return self.registry.get(name)

    async def rollback(self, name: str) -> ModelEntry:
        async with self._registry_lock:
            entry = self.registry.get(name)
            previous = next((entry.versions.get(v) for v in reversed(entry.previous) if v in entry.versions), None)
            if previous is not None:
                await self._load_session(previous)
            restored = self.registry.rollback(name)
            await self._save_entry(name)
            self._reindex()
        log.info("model rolled back", extra={"model": name, "version": restored.version})
        await self._announce(name)
        return self.registry.get(name)

    async def _save_entry(self, name: str) -> None:
        entry = self.registry.models[name]
        key = f"m:{name}"
        expected = self.versions.get(key, 0)
        await self.store.bulk_write([Put(MODELS, name, entry.to_doc(), expected_version=expected)])
        self.versions[key] = expected + 1

    async def _reload_entry(self, name: str) -> None:
        record = await self.store.get(MODELS, name)
        if record is None:
            self.registry.models.pop(name, None)
            self.versions.pop(f"m:{name}", None)
            return
        self.registry.models[name] = ModelEntry.from_doc(record.doc)
        self.versions[f"m:{name}"] = record.version

    async def _announce(self, name: str) -> None:
        if self.announce is not None:
            try:
                await self.announce(name)
            except Exception as exc:  # peers also reload on their next start; say so and carry on
                log.warning("could not announce the change of model %s to other replicas: %r", name, exc)

    async def reload(self, name: str) -> None:
        """Another replica changed a model: read its entry again and load the sessions it needs."""
        async with self._registry_lock:
            await self._reload_entry(name)
            entry = self.registry.models.get(name)
            if entry is not None:
                for version in entry.versions.values():
                    if version.role in (LIVE, SHADOW, CANARY):
                        await self._load_session(version)
            self._reindex()

    async def ensure_shipped(self, files: Iterable[bytes]) -> list[Version]:
        """Deploy the shipped models that no version of is registered yet (first start)."""
        deployed = []
        for data in files:
            loaded = await asyncio.to_thread(load_model, data, threads=self.threads)
            if loaded.spec.name in self.registry.models:
                continue
            deployed.append(await self.deploy(data, role=LIVE))
        return deployed

    async def ensure_traits(self) -> None:
        """Define on the profile service the computed traits every active version reads (idempotent there)."""
        if self.define_traits is None:
            return
        wanted: dict[str, Mapping[str, Any]] = {}
        for version in self.registry.active():
            for trait in version.spec.computed_traits:
                wanted.setdefault(trait["name"], trait)
        if wanted:
            await self.define_traits(list(wanted.values()))

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
                at = change.at.seconds + change.at.nanos / 1e9
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

    async def _scoring_loop(self) -> None:
        """Score what the partition handlers submitted, a round at a time: one onnxruntime call per model
        for every person of the round, however many partitions they came from. Nothing waits for a round
        to fill; under load, what arrives while one round is scored makes the next one bigger, which is
        when the fixed cost of a call matters most."""
        while True:
            await self._round_ready.wait()
            # A moment for the other partitions' handlers to join: a round costs every model it needs one
            # call whatever its size, and a call's fixed cost dominates a round of a handful of persons.
            await asyncio.sleep(self.round_linger)
            self._round_ready.clear()
            round_, self._round = self._round, []
            if not round_:
                continue
            touched: dict[str, set[str]] = {}
            changed_at: dict[str, float] = {}
            forced: set[str] = set()
            for part_touched, part_at, part_forced, _future in round_:
                for person, paths in part_touched.items():
                    touched.setdefault(person, set()).update(paths)
                    changed_at[person] = max(changed_at.get(person, 0.0), part_at.get(person, 0.0))
                forced |= part_forced
            try:
                messages = self._messages(await self._score_touched(touched, changed_at, forced))
                if messages:
                    results = await self.publisher.publish_batch(messages)
                    failed = [r for r in results if not r.ok]
                    if failed:
                        raise Unavailable(f"{len(failed)} score messages not stored by JetStream ({failed[0].error})")
            except Exception as exc:
                for *_parts, future in round_:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for *_parts, future in round_:
                if not future.done():
                    future.set_result(None)

    def _apply_change(self, change: profile_pb2.ProfileChanged, at: float | None = None) -> set[str]:
        """Apply one profile change to the fields; the changed paths some model reads."""
        person = change.person_id
        if change.removed:
            self.held.remove(person)
            return set()
        updates = change_fields(change)
        updates[CHANGED_AT] = change.at.seconds + change.at.nanos / 1e9 if at is None else at
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

    async def _score_touched(
        self, touched: Mapping[str, set[str]], changed_at: Mapping[str, float], forced: set[str] = frozenset()
    ) -> list[tuple[Version, list[str], np.ndarray, list[float]]]:
        """Score each touched person once per model whose inputs changed (every live model for a forced
        one): (version, persons, scores, change times) per version to publish."""
        readers = self._readers
        every = list(self.registry.models) if forced else []
        by_model: dict[str, list[str]] = {}
        for person, paths in touched.items():
            if person in forced:
                models = every
            elif len(paths) == 1:
                (path,) = paths
                models = readers.get(path, ())
            else:
                models = set()
                for path in paths:
                    models.update(readers.get(path, ()))
            for model in models:
                members = by_model.get(model)
                if members is None:
                    by_model[model] = [person]
                else:
                    members.append(person)
        rows: dict = {}
        entries = [e for e in (self.registry.models.get(name) for name in by_model) if e is not None]
        # Models run side by side: onnxruntime releases the GIL, so one model's trees are walked on the
        # other core while the next model's rows are assembled here.
        results = await asyncio.gather(*(self._run_entry(e, by_model[e.name], changed_at, rows) for e in entries))
        return [
            (version, members, scores, [changed_at.get(p, 0.0) for p in members])
            for result in results
            for version, members, scores in result
        ]

    async def _run_entry(
        self, entry: ModelEntry, persons: Sequence[str], at: Mapping[str, float] | float, rows: dict | None = None
    ) -> list[tuple[Version, list[str], np.ndarray]]:
        """Run each person's published version (live, or the canary for its share) and every shadow.

        Returns what to publish, per version. Shadows, and the canary's share, are also compared with
        what live gives the same persons (live is run for the comparison where it was not already)."""
        live, canary, shadows = entry.live, entry.canary, entry.shadows()
        if canary is None:
            groups = {live.version: list(persons)} if live is not None else {}
        else:
            groups = {}
            route = self.registry.route
            for person in persons:
                version = route(entry, person)
                if version is not None:
                    groups.setdefault(version.version, []).append(person)
        out = []
        by_version: dict[str, dict[str, np.ndarray]] = {}
        for version_name, members in groups.items():
            version = entry.versions[version_name]
            scores = await self._run(version, members, at, rows)
            if scores is None:
                continue
            by_version[version_name] = dict(zip(members, scores, strict=True))
            out.append((version, members, scores))
        if live is None or not (shadows or (canary is not None and canary.version in by_version)):
            return out
        live_scores = by_version.get(live.version, {})
        unscored = [p for p in persons if p not in live_scores]
        extra = await self._run(live, unscored, at, rows)
        if extra is not None:
            live_scores = {**live_scores, **dict(zip(unscored, extra, strict=True))}
        for shadow in shadows:
            scores = await self._run(shadow, persons, at, rows)
            if scores is not None:
                self._compare(shadow, live, dict(zip(persons, scores, strict=True)), live_scores)
        if canary is not None and canary.version in by_version:
            self._compare(canary, live, by_version[canary.version], live_scores)
        return out

    def _compare(
        self, other: Version, live: Version, scores: Mapping[str, np.ndarray], live_scores: Mapping[str, np.ndarray]
    ) -> None:
        stats = self.stats.setdefault((other.spec.name, other.version), VersionStats())
        live_names = live.spec.score_names
        common = [i for i, n in enumerate(other.spec.score_names) if n in live_names]
        if not common:
            return
        live_index = [live_names.index(other.spec.score_names[i]) for i in common]
        attrs = {"model": other.spec.name, "version": other.version, "role": other.role}
        for person, row in scores.items():
            base = live_scores.get(person)
            if base is None:
                continue
            diff = float(np.mean(np.abs(row[common] - base[live_index])))
            stats.diff_sum += diff
            stats.diff_rows += 1
            self._m_shadow.record(diff, attrs)

    async def _run(
        self, version: Version, persons: Sequence[str], at: Mapping[str, float] | float, rows: dict | None = None
    ) -> np.ndarray | None:
        """The scores of `version` for these persons. `rows` shares assembled matrices between models that
        read the same features (churn and propensity, the two fraud models) within one batch."""
        session = self.sessions.get((version.spec.name, version.version))
        if session is None or not persons:
            return None
        assembler = session.assembler
        key = (version.spec.features, tuple(persons))
        matrix = rows.get(key) if rows is not None else None
        if matrix is None:
            fields, empty = self.fields, {}
            people = [fields.get(person, empty) for person in persons]
            if isinstance(at, float):
                matrix = assembler.matrix(people, at)
            else:
                now = self.clock()
                matrix = assembler.matrix(people, [at.get(person, now) for person in persons])
            if rows is not None:
                rows[key] = matrix
        started = time.perf_counter()
        scores = await session.score(matrix)
        self._m_inference.record((time.perf_counter() - started) * 1000, {"model": version.spec.name})
        stats = self.stats.setdefault((version.spec.name, version.version), VersionStats())
        stats.rows += len(persons)
        self._m_rows.add(len(persons), {"model": version.spec.name, "version": version.version, "role": version.role})
        return scores

    def _messages(self, scored: Sequence[tuple[Version, list[str], np.ndarray, list[float]]]) -> list[OutMessage]:
        """One columnar `ScoresUpdatedBatch` per model version and person partition."""
        out = []
        for version, persons, scores, times in scored:
            rows: dict[int, list[int]] = {}
            for i, person in enumerate(persons):
                rows.setdefault(self._partition(person), []).append(i)
            names = version.spec.score_names
            for partition, index in rows.items():
                for start in range(0, len(index), MAX_UPDATES_PER_MESSAGE):
                    chunk = index[start : start + MAX_UPDATES_PER_MESSAGE]
                    batch = scoring_pb2.ScoresUpdatedBatch(
                        model=version.spec.name,
                        version=version.version,
                        scores=names,
                        person_ids=[persons[i] for i in chunk],
                        values=scores[chunk].ravel().tolist(),
                        at_ms=[round(times[i] * 1000) for i in chunk],
                    )
                    payload = batch.SerializeToString()
                    out.append(
                        OutMessage(
                            subject=subjects.scores_updated(partition),
                            payload=payload,
                            msg_id="su_" + hashlib.blake2b(payload, digest_size=16).hexdigest(),
                        )
                    )
            self._m_published.add(len(persons), {"model": version.spec.name})
        return out

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

    # --- synchronous paths (gRPC) -----------------------------------------------------------------

    async def person_fields(self, person_id: str) -> dict[str, Any]:
        fields = self.fields.get(person_id)
        if fields is not None:
            return fields
        fetched = await self.held.fetch(person_id)
        if fetched is not None:
            return fetched
        raise NotFound(f"no profile fields for person {person_id!r}", reason="unknown_person")

    def resolve_version(self, name: str, version: str, person: str | None) -> Version:
        entry = self.registry.get(name)
        if version:
            found = self.registry.version(name, version)
        else:
            found = self.registry.route(entry, person) if person else entry.live
            if found is None:
                raise FailedPrecondition(f"model {name!r} has no live version; name one", reason="no_live_version")
        return found

    def session(self, version: Version) -> LoadedModel:
        session = self.sessions.get((version.spec.name, version.version))
        if session is None:
            raise FailedPrecondition(
                f"{version.spec.key} is {version.role} and not loaded; promote it or name a live version",
                reason="not_loaded",
            )
        return session

    async def ensure_session(self, version: Version) -> LoadedModel:
        if (version.spec.name, version.version) not in self.sessions:
            await self._load_session(version)
        return self.session(version)

    async def score_person(self, person_id: str, *, model: str = "", version: str = "") -> list[ScoreResult]:
        fields = await self.person_fields(person_id)
        now = self.clock()
        if model:
            targets = [self.resolve_version(model, version, person_id)]
        else:
            if version:
                raise InvalidArgument("version", "needs a model: versions belong to one model")
            targets = [v for e in self.registry for v in [self.registry.route(e, person_id)] if v is not None]
        results = []
        for target in targets:
            session = await self.ensure_session(target)
            row = session.assembler.row(fields, now)
            scores = session.run_one(row)
            results.append(
                ScoreResult(
                    model=target.spec.name,
                    version=target.version,
                    role=target.role,
                    scores=dict(zip(target.spec.score_names, scores, strict=True)),
                    features=row,
                )
            )
        return results

    async def score_vector(self, model: str, version: str, row: Sequence[float] | Mapping[str, float]) -> ScoreResult:
        if not model:
            raise InvalidArgument("model", "is required to score a feature vector")
        target = self.resolve_version(model, version, None)
        session = await self.ensure_session(target)
        vector = session.assembler.from_named(row) if isinstance(row, Mapping) else session.assembler.from_values(row)
        scores = session.run_one(vector)
        return ScoreResult(
            model=target.spec.name,
            version=target.version,
            role=target.role,
            scores=dict(zip(target.spec.score_names, scores, strict=True)),
            features=vector,
        )

    async def score_matrix(self, model: str, version: str, rows: np.ndarray) -> tuple[Version, np.ndarray]:
        if not model:
            raise InvalidArgument("model", "is required")
        target = self.resolve_version(model, version, None)
        session = await self.ensure_session(target)
        if rows.ndim != 2 or rows.shape[1] != session.assembler.width:
            raise InvalidArgument(
                "rows",
                f"{target.spec.key} takes {session.assembler.width} features per row "
                f"({', '.join(session.assembler.names)}), got {rows.shape[-1] if rows.ndim else 0}",
            )
        if rows.shape[0] > 256:
            # Large matrices leave the event loop free while onnxruntime works (it releases the GIL).
            scores = await asyncio.to_thread(session.run, rows)
        else:
            scores = session.run(rows)
        self._m_rows.add(rows.shape[0], {"model": target.spec.name, "version": target.version, "role": "request"})
        return target, scores

    async def score_persons(
        self, model: str, version: str, persons: Sequence[str]
    ) -> tuple[Version, np.ndarray, list[str]]:
        target = self.resolve_version(model, version, None)
        session = await self.ensure_session(target)
        now = self.clock()
        found, missing = [], []
        rows = []
        for person in persons:
            try:
                fields = await self.person_fields(person)
            except NotFound:
                missing.append(person)
                continue
            found.append(person)
            rows.append(session.assembler.row(fields, now))
        matrix = np.asarray(rows, dtype=np.float32).reshape(len(rows), session.assembler.width)
        scores = session.run(matrix) if rows else np.empty((0, len(target.spec.outputs)))
        return target, scores, missing

    async def score_all(self, model: str = "", *, publish: bool, chunk: int = 1024) -> AsyncIterator[dict[str, Any]]:
        """Re-score every held person with one model (or every model); yields progress after each chunk."""
        entries = [self.registry.get(model)] if model else [e for e in self.registry if e.live is not None]
        for entry in entries:
            if entry.live is None:
                raise FailedPrecondition(f"model {entry.name!r} has no live version", reason="no_live_version")
        persons = sorted(self.fields)
        started = time.perf_counter()
        published = 0
        total = len(persons)
        now = self.clock()
        for offset in range(0, total, chunk):
            members = [p for p in persons[offset : offset + chunk] if p in self.fields]
            rows: dict = {}
            scored = []
            for entry in entries:
                for version, scored_persons, scores in await self._run_entry(entry, members, now, rows):
                    scored.append((version, scored_persons, scores, [now] * len(scored_persons)))
            if publish and scored:
                messages = self._messages(scored)
                results = await self.publisher.publish_batch(messages)
                failed = [r for r in results if not r.ok]
                if failed:
                    raise Unavailable(f"{len(failed)} score messages not stored by JetStream ({failed[0].error})")
                published += sum(len(scored_persons) for _v, scored_persons, _s, _t in scored)
            yield {
                "done": min(total, offset + chunk),
                "total": total,
                "published": published,
                "finished": False,
                "elapsed": time.perf_counter() - started,
            }
            await asyncio.sleep(0)  # the stream path runs between chunks
        yield {
            "done": total,
            "total": total,
            "published": published,
            "finished": True,
            "elapsed": time.perf_counter() - started,
        }


# A person's fields as stored: one JSON string (the fields are many small values; one string is cheaper
# to store and to load than a document of them).
FIELDS_CODEC: Codec[dict[str, Any], dict[str, Any]] = Codec(
    copy=dict.copy,
    encode=lambda fields: {"fields": orjson.dumps(fields).decode()},
    decode=lambda doc: orjson.loads(doc["fields"]),
)
