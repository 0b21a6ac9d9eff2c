"""Point-in-time training sets from the profile store: features as known at a cut-off T, labels after it.

For every person alive in the store (merged-away and deleted records are skipped) with at least one
event at or before T (a timeline entry, or one folded into a timeline base cut by then):

- traits, groups and consent are read as of T (`Profile.view(as_of=T)`: the version current at T in
  each history, by event time);
- computed traits are recomputed from the timeline entries at or before T by the profile domain's own
  `Profile.backfill` (the code that serves backfilled traits) at now = T, so windows end at T, starting
  from the timeline base (below); the stored computed state, which has seen everything since, is never
  read;
- scores are kept only when written at or before T (a profile keeps only the newest score, so a model
  reading another model's score loses it when it was rescored after T);
- the row is assembled by the scoring domain's `FeatureAssembler` at T, as serving does;
- the label comes from the entries after T (`labels.LabelSpec`; with `after`, only those after T + after),
  and T + after + window (the label's horizon) must not pass the last event the store holds
  (`observed_until`): an unobserved window would read as "nothing happened".

So nothing after T reaches a row's features: the profile the row is read from is built from entries at
or before T only.

**Truncated timelines.** The profile service keeps at most `CDP_PROFILE_TIMELINE_MAX_EVENTS` entries per
person (1,000 by default; and none older than its age limit, when one is set), dropping the oldest. What
it drops it folds into the part's *timeline base* (stored with the profile): each computed trait's state
over the dropped events as of the cut, the position of the newest dropped event (all-time traits their
summary, windowed ones the dropped contributions still inside their window at the cut). `profile_at`
starts each trait from the base and replays the retained entries up to T, which is exactly what the
whole history gives for any T at or after the cut (a windowed trait of a person past its bound - over 1,000
contributions in its window - within the bound `cdp_profile.domain.aggregates` documents): the most active customers, those past the cap, get
their rows like everyone else. A person gets no row only when a loss reaches the row uncovered
(`whole_at`): T is before a part's cut (the base holds events after T), or a trait reaching back past the
cut (an all-time trait always does; a windowed one when its window starts before the cut) is not in the
base: defined or redefined after the first drop, or a profile an older release stored, which had dropped
events before it had a base (its loss is then known only as its oldest retained entry, from `event_count`
and `first_seen`). Those are counted (`skipped_truncated`, in `summary()` too). For rows without a label
(`feature_rows`) nobody is refused: a base cut after T is left out and such rows are undercounted.

T is event time: an event that happened before T but arrived after it counts (timeline entries keep no
arrival time). Identity is read as it is now: a merge made after T still joins the two persons' pre-T
histories.

`data_hash` is the SHA-256 of the feature matrix and labels (float32/float64 bytes, row order by person
id) with the cut-off and the label spec: the same store and cut-off give the same hash.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import hashlib
import itertools
import json
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from cdp_kit.durations import format_duration
from cdp_kit.errors import InvalidArgument
from cdp_kit.storage import Store
from cdp_profile.domain import ComputedTraits, Profile, TimelineEntry
from cdp_profile.records import PROFILES, TIMELINE, stored_timeline, timeline_prefix
from cdp_scoring.domain import FeatureAssembler, ModelSpec
from cdp_training.dataset import view_fields
from cdp_training.labels import LabelSpec

TIMELINE_PAGE = 2000  # timeline records a scan call returns (a person's whole timeline, usually)


@dataclass(slots=True)
class StoredProfile:
    """A live profile record as the profile service stored it, with its timeline (oldest first)."""

    person_id: str
    doc: dict[str, Any]
    timeline: list[TimelineEntry]


async def iter_profiles(store: Store, *, batch: int = 500) -> AsyncIterator[list[StoredProfile]]:
    """The live profiles in the profile service's store, `batch` at a time in key order, each with the
    timeline entries of all its parts (read by origin prefix): memory holds one batch, not the store."""
    pending: list[tuple[str, dict[str, Any]]] = []
    async for record in store.scan_all(PROFILES, page_size=batch):
        if "profile" not in record.doc:
            continue  # merged away or deleted: its data lives in another profile, or nowhere
        pending.append((record.key, record.doc))
        if len(pending) >= batch:
            yield [await _stored(store, key, doc) for key, doc in pending]
            pending = []
    if pending:
        yield [await _stored(store, key, doc) for key, doc in pending]


async def _stored(store: Store, person_id: str, record: dict[str, Any]) -> StoredProfile:
    doc = orjson.loads(record["profile"])
    rows = []
    for origin in (person_id, *doc.get("merged_from", [])):
        async for row in store.scan_all(TIMELINE, prefix=timeline_prefix(origin), page_size=TIMELINE_PAGE):
            rows.append(row.doc)
    # The record's newest entries and its parts' rows (pages, or single entries of older releases), in time order.
    return StoredProfile(person_id, doc, stored_timeline(record, rows))


async def read_profiles(store: Store) -> list[StoredProfile]:
    """Every live profile in the profile service's store, with the timeline entries of all its parts."""
    out: list[StoredProfile] = []
    with _collector_spared() as between_batches:
        async for batch in iter_profiles(store):
            out += batch
            between_batches()
    out.sort(key=lambda p: p.person_id)
    return out


