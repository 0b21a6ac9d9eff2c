"""The deployed models: the registry (live, canary, shadow versions per model), its storage, and the
onnxruntime sessions of the active versions.

Registry changes (deploy, promote, rollback) are stored, then announced on `scoring.models.changed` so
every replica reloads the entry: hot reload, without dropping a request (a request holds the session it
started with). A version that cannot be stored is taken out of the registry again: a replica never serves
a version it could not load after a restart. The computed traits a model reads are defined on the profile
service when it is deployed (and again on every start, `ensure_traits`: the profile service may have
lost them with its store).

A version that becomes live on a replica - deployed as a model's first version, promoted, rolled back,
there or announced by another replica - scores the persons that replica holds, once, published as
`ScoreAll` publishes (`score_held`): every replica holds its own partitions' persons, so each does it for
its own. Otherwise a person who does not change keeps no score, or the replaced version's, until they do.

`Deployments` is the part of `ScoringEngine` that owns this; the state it reads is set up in the
engine's `__init__`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from cdp_kit.errors import FailedPrecondition, NotFound, Unavailable
from cdp_kit.storage import Put
from cdp_scoring.domain.registry import CANARY, LIVE, SHADOW, ModelEntry, Version
from cdp_scoring.rounds import VersionStats
from cdp_scoring.runtime import LoadedModel, load_model

log = logging.getLogger("cdp.scoring.engine")

MODELS = "scoring_models"


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
        if version.role == LIVE:
            self.score_held(spec.name)
        return version

    async def promote(self, name: str, version: str) -> ModelEntry:
        async with self._registry_lock:
            target = self.registry.version(name, version)
            before = self._live_version(name)
            await self._load_session(target)
            self.registry.promote(name, version)
            await self._save_entry(name)
            self._reindex()
        log.info("model promoted", extra={"model": name, "version": version})
        await self._announce(name)
        if self._live_version(name) != before:  # promoting the live version changes nothing
            self.score_held(name)
        return self.registry.get(name)

    async def rollback(self, name: str) -> ModelEntry:
        async with self._registry_lock:
            entry = self.registry.get(name)
            previous = next((entry.versions.get(v) for v in reversed(entry.previous) if v in entry.versions), None)
            if previous is not None:
                await self._load_session(previous)
            before = self._live_version(name)
            restored = self.registry.rollback(name)
            await self._save_entry(name)
            self._reindex()
        log.info("model rolled back", extra={"model": name, "version": restored.version})
        await self._announce(name)
        if self._live_version(name) != before:
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
        live now that was not before scores the persons held here, as on the replica that made it live."""
        async with self._registry_lock:
            before = self._live_version(name)
            await self._reload_entry(name)
            entry = self.registry.models.get(name)
            if entry is not None:
                for version in entry.versions.values():
                    if version.role in (LIVE, SHADOW, CANARY):
                        await self._load_session(version)
            self._reindex()
        live = self._live_version(name)
        if live is not None and live != before:
            self.score_held(name)

    def _live_version(self, name: str) -> str | None:
        entry = self.registry.models.get(name)
        live = entry.live if entry is not None else None
        return live.version if live is not None else None

    # --- the persons held, scored with a version that became live ---------------------------------------

    def score_held(self, name: str) -> None:
        """Score the persons held here with the live version of model `name`, once, published (`score_all`,
        which keeps the last-published rules: published.py), in the background: one model at a time, in
        chunks between which the stream path runs. A model asked for again while it is being scored is
        scored again after (the version it started with may be live no more)."""
        self._held_pending[name] = None
        if self._held_task is None or self._held_task.done():
            self._held_task = self.background(self._score_held(), "score held persons with a version made live")

    async def held_scored(self) -> None:
        """Until the persons held are scored with every version made live so far (or given up on)."""
        while self._held_task is not None and not self._held_task.done():
            await asyncio.wait([self._held_task])

    async def _score_held(self) -> None:
        delay = 0.5
        while self._held_pending:
            name = next(iter(self._held_pending))
            del self._held_pending[name]
            try:
                persons = published = 0
                async for progress in self.score_all(name, publish=True):
                    persons, published = progress["total"], progress["published"]
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
