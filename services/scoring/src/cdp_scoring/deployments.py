"""The deployed models: the registry (live, canary, shadow versions per model), its storage, and the
onnxruntime sessions of the active versions.

Registry changes (deploy, promote, rollback) are stored, then announced on `scoring.models.changed` so
every replica reloads the entry: hot reload, without dropping a request (a request holds the session it
started with). A version that cannot be stored is taken out of the registry again: a replica never serves
a version it could not load after a restart. The computed traits a model reads are defined on the profile
service when it is deployed (and again on every start, `ensure_traits`: the profile service may have
lost them with its store).

A version that becomes live on a replica - deployed as a model's first version, promoted, rolled back,
there or announced by another replica - or a canary deployed (its share of persons moves to it) scores
the persons that replica holds whose version moves, once, published as `ScoreAll` publishes
(`score_held`; `score_all(moved_only=True)`: the others publish nothing, and what was last published for
them still counts): every replica holds its own partitions' persons, so each does it for its own. Otherwise a person who does not change
keeps no score, or the replaced version's, until they do. Each partition's record
(`scoring_snapshots/$held_scored.<p>`) says which versions (`_routing`) its persons were last scored with;
a partition that arrives (a start, a partition moved here) with another record than what is live now -
the version was made live while its replica was down, or before its new owner had scored it - scores the
persons held the same way (`score_held_if_stale`).

`Deployments` is the part of `ScoringEngine` that owns this; the state it reads is set up in the
engine's `__init__`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from cdp_kit.errors import FailedPrecondition, NotFound, Unavailable
from cdp_kit.storage import Put
from cdp_scoring.domain.registry import CANARY, LIVE, SHADOW, ModelEntry, Version
from cdp_scoring.rounds import VersionStats
from cdp_scoring.runtime import LoadedModel, load_model

log = logging.getLogger("cdp.scoring.engine")

MODELS = "scoring_models"
# engine.py's SNAPSHOTS (it imports this module): beside the positions of the fields' snapshots, each
# partition's record of the versions its persons were last scored with (`held_record_key`).
SNAPSHOTS = "scoring_snapshots"


def held_record_key(partition: int) -> str:
    """The record of the versions (per model, `Deployments._routing`) partition's persons were scored with."""
    return f"$held_scored.{partition}"