def observed_until(profiles: Iterable[StoredProfile]) -> float:
    """The time of the last event the store holds (labels cannot look past it)."""
    return max((p.timeline[-1].at for p in profiles if p.timeline), default=float("-inf"))


def losses(stored: StoredProfile) -> list[tuple[float, Mapping[str, Any] | None]]:
    """Per part that lost timeline entries to retention: (the time up to which it lost them, its base or
    None). With a base (see the module docstring) every dropped entry is at or before the base's cut;
    without one (a profile an older release stored), at or before the part's oldest retained entry."""
    parts = stored.doc.get("parts", [])
    out: list[tuple[float, Mapping[str, Any] | None]] = []
    legacy = [part for part in parts if part.get("base") is None]
    for part in parts:
        base = part.get("base")
        if base is not None:
            out.append((float(base["at"]), base))
    if not legacy:
        return out
    # A part's event_count and first_seen count the person's own events only (the platform's, identity's
    # "Identifier Shared", are kept but not counted), so they are compared with those entries only.
    timeline = [entry for entry in stored.timeline if not entry.platform]
    if len(parts) == 1:
        kept = {parts[0].get("origin"): (len(timeline), timeline[0].at if timeline else None)}
    else:
        counts = collections.Counter(entry.origin for entry in timeline)
        firsts: dict[str, float] = {}
        for entry in timeline:  # oldest first: the first seen per origin is its oldest
            firsts.setdefault(entry.origin, entry.at)
        kept = {origin: (counts[origin], firsts.get(origin)) for origin in counts}
    for part in legacy:
        count, first = kept.get(part.get("origin"), (0, None))
        applied, first_seen = part.get("event_count", 0), part.get("first_seen")
        if count < applied or (first_seen is not None and first is not None and first_seen < first):
            # Nothing retained: its events are all gone, the last of them at last_seen.
            out.append((first if first is not None else part.get("last_seen") or float("inf"), None))
    return out


def complete_from(stored: StoredProfile) -> float:
    """The time after which `stored`'s timeline holds every event its profile applied (-inf: it holds them
    all): the latest loss of its parts (`losses`). Every dropped entry is at or before it."""
    return max((at for at, _ in losses(stored)), default=float("-inf"))


