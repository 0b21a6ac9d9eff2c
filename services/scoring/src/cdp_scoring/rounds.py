"""Scoring rounds: the persons the partitions' batches submitted, scored together.

A round runs each model whose inputs changed once for every person of the round, however many
partitions they came from (one onnxruntime call per model version: live, or the canary for its share of
persons; shadow versions beside them, compared with live and never published). Its scores are turned
into columnar messages for `scores.updated.<p>`: a `ScoresUpdatedBatch` per model version, the ones for
persons of the same partition in one message (the first carries the others in `more`), and each
submitter gets its own partition's messages back: the partitioned engine commits them with the batch and publishes them once it is durable (`stream.py`). A round that fails
fails every batch in it; the engine recovers each of their partitions and applies the batches again.

`Rounds` is the part of `ScoringEngine` that does this; the state it reads is set up in the engine's
`__init__`.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cdp.scoring.v1 import scoring_pb2
from cdp_kit.bus import OutMessage, subjects
from cdp_scoring.domain.registry import ModelEntry, Version
from cdp_scoring.published import STAMP
from cdp_scoring.runtime import THREAD_ROWS

MAX_UPDATES_PER_MESSAGE = 2000


@dataclass(slots=True)
class VersionStats:
    rows: int = 0
    diff_sum: float = 0.0
    diff_rows: int = 0

    @property
    def mean_abs_diff(self) -> float:
        return self.diff_sum / self.diff_rows if self.diff_rows else 0.0


class Rounds:
    """Score what the stream path submitted, a round at a time, and publish the scores."""

    async def score_round(
        self, partition: int, touched: dict[str, set[str]], changed_at: dict[str, float]
    ) -> list[OutMessage]:
        """Score `touched` (person -> the changed paths some model reads) with the persons the other
        partitions submit meanwhile; the messages of this partition's persons."""
        future: asyncio.Future[list[OutMessage]] = asyncio.get_running_loop().create_future()
        self._round.append((partition, touched, changed_at, future, time.perf_counter()))
        self._round_ready.set()
        return await future

    async def _scoring_loop(self) -> None:
        """Score what the partitions submitted, a round at a time: one onnxruntime call per model for
        every person of the round, however many partitions they came from. Nothing waits for a round
        to fill; under load, what arrives while one round is scored makes the next one bigger, which is
        when the fixed cost of a call matters most."""
        while True:
            await self._round_ready.wait()
            # A moment for the other partitions' batches to join: a round costs every model it needs one
            # call whatever its size, and a call's fixed cost dominates a round of a handful of persons.
            await asyncio.sleep(self.round_linger)
            self._round_ready.clear()
            round_, self._round = self._round, []
            if not round_:
                continue
            started = time.perf_counter()
            touched: dict[str, set[str]] = {}
            changed_at: dict[str, float] = {}
            partition_of: dict[str, int] = {}
            for partition, part_touched, part_at, _future, submitted in round_:
                self._m_round_wait.record((started - submitted) * 1000)
                # Partitions hold disjoint persons: no person comes from two of them.
                touched.update(part_touched)
                changed_at.update(part_at)
                partition_of.update(dict.fromkeys(part_touched, partition))
            try:
                scored = await self._score_touched(touched, changed_at)
                by_partition = self._messages_by_partition(scored, partition_of)
            except Exception as exc:
                for *_parts, future, _submitted in round_:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for partition, *_parts, future, _submitted in round_:
                if not future.done():
                    future.set_result(by_partition.get(partition, []))

    async def _score_touched(
        self, touched: Mapping[str, set[str]], changed_at: Mapping[str, float]
    ) -> list[tuple[Version, list[str], np.ndarray, list[float]]]:
        """Score each touched person once per model whose inputs changed: (version, persons, scores,
        change times in ms) per version to publish."""
        readers = self._readers
        by_model: dict[str, list[str]] = {}
        for person, paths in touched.items():
            if len(paths) == 1:
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
        if any(len(by_model[e.name]) >= THREAD_ROWS for e in entries):
            # Models run side by side: onnxruntime releases the GIL, so one model's trees are walked on the
            # other core (a call of THREAD_ROWS rows or more runs on a worker thread) while the next
            # model's rows are assembled here.
            results = await asyncio.gather(*(self._run_entry(e, by_model[e.name], changed_at, rows) for e in entries))
        else:
            # Every call runs here (`_run`): one after the other, without a task per model.
            results = [await self._run_entry(e, by_model[e.name], changed_at, rows) for e in entries]
        return [
            (version, members, scores, [round(changed_at.get(p, 0.0) * 1000) for p in members])
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
        key = (assembler.key, tuple(persons))
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
        if isinstance(at, Mapping) and len(matrix) < THREAD_ROWS:
            # The stream path: a round calls each model once for all of its persons, so there is no other
            # call of the round to join (`LoadedModel.score` batches concurrent callers), and a call this
            # small runs here, as `score` would run it, without its future and task.
            scores = session.run(matrix)
        else:
            scores = await session.score(matrix)
        self._m_inference.record((time.perf_counter() - started) * 1000, {"model": version.spec.name})
        stats = self.stats.setdefault((version.spec.name, version.version), VersionStats())
        stats.rows += len(persons)
        self._m_rows.add(len(persons), {"model": version.spec.name, "version": version.version, "role": version.role})
        if self.drift is not None and isinstance(at, Mapping):  # the stream path's rows, not the API's
            self.drift.observe(version, matrix, scores)
        return scores

    def _messages(self, scored: Sequence[tuple[Version, list[str], np.ndarray, list[int]]]) -> list[OutMessage]:
        """Every person's scores, news or not, stamped as given (ScoreAll: `score_all` reserved the stamps and
        records the scores once stored)."""
        return [m for messages in self._messages_by_partition(scored, news_only=False).values() for m in messages]

    def _messages_by_partition(
        self,
        scored: Sequence[tuple[Version, list[str], np.ndarray, list[int]]],
        partition_of: Mapping[str, int] | None = None,
        *,
        news_only: bool = True,
    ) -> dict[int, list[OutMessage]]:
        """Columnar `ScoresUpdatedBatch`es, one message per person partition holding every model version's
        columns (`_messages`; `partition_of`: the persons' partitions when known; hashing every person of
        every model's rows again costs). A message's id is a hash of its bytes: the same scores of the same change always get the same id,
        so JetStream stores a message published twice (a crash between publishing and acknowledging) once.

        `news_only` (the stream path): a person whose version and values are those last published for
        the model (published.py) is left out, and what goes out is recorded as last published - it is
        committed with the batch, and a batch that is not is applied again on rebuilt fields. Its rows are
        stamped with their change time (ms), or after the person's last stamp of the model (published.py:
        stamps never go backwards); the others as `scored` stamps them."""
        # partition -> model versions' columns: (model, version, score names, person ids, values, at_ms)
        columns: dict[int, list[tuple]] = {}
        partition = self._partition
        last = self.published
        news = last.news
        for version, persons, scores, times in scored:
            model, name = version.spec.name, version.version
            key = STAMP + model
            values = last.rows(scores)
            # A score that is not a finite number (a model's overflow) is published for no one: the profile
            # refuses the whole message holding it, every other person's scores of the round with it.
            unusable = set() if np.isfinite(scores).all() else _not_finite(values)
            if unusable:
                self._m_not_finite.add(len(unusable), {"model": model})
            # partition -> this version's columns there (ids, values, times), filled in one pass
            parts: dict[int, tuple[list[str], list[float], list[int]]] = {}
            kept = 0
            for i, person in enumerate(persons):
                if unusable and i in unusable:
                    continue
                row = values[i]
                if news_only:
                    at = news(person, model, [name, *row], times[i], key)
                    if at is None:
                        continue
                else:
                    at = times[i]
                kept += 1
                p = partition_of[person] if partition_of is not None else partition(person)
                found = parts.get(p)
                if found is None:
                    found = parts[p] = ([], [], [])
                found[0].append(person)
                found[1].extend(row)
                found[2].append(at)
            names = version.spec.score_names
            for p, (ids, row_values, at_ms) in parts.items():
                columns.setdefault(p, []).append((model, name, names, ids, row_values, at_ms))
            if kept:
                self._m_published.add(kept, {"model": model})
            if kept < len(persons) - len(unusable):
                self._m_unchanged.add(len(persons) - len(unusable) - kept, {"model": model})
        return {p: _messages(p, batches) for p, batches in columns.items()}


def _not_finite(rows: list[list[float]]) -> set[int]:
    """The rows holding a score that is not a finite number."""
    return {i for i, row in enumerate(rows) if not all(math.isfinite(value) for value in row)}


def _messages(partition: int, batches: list[tuple]) -> list[OutMessage]:
    """A partition's model versions' columns (model, version, score names, person ids, values, at_ms) in
    as few messages as MAX_UPDATES_PER_MESSAGE rows allow: a version's columns are cut into chunks of at most
    that many rows, and the first chunk of a message carries the others in `more` (built in place there, not
    copied in). A message's id is a hash of its bytes."""
    out: list[OutMessage] = []
    message: scoring_pb2.ScoresUpdatedBatch | None = None
    rows = 0
    for model, version, names, ids, values, at_ms in batches:
        width = len(names)
        for start in range(0, len(ids), MAX_UPDATES_PER_MESSAGE):
            end = start + MAX_UPDATES_PER_MESSAGE
            chunk = ids[start:end] if start or end < len(ids) else ids
            if message is not None and rows + len(chunk) > MAX_UPDATES_PER_MESSAGE:
                out.append(_out_message(partition, message))
                message = None
            columns = {
                "model": model,
                "version": version,
                "scores": names,
                "person_ids": chunk,
                "values": values[start * width : end * width] if chunk is not ids else values,
                "at_ms": at_ms[start:end] if chunk is not ids else at_ms,
            }
            if message is None:
                message, rows = scoring_pb2.ScoresUpdatedBatch(**columns), 0
            else:
                message.more.add(**columns)
            rows += len(chunk)
    if message is not None:
        out.append(_out_message(partition, message))
    return out


def _out_message(partition: int, message: scoring_pb2.ScoresUpdatedBatch) -> OutMessage:
    payload = message.SerializeToString()
    return OutMessage(
        subject=subjects.scores_updated(partition),
        payload=payload,
        msg_id="su_" + hashlib.blake2b(payload, digest_size=16).hexdigest(),
    )