class Deployments:
    """Deploy, promote, roll back and reload models; load their sessions."""

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
        self._score_models = {
            name: version.spec.name for version in self.registry.active() for name in version.spec.score_names
        }

    # --- the registry -----------------------------------------------------------------------------

    async def deploy(self, data: bytes, *, role: str | None, canary_percent: float = 0.0) -> Version:
        loaded = await asyncio.to_thread(load_model, data, threads=self.threads)
        spec = loaded.spec
        async with self._registry_lock:
            existing, _ = self.registry.check_deploy(
                spec, sha256=loaded.sha256, role=role, canary_percent=canary_percent
            )
            if existing is not None:
                return existing
            before = self._routing(spec.name)
            # The file first: a version is never listed, promoted or trained beside before its file is there.
            await self.model_store.put(spec.name, spec.version, data)
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
        if self._routing(spec.name) != before:  # a first version, a new live one, or a canary
            self.score_held(spec.name)
        return version

    async def promote(self, name: str, version: str) -> ModelEntry:
        async with self._registry_lock:
            target = self.registry.version(name, version)
            before = self._routing(name)
            await self._load_session(target)
            self.registry.promote(name, version)
            await self._save_entry(name)
            self._reindex()
        log.info("model promoted", extra={"model": name, "version": version})
        await self._announce(name)
        if self._routing(name) != before:  # promoting the live version changes nothing
            self.score_held(name)
        return self.registry.get(name)

    async def rollback(self, name: str) -> ModelEntry:
        async with self._registry_lock:
            entry = self.registry.get(name)
            previous = next((entry.versions.get(v) for v in reversed(entry.previous) if v in entry.versions), None)
            if previous is not None:
                await self._load_session(previous)
            before = self._routing(name)
            restored = self.registry.rollback(name)
            await self._save_entry(name)
            self._reindex()
        log.info("model rolled back", extra={"model": name, "version": restored.version})
        await self._announce(name)
        if self._routing(name) != before:
            self.score_held(name)
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
        """Another replica changed a model: read its entry again and load the sessions it needs. A version
        live now that was not before (or another canary) scores the persons held here, as on the replica
        that made it so."""
        async with self._registry_lock:
            before = self._routing(name)
            await self._reload_entry(name)
            entry = self.registry.models.get(name)
            if entry is not None:
                for version in entry.versions.values():
                    if version.role in (LIVE, SHADOW, CANARY):
                        await self._load_session(version)
            self._reindex()
        routing = self._routing(name)
        if routing is not None and routing != before:
            self.score_held(name)

    def _routing(self, name: str) -> list[Any] | None:
        """Which version each person's scores of model `name` are published under: [live version, canary
        version or None, the canary's share] (None: no live version, nothing published). As stored in the
        partitions' records of what their persons were scored with (JSON: a list)."""
        entry = self.registry.models.get(name)
        live = entry.live if entry is not None else None
        if live is None:
            return None
        canary = entry.canary
        return (
            [live.version, canary.version, canary.canary_percent] if canary is not None else [live.version, None, 0.0]
        )

    # --- the persons held, scored with a version that became live ---------------------------------------

    def score_held(self, name: str) -> None:
        """Score the persons held here whose version of model `name` (live, or the canary for its share) is not
        the one last published for them, once, published (`score_all(moved_only=True)`, which keeps the
        last-published rules: published.py), in the background: one model at a time, in
        chunks between which the stream path runs. A model asked for again while it is being scored is
        scored again after (the version it started with may be live no more)."""
        self._held_pending[name] = None
        if self._held_task is None or self._held_task.done():
            self._held_task = self.background(self._score_held(), "score held persons with a version made live")

    async def held_scored(self) -> None:
        """Until the persons held are scored with every version made live so far (or given up on)."""
        while self._held_task is not None and not self._held_task.done():
            await asyncio.wait([self._held_task])

    @contextlib.asynccontextmanager
    async def arriving(self) -> AsyncIterator[None]:
        """Around a partition's arrival (its restore, `score_held_if_stale`, its pipeline started): no pass
        over the persons held starts meanwhile. A pass reads the persons held when it starts, so one started
        between two partitions taken one after the other (a start: nothing is awaited between them) would
        have to run again for the second."""
        self._arriving += 1
        self._arrived.clear()
        try:
            yield
        finally:
            self._arriving -= 1
            if not self._arriving:
                self._arrived.set()

    async def _score_held(self) -> None:
        delay = 0.5
        while self._held_pending:
            while self._arriving:  # the event may be cleared again before this runs: check the count
                await self._arrived.wait()
            name = next(iter(self._held_pending))
            del self._held_pending[name]
            try:
                persons = published = 0
                routing, ready = self._routing(name), set(self.ready)
                async for progress in self.score_all(name, publish=True, moved_only=True):
                    persons, published = progress["total"], progress["published"]
                # The partitions held throughout: their persons were scored under `routing` (one that arrived
                # meanwhile checked its own record, and one that left and came back did too).
                await self._held_scored_with(name, routing, ready & self.ready)
            except (FailedPrecondition, NotFound) as exc:  # no live version, or no model, any more
                log.info("held persons not scored with model %s: %s", name, exc.message)
            except Unavailable as exc:  # JetStream did not store them: everything again, later
                log.warning("held persons not scored with model %s (%s); retrying in %.0fs", name, exc.message, delay)
                self._held_pending.setdefault(name, None)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
            except Exception:  # a store error, say: `ScoreAll` by hand scores them
                log.exception("held persons not scored with model %s", name)
            else:
                delay = 0.5
                log.info(
                    "held persons scored with a version made live",
                    extra={"model": name, "persons": persons, "published": published},
                )

    async def score_held_if_stale(self, partition: int) -> None:
        """`partition` has arrived (start, or moved here): score the persons held with each model whose
        routing (`_routing`) is not the one the partition's record says its persons were last scored with -
        a version made live, or a canary deployed, while the partition was held nowhere (its replica down)
        or by a replica that had not scored it yet. A partition with no record (one restored from before the
        records) counts as scored with nothing, unless it holds nobody: then it starts its record."""
        record = await self.store.get(SNAPSHOTS, held_record_key(partition))
        scored = record.doc.get("models", {}) if record is not None else None
        routings = {
            entry.name: routing for entry in self.registry if (routing := self._routing(entry.name)) is not None
        }
        if scored is None and not any(self._partition(person) == partition for person in self.fields):
            await self.store.put(SNAPSHOTS, held_record_key(partition), {"models": routings})
            return
        stale = [name for name, routing in routings.items() if (scored or {}).get(name) != routing]
        if stale:
            log.info("partition's persons scored under other versions than live: scoring them", extra={
                "partition": partition, "models": stale})  # fmt: skip
        for name in stale:
            self.score_held(name)

    async def _held_scored_with(self, name: str, routing: list[Any] | None, partitions: Iterable[int]) -> None:
        """Record that the persons of `partitions` were scored with model `name` under `routing`."""
        if routing is None:
            return
        for partition in sorted(partitions):
            key = held_record_key(partition)
            record = await self.store.get(SNAPSHOTS, key)
            models = dict(record.doc.get("models", {})) if record is not None else {}
            if models.get(name) != routing:
                models[name] = routing
                await self.store.put(SNAPSHOTS, key, {"models": models})

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