def whole_at(stored: StoredProfile, defs: ComputedTraits, cutoff: float) -> bool:
    """True when a row at `cutoff` reads nothing retention dropped that its base does not hold: every
    part's loss is at or before the cut-off (a label reads the entries after it), and each trait whose
    reach goes back past a loss (an all-time one always does; a windowed one when its window starts
    before the loss) is covered by that part's base."""
    for at, base in losses(stored):
        if at > cutoff:
            return False
        sigs = base.get("sigs", {}) if base is not None else {}
        for trait in _traits_of(defs):
            if trait.window is not None and cutoff - trait.window >= at:
                continue  # the window starts after everything dropped
            if sigs.get(trait.name) != trait.signature:
                return False
    return True


def _doc_at(doc: Mapping[str, Any], cutoff: float) -> dict[str, Any]:
    """The stored document without what was derived from later events: computed state goes (it is
    recomputed from the timeline), scores written after T go, and so does a timeline base whose cut is
    after T (it holds events after T; the rebuild then undercounts, as it did before bases)."""
    parts = []
    for part in doc["parts"]:
        part = dict(part)
        part["computed"] = {}
        base = part.get("base")
        if base is not None and base["at"] > cutoff:
            del part["base"]
        part["scores"] = {name: score for name, score in part.get("scores", {}).items() if score[3] <= cutoff}
        parts.append(part)
    return {**doc, "parts": parts}


def profile_at(stored: StoredProfile, defs: ComputedTraits, cutoff: float) -> Profile:
    """The person as the profile service would have served it at T (see the module docstring).

    Each computed trait is rebuilt by the profile's own `backfill`, which walks the part's timeline and
    skips the entries whose event does not match the trait: with 30 traits that walk was most of the
    cost of a set (traits x entries calls). So each part's entries are grouped once by (type, name) and
    each trait's backfill is shown only the groups its definition matches, in timeline order: the
    entries it skips are not there to skip, the ones it reads are the same, in the same order. The part's
    whole timeline is put back afterwards."""
    before = [e for e in stored.timeline if e.at <= cutoff]
    profile = Profile.from_doc(_doc_at(stored.doc, cutoff), before)
    parts = list(profile.parts.values())
    timelines = [part.timeline for part in parts]
    groups = [[(_matches_of(defs, key), positions) for key, positions in _by_event(t).items()] for t in timelines]
    try:
        for k, trait in enumerate(_traits_of(defs)):
            for part, timeline, by_event in zip(parts, timelines, groups, strict=True):
                part.timeline = _matching(k, timeline, by_event)
            profile.backfill(trait, now=cutoff)
    finally:
        for part, timeline in zip(parts, timelines, strict=True):
            part.timeline = timeline
    return profile


def _by_event(timeline: Sequence[TimelineEntry]) -> dict[tuple[str, str], list[int]]:
    """(type, name) -> the positions of its entries in the timeline, ascending."""
    out: dict[tuple[str, str], list[int]] = {}
    for i, entry in enumerate(timeline):
        key = (entry.type, entry.name)
        positions = out.get(key)
        if positions is None:
            out[key] = [i]
        else:
            positions.append(i)
    return out


def _matching(
    k: int, timeline: Sequence[TimelineEntry], by_event: Sequence[tuple[tuple[bool, ...], list[int]]]
) -> list[TimelineEntry]:
    """The timeline entries whose event the k-th trait matches, in timeline order."""
    found = [positions for matches, positions in by_event if matches[k]]
    if not found:
        return []
    if len(found) == len(by_event):
        return list(timeline)
    if len(found) == 1:
        return [timeline[i] for i in found[0]]
    return [timeline[i] for i in sorted(itertools.chain.from_iterable(found))]


_TRAITS: dict[int, tuple[Any, ...]] = {}


def _traits_of(defs: ComputedTraits) -> tuple[Any, ...]:
    """The definitions' traits in order, worked out once per definitions object (not once per person)."""
    return _cached(defs)[1]


def _matches_of(defs: ComputedTraits, key: tuple[str, str]) -> tuple[bool, ...]:
    """Which of the definitions' traits (in `_traits_of` order) an event of (type, name) feeds."""
    memo = _cached(defs)[2]
    found = memo.get(key)
    if found is None:
        found = memo[key] = tuple(trait.matches_event(*key) for trait in _cached(defs)[1])
    return found


