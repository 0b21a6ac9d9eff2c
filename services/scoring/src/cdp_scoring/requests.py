"""The synchronous paths (gRPC): score one person, a feature vector, a matrix, a list of persons, or
every held person (`score_all`, with progress).

A person not held here (not seen on `profiles.changed` by this replica) is read from the profile
service (cdp_kit.held's fetch on a miss); one unknown there too is NOT_FOUND. A request holds the session
it started with, so a model changed meanwhile never fails it.

`Requests` is the part of `ScoringEngine` that does this; the state it reads is set up in the engine's
`__init__`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cdp_kit.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from cdp_scoring.domain.registry import Version
from cdp_scoring.published import STAMP
from cdp_scoring.runtime import LoadedModel

log = logging.getLogger("cdp.scoring.engine")

# A ScoreAll by hand stamps and snapshots this many persons at a time (rounded down to whole chunks, at least
# one) before it publishes any of them (`score_all`).
STAMPED_AHEAD = 8192


@dataclass(slots=True)
class ScoreResult:
    model: str
    version: str
    role: str
    scores: dict[str, float]
    features: list[float]


class Requests:
    """Scores on request."""

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

    def _moved(self, entries: Sequence[Any], persons: Iterable[str], chosen: dict[str, set[str]]) -> None:
        """Per model, those of `persons` held whose version (live, or the canary for its share) is not the one
        last published for them, or not known."""
        route, entry_of, fields = self.registry.route, self.published.entry, self.fields
        for entry in entries:
            name, moved = entry.name, set()
            for person in persons:
                if person not in fields:
                    continue
                version = route(entry, person)
                if version is None:
                    continue
                last = entry_of(person, name)
                if last is None or last[0] != version.version:
                    moved.add(person)
            chosen[name] = moved

    def _reserve(
        self,
        entries: Sequence[Any],
        persons: Mapping[str, Iterable[str]],
        now_ms: int,
        stamps: dict[str, dict[str, int]],
    ) -> None:
        """Before the persons' fields are read for updates published outside the stream path (published.py):
        the stream path stamps what it scores from now on after these updates, and publishes it whatever was
        published before (the model's entry is dropped: this update, in flight, is not in it). The persons are
        marked: the next snapshot keeps their stamps (and not the entry dropped)."""
        last, mark = self.published, self.held.mark
        reserve, forget = last.reserve, last.forget
        for entry in entries:
            key, name = STAMP + entry.name, entry.name
            reserved = stamps.setdefault(name, {})
            for person in persons[name]:
                reserved[person] = reserve(person, key, now_ms) or now_ms
                forget(person, name)
                mark(person)

    async def _stamps_durable(self) -> None:
        """The stamps a pass reserved (`_reserve`: the persons were marked) are in memory until the next
        snapshot, every few seconds: a crash before it would bring the persons back without them, and a change
        the profile applied before the pass, scored only after the restart, would be stamped with its own time
        - before the pass's update - and refused by the profile, the person keeping the pass's score computed
        without the change. One snapshot now writes them (the stream's `snapshot_since`; none without a
        stream)."""
        snapshot = self.snapshot_fields
        if snapshot is not None and not await snapshot():
            log.warning("the stamps of a scoring pass are not in a snapshot yet; the next periodic one takes them")

    async def score_all(
        self, model: str = "", *, publish: bool, chunk: int = 1024, moved_only: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        """Re-score every held person with one model (or every model); yields progress after each chunk.
        `moved_only` (a version made live, a canary deployed: deployments.py): only the persons whose version
        is not the one last published for them (or not known) are scored and published.

        Published, each person's update is stamped with this call's clock, or after the person's last stamp
        of the model (published.py: stamps never go backwards). The stamps of a chunk are taken before its
        fields are read: a change the stream path scores after that is stamped after this update, one it
        scored before is in the fields read. The persons stamped are marked and their stamps snapshotted
        (`_stamps_durable`) before any of them is published, so that a crash at any point of the pass keeps
        every stamp it published: with `moved_only`, all at once (the partitions' records, written after the
        pass, then still say it is to be done: deployments.py); otherwise block by block (STAMPED_AHEAD
        persons, whole chunks), each block's before its first chunk's fields are read (a ScoreAll killed
        partway keeps the stamps of the chunks it published)."""
        entries = [self.registry.get(model)] if model else [e for e in self.registry if e.live is not None]
        for entry in entries:
            if entry.live is None:
                raise FailedPrecondition(f"model {entry.name!r} has no live version", reason="no_live_version")
        persons = sorted(self.fields)
        reserved = 0  # persons[:reserved] are stamped and snapshotted (published, not `moved_only`)
        started = time.perf_counter()
        published = 0
        total = len(persons)
        now = self.clock()
        now_ms = round(now * 1000)
        last = self.published
        fields = self.fields
        # model -> the persons it scores (moved_only), and their stamps (published)
        chosen: dict[str, set[str]] = {}
        stamps: dict[str, dict[str, int]] = {}
        if publish and total:
            # Published outside the partitions' pipelines: no last-published entry written before this counts
            # any more (published.py), even after a crash before the next snapshot.
            before = last.epoch
            await self.raise_published_epoch()
            if moved_only:
                # Nothing awaited from here to `_reserve` (no snapshot copies the fields in between). The entries
                # held here stay true under the new epoch (`carry`), but for the persons this publishes: theirs
                # are dropped, and they are stamped and marked (`_reserve`) for the whole pass at once. Then a
                # snapshot writes those stamps before any of them is published (`_stamps_durable`).
                last.carry(before)
                self._moved(entries, persons, chosen)
                self._reserve(entries, chosen, now_ms, stamps)
                if any(stamps.values()):
                    await self._stamps_durable()
        elif moved_only:
            self._moved(entries, persons, chosen)
        for offset in range(0, total, chunk):
            if publish and not moved_only and offset >= reserved:
                # Before the fields are read, the stamps of the next STAMPED_AHEAD persons (whole chunks) are
                # taken, and a snapshot writes them before any of them is published: a crash at any point of the
                # pass keeps every stamp it published (one snapshot as the pass ended left those of the chunks
                # published to a crash during it). Per block rather than per chunk: a snapshot per chunk of
                # 1,024 cost the pass a third more CPU and twice its time, measured. Their entries are dropped
                # for the block at once: until this reaches them, the stream path publishes their changes
                # whatever was published before. Every person picked is held: nothing was awaited since.
                reserved = offset + max(chunk, STAMPED_AHEAD // chunk * chunk)
                block = [p for p in persons[offset:reserved] if p in fields]
                self._reserve(entries, dict.fromkeys((e.name for e in entries), block), now_ms, stamps)
                if block:
                    await self._stamps_durable()
            # The stream path may have run since the persons were picked (a partition released): those still
            # held are read. A change it scored since a member was stamped is stamped after this update.
            members = [p for p in persons[offset : offset + chunk] if p in fields]
            rows: dict = {}
            scored = []
            for entry in entries:
                of_model = chosen.get(entry.name)
                persons_of = members if of_model is None else [p for p in members if p in of_model]
                for version, scored_persons, scores in await self._run_entry(entry, persons_of, now, rows):
                    of = stamps.get(entry.name)
                    at_ms = [of[p] for p in scored_persons] if of is not None else [now_ms] * len(scored_persons)
                    scored.append((version, scored_persons, scores, at_ms))
            if publish and scored:
                messages = self._messages(scored)
                results = await self.publisher.publish_batch(messages)
                failed = [r for r in results if not r.ok]
                if failed:
                    for _v, scored_persons, _s, _t in scored:
                        for person in scored_persons:
                            last.forget(person)  # some of it may be stored: unknown
                    raise Unavailable(f"{len(failed)} score messages not stored by JetStream ({failed[0].error})")
                for version, scored_persons, scores, at_ms in scored:
                    name = version.spec.name
                    key = STAMP + name
                    for person, row, at in zip(scored_persons, last.rows(scores), at_ms, strict=True):
                        held = fields.get(person)
                        # Unless the stream path published an update of the person since (stamped after this
                        # one, computed on fields as new or newer): its entry is the one the profile keeps.
                        if held is not None and held.get(key) == at:
                            last.record(person, name, [version.version, *row])
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