def _cached(defs: ComputedTraits) -> tuple[Any, ...]:
    key = id(defs)
    cached = _TRAITS.get(key)
    if cached is None or cached[0] is not defs:
        traits = tuple(t for t in (defs.get(d["name"]) for d in defs.to_dicts()) if t is not None)
        cached = _TRAITS[key] = (defs, traits, {})
        if len(_TRAITS) > 64:
            _TRAITS.clear()
            _TRAITS[key] = cached
    return cached


def fields_at_cutoff(stored: StoredProfile, defs: ComputedTraits, cutoff: float) -> dict[str, Any]:
    """The flat profile fields (traits., computed., consent., scores.) as known at T."""
    return view_fields(profile_at(stored, defs, cutoff).view(now=cutoff, as_of=cutoff))


@dataclass(slots=True)
class TrainingSet:
    cutoff: float
    label: LabelSpec
    spec: ModelSpec
    person_ids: list[str]
    fields: list[dict[str, Any]]
    X: np.ndarray  # float32 [rows, features], the spec's features assembled at T
    y: np.ndarray  # float64 [rows, len(label.columns)]
    observed_until: float
    skipped_unborn: int  # persons whose first event came after T
    skipped_unlabelled: int  # persons with no label (channel_answered: answered nothing)
    skipped_truncated: int = 0  # persons whose retention loss reaches the row uncovered by their timeline base

    @property
    def rows(self) -> int:
        return len(self.person_ids)

    @property
    def data_hash(self) -> str:
        digest = hashlib.sha256()
        header = {
            "cutoff": self.cutoff,
            "label": self.label.to_dict(),
            "features": [f.name for f in self.spec.features],
        }
        digest.update(json.dumps(header, sort_keys=True).encode())
        digest.update("\x00".join(self.person_ids).encode())
        digest.update(np.ascontiguousarray(self.X, dtype=np.float32).tobytes())
        digest.update(np.ascontiguousarray(self.y, dtype=np.float64).tobytes())
        return digest.hexdigest()

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "cutoff": self.cutoff,
            "label": self.label.to_dict(),
            "rows": self.rows,
            "skipped_unborn": self.skipped_unborn,
            "skipped_unlabelled": self.skipped_unlabelled,
            "skipped_truncated": self.skipped_truncated,
            "observed_until": self.observed_until,
            "data_hash": self.data_hash,
        }
        if self.label.columns == ("label",) and self.rows:
            values, counts = np.unique(self.y[:, 0], return_counts=True)
            out["label_counts"] = {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)}
        return out


def _check_window(label: LabelSpec, cutoff: float, end: float) -> None:
    if cutoff + label.horizon > end:
        raise InvalidArgument(
            "cutoff",
            f"the label window (closing {format_duration(label.horizon)} after the cut-off) ends after the last event "
            f"the store holds ({end - cutoff:.0f} s after it): choose a cut-off at least that long before the end "
            "of the data",
        )


def _born(stored: StoredProfile, cutoff: float) -> bool:
    """The person had an event by `cutoff`: one retained, or one dropped into a timeline base cut by then."""
    if stored.timeline and stored.timeline[0].at <= cutoff:
        return True
    return any(part["base"]["at"] <= cutoff for part in stored.doc.get("parts", []) if part.get("base") is not None)


class _Rows:
    """Rows collected one stored profile at a time (a list or a streamed store read alike); with no label,
    every person seen by the cut-off gives a row (unsupervised models)."""

    def __init__(self, spec: ModelSpec, label: LabelSpec | None, cutoff: float) -> None:
        self.spec, self.label, self.cutoff = spec, label, cutoff
        self.defs = ComputedTraits.from_dicts(list(spec.computed_traits))
        self.person_ids: list[str] = []
        self.fields: list[dict[str, Any]] = []
        self.labels: list[tuple[float, ...]] = []
        self.unborn = self.unlabelled = self.truncated = 0
        self.last_event = float("-inf")

    def add(self, stored: StoredProfile) -> None:
        if stored.timeline:
            self.last_event = max(self.last_event, stored.timeline[-1].at)
        # A labelled row is refused when what retention dropped reaches it uncovered (module docstring).
        if self.label is not None and not whole_at(stored, self.defs, self.cutoff):
            firsts = [p["first_seen"] for p in stored.doc.get("parts", []) if p.get("first_seen") is not None]
            if firsts and min(firsts) <= self.cutoff:  # seen by T: a row it would have had, but wrong
                self.truncated += 1
                return
        if not _born(stored, self.cutoff):
            self.unborn += 1
            return
        if self.label is not None:
            cutoff = self.cutoff
            value = self.label.label((e for e in stored.timeline if e.at > cutoff), cutoff)
            if value is None:
                self.unlabelled += 1
                return
            self.labels.append(value)
        self.person_ids.append(stored.person_id)
        self.fields.append(fields_at_cutoff(stored, self.defs, self.cutoff))

    def matrix(self) -> np.ndarray:
        assembler = FeatureAssembler(self.spec)
        if not self.fields:
            return np.empty((0, assembler.width), dtype=np.float32)
        return assembler.matrix(self.fields, self.cutoff)

    def finish(self, end: float) -> TrainingSet:
        assert self.label is not None
        columns = len(self.label.columns)
        y = np.asarray(self.labels, dtype=np.float64).reshape(len(self.labels), columns)
        return TrainingSet(
            self.cutoff,
            self.label,
            self.spec,
            self.person_ids,
            self.fields,
            self.matrix(),
            y,
            end,
            self.unborn,
            self.unlabelled,
            self.truncated,
        )


def training_set(
    profiles: Sequence[StoredProfile],
    *,
    spec: ModelSpec,
    label: LabelSpec | Mapping[str, Any],
    cutoff: float,
    until: float | None = None,
) -> TrainingSet:
    """The rows of `spec`'s features at `cutoff`, labelled by `label` (see the module docstring).

    `until`: the end of the observed data (default: the last event in `profiles`)."""
    if not isinstance(label, LabelSpec):
        label = LabelSpec.from_dict(label)
    end = observed_until(profiles) if until is None else until
    _check_window(label, cutoff, end)
    rows = _Rows(spec, label, cutoff)
    with _collector_spared() as between_batches:
        for start in range(0, len(profiles), 500):
            for stored in profiles[start : start + 500]:
                rows.add(stored)
            between_batches()
    return rows.finish(end)


# Batches between collections while a set is built. The per-person work makes no reference cycles (checked:
# a collection after 500 persons finds nothing to free), the store's async reads a few dozen; a collection
# over what is not frozen yet costs about as much as the work before it, so it runs now and then.
COLLECT_EVERY = 20


@contextlib.contextmanager
def _collector_spared() -> Iterator[Callable[[], None]]:
    """Python's cycle collector walks every container it tracks, and building a set keeps hundreds of
    thousands alive (every row's fields, the timelines read): its automatic full collections over them
    took about half the CPU of building a set. So while a set is built (or a store read) the collector
    runs only between batches, every COLLECT_EVERY of them: once over what is not frozen, then what is
    still alive is frozen, left out of every later collection. All is given back to it at the end."""
    enabled = gc.isenabled()
    gc.disable()
    batches = 0

    def between_batches() -> None:
        nonlocal batches
        batches += 1
        if batches % COLLECT_EVERY == 0:
            gc.collect()
            gc.freeze()

    try:
        yield between_batches
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()


async def training_set_from_store(
    store: Store,
    *,
    spec: ModelSpec,
    label: LabelSpec | Mapping[str, Any],
    cutoff: float,
    until: float | None = None,
    batch: int = 500,
    workers: int = 1,
) -> TrainingSet:
    """`training_set` read from the store a batch of profiles at a time: the same rows, while memory
    holds the rows' fields and a few batches of timelines instead of every timeline in the store. Without
    `until`, the window is checked against the last event once every profile has been read.

    With `workers` > 1, batches are turned into rows in that many processes while this one reads and
    decodes the next (the two halves of the work cost about the same); the rows come back in the order
    read, so the result is the same."""
    if not isinstance(label, LabelSpec):
        label = LabelSpec.from_dict(label)
    if until is not None:
        _check_window(label, cutoff, until)
    rows = _Rows(spec, label, cutoff)
    with _collector_spared() as between_batches:
        if workers <= 1:
            async for profiles in iter_profiles(store, batch=batch):
                for stored in profiles:
                    rows.add(stored)
                between_batches()
        else:
            await _rows_in_workers(store, rows, batch, workers, between_batches)
    end = rows.last_event if until is None else until
    _check_window(label, cutoff, end)
    result = rows.finish(end)
    order = np.argsort(result.person_ids, kind="stable")  # the list path's order: by person id
    if np.any(order != np.arange(len(order))):
        ids = [result.person_ids[i] for i in order]
        result = TrainingSet(
            result.cutoff,
            result.label,
            result.spec,
            ids,
            [result.fields[i] for i in order],
            result.X[order],
            result.y[order],
            result.observed_until,
            result.skipped_unborn,
            result.skipped_unlabelled,
            result.skipped_truncated,
        )
    return result


_WORKER: dict[str, Any] = {}


def _start_worker(spec: dict[str, Any], label: dict[str, Any], cutoff: float) -> None:
    _WORKER.update(spec=ModelSpec.from_dict(spec), label=LabelSpec.from_dict(label), cutoff=cutoff)


def _batch_rows(profiles: list[StoredProfile]) -> tuple[Any, ...]:
    rows = _Rows(_WORKER["spec"], _WORKER["label"], _WORKER["cutoff"])
    for stored in profiles:
        rows.add(stored)
    return rows.person_ids, rows.fields, rows.labels, rows.unborn, rows.unlabelled, rows.truncated, rows.last_event


async def _rows_in_workers(
    store: Store, rows: _Rows, batch: int, workers: int, between_batches: Callable[[], None]
) -> None:
    assert rows.label is not None
    loop = asyncio.get_running_loop()
    initargs = (rows.spec.to_dict(), rows.label.to_dict(), rows.cutoff)
    with ProcessPoolExecutor(max_workers=workers, initializer=_start_worker, initargs=initargs) as pool:
        pending: collections.deque[asyncio.Future] = collections.deque()

        async def take() -> None:
            person_ids, fields, labels, unborn, unlabelled, truncated, last_event = await pending.popleft()
            rows.person_ids += person_ids
            rows.fields += fields
            rows.labels += labels
            rows.unborn += unborn
            rows.unlabelled += unlabelled
            rows.truncated += truncated
            rows.last_event = max(rows.last_event, last_event)

        async for profiles in iter_profiles(store, batch=batch):
            pending.append(loop.run_in_executor(pool, _batch_rows, profiles))
            between_batches()
            while len(pending) > 2 * workers:  # bounded: the reader waits for the workers
                await take()
        while pending:
            await take()


def feature_rows(
    profiles: Iterable[StoredProfile], *, spec: ModelSpec, cutoff: float
) -> tuple[list[str], np.ndarray, int]:
    """Unlabelled rows at `cutoff` (person ids, features, persons not yet seen by then): every person with
    an event at or before the cut-off, features as `training_set` builds them. Persons whose timeline
    retention cut short are not refused here (see the module docstring): their rows are undercounted."""
    rows = _Rows(spec, None, cutoff)
    for stored in profiles:
        rows.add(stored)
    return rows.person_ids, rows.matrix(), rows.unborn
