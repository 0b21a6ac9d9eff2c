"""The segment catalogue: segment definitions, their lifecycle states, and their storage.

A segment is `building` until its first whole-population build (builds.py) is done, then `live`; a
build that fails leaves it `failed` (a definition that went live before keeps serving: `serving`). An
update keeps the live definition serving while the new one (`pending`) is built. Definitions are stored
in `segmentation_segments` and announced on `segmentation.segments.changed`, so every replica follows
a create, an update or a delete made on another (`reload`); a segment already live when this replica
hears of it is adopted over the persons held here (builds.py), never taken as it is.

Computed traits on the profile service belong to the definitions that read them: a definition may need
at most `max_computed_traits` of them, and a trait is deleted on the profile service as soon as nothing
here reads it any more, that is no segment serving or being built with it and no `Estimate` under way
(a segment deleted, an update that dropped a condition, a create whose build failed, an estimate done).
The fields held for a deleted trait are forgotten with it, so a trait defined again later starts from
what the profile service publishes then, never from values that were current before.

A stored segment that cannot be loaded (a definition from an older release that the language now
refuses) is left out, logged with its id, and can still be deleted: one bad record never keeps the
service from starting or listing the others.

`Catalogue` is the part of `SegmentationEngine` that owns these operations; the state it reads is set up
in the engine's `__init__`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from cdp_kit.bus import subjects
from cdp_kit.bus.consumer import describe_error
from cdp_kit.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from cdp_kit.profile_fields import COMPUTED, field_key
from cdp_segmentation.domain import (
    CompiledSegment,
    check_segment_graph,
    compile_segment,
    from_json,
    to_json,
)
from cdp_segmentation.domain.graph import UNNAMED
from cdp_segmentation.evaluation import Transition
from cdp_segmentation.fields import KnownFields, check_fields
from cdp_segmentation.hints import definition_warnings
from cdp_segmentation.journeys import named

log = logging.getLogger("cdp.segmentation.engine")

SEGMENTS = "segmentation_segments"
BUILDING, LIVE, FAILED = "building", "live", "failed"
ANNOUNCE = subjects.SEGMENTATION_SEGMENTS_CHANGED
SEGMENT_ID = re.compile(r"[a-z][a-z0-9_-]{0,63}")
# Nesting accepted when loading a stored definition: more than the API accepts (MAX_DEPTH), so segments
# stored before that limit still load and can be deleted; protobuf could never have carried deeper ones.
STORED_MAX_DEPTH = 100

TraitDefiner = Callable[[Sequence[Mapping[str, Any]]], Awaitable[None]]


@dataclass(slots=True)
class Segment:
    """One segment: its live definition, and the one being built when an update is under way."""

    id: str
    name: str
    description: str
    version: int
    compiled: CompiledSegment
    state: str = BUILDING
    created_at: float = 0.0
    updated_at: float = 0.0
    live_at: float = 0.0
    error: str = ""
    done: int = 0
    total: int = 0
    # An update being built: (version, compiled); the live definition above keeps serving meanwhile.
    pending: tuple[int, CompiledSegment] | None = None
    # Whether the live definition has ever gone live (a failed first build leaves nothing live).
    serving: bool = False
    # The last build's difference: entered, exited, and a sample of each.
    last_diff: tuple[int, int, list[str], list[str]] = (0, 0, [], [])
    # What the last create or update's definition seems to read wrong (hints.py): that call's answer only.
    warnings: list[str] = field(default_factory=list)
    # The live definition's per-profile predicate and whether time moves it (read per change: no lookups).
    predicate: Callable[..., bool] = field(init=False, repr=False)
    timed: bool = field(init=False, default=False)
    refs: frozenset[str] = field(init=False, default=frozenset())

    def __post_init__(self) -> None:
        self.serve(self.compiled, self.version)

    def serve(self, compiled: CompiledSegment, version: int) -> None:
        self.compiled, self.version = compiled, version
        self.predicate, self.timed, self.refs = compiled.predicate, compiled.time_dependent, compiled.segments

    def doc(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "version": self.version,
            "tree": orjson.dumps(to_json(self.compiled.node)).decode(),
            "counted": sorted(self.compiled.counted),
            "state": self.state,
            "serving": self.serving,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "live_at": self.live_at,
            "error": self.error,
            "pending": None
            if self.pending is None
            else {
                "version": self.pending[0],
                "tree": orjson.dumps(to_json(self.pending[1].node)).decode(),
                "counted": sorted(self.pending[1].counted),
            },
        }

    @property
    def definition(self) -> CompiledSegment:
        """The definition the next whole-population run is for."""
        return self.pending[1] if self.pending is not None else self.compiled

    @property
    def building_version(self) -> int:
        return self.pending[0] if self.pending is not None else self.version


def segment_from_doc(
    segment_id: str, doc: Mapping[str, Any], percentiles: Mapping[str, float | None] | None = None
) -> Segment:
    """A stored segment (any exception: it cannot be loaded); `percentiles`: the engine's live values. The
    counted computed traits it was checked with (`counted`: read as 0 where missing) are stored with it, so
    every replica and every restart compiles it the same (one stored before they were has none)."""
    held = percentiles if percentiles is not None else {}
    compiled = stored_definition(doc, held)
    pending = None
    if doc.get("pending"):
        pending = (doc["pending"]["version"], stored_definition(doc["pending"], held))
    return Segment(
        id=segment_id,
        name=doc.get("name", ""),
        description=doc.get("description", ""),
        version=doc["version"],
        compiled=compiled,
        state=doc["state"],
        created_at=doc.get("created_at", 0.0),
        updated_at=doc.get("updated_at", 0.0),
        live_at=doc.get("live_at", 0.0),
        error=doc.get("error", ""),
        pending=pending,
        serving=doc.get("serving", False),
    )


def stored_definition(doc: Mapping[str, Any], percentiles: Mapping[str, float | None]) -> CompiledSegment:
    """A definition as stored: its tree (JSON text) and the counted fields it reads as 0 where missing."""
    node = from_json(orjson.loads(doc["tree"]), max_depth=STORED_MAX_DEPTH)
    return compile_segment(node, percentiles, counted=frozenset(doc.get("counted") or ()))


def check_segment_id(segment_id: str, field: str = "id") -> str:
    if not SEGMENT_ID.fullmatch(segment_id or ""):
        raise InvalidArgument(
            field, f"{segment_id!r} must be 1-64 characters: a lowercase letter, then lowercase letters, digits, _ or -"
        )
    return segment_id


@dataclass(frozen=True, slots=True)
class TraitReaders:
    """What reads a computed trait (`Catalogue.computed_trait_readers`); None: that service was not asked."""

    segments: list[tuple[str, str]]
    journeys: list[tuple[str, str]] | None
    models: list[tuple[str, str, str]] | None


class Catalogue:
    """Create, update, delete and follow segments; the computed traits they own."""

    async def known(self) -> KnownFields:
        """The scores and computed traits that exist now, as far as their services answer (fields.py)."""
        return await self.known_fields() if self.known_fields is not None else KnownFields()

    def compile(self, node, *, segment_id: str | None = None, known: KnownFields | None = None) -> CompiledSegment:
        """Compile a definition and check it against the fields that exist (`known`: a new definition's), the
        other segments (known references, no cycles) and the number of computed traits one definition may
        have defined on the profile service."""
        counted = known.counted_fields() if known is not None else frozenset()
        compiled = compile_segment(node, self.percentiles, counted=counted)
        if known is not None:
            check_fields(compiled, known)
        if len(compiled.computed_traits) > self.max_computed_traits:
            raise InvalidArgument(
                "definition",
                f"needs {len(compiled.computed_traits)} computed traits on the profile service (one per distinct "
                f"event condition); at most {self.max_computed_traits} per definition "
                "(CDP_SEGMENTATION_MAX_COMPUTED_TRAITS)",
            )
        name = segment_id or UNNAMED
        if name in self.segments:
            refs = {s.id: s.definition.segments for s in self.segments.values()}
        else:
            # A definition no segment refers to yet (a create, an estimate): a cycle through it, or a reference
            # it brings that does not exist, is among the segments it reaches, so only those are checked, not
            # every segment (about 2 µs each: most of the 3,000th create's CPU once the index grew by it).
            refs = {}
            reach = list(compiled.segments)
            while reach:
                reached = self.segments.get(ref := reach.pop())
                if reached is not None and ref not in refs:
                    refs[ref] = reached.definition.segments
                    reach.extend(reached.definition.segments)
        refs[name] = compiled.segments
        check_segment_graph(refs)
        return compiled

    async def warnings(self, compiled: CompiledSegment) -> list[str]:
        """What the definition seems to read wrong about the persons held here (hints.py): never refused."""
        return await definition_warnings(compiled.node, [person.fields for person in self.persons.values()])

    async def create(self, segment_id: str, node, *, name: str = "", description: str = "") -> Segment:
        known = await self.known()  # asked before the lock: other lifecycle calls never wait on it
        async with self._lifecycle_lock:
            if segment_id in self.segments:
                raise AlreadyExists(f"segment {segment_id!r} exists (UpdateSegment changes it)")
            compiled = self.compile(node, segment_id=segment_id, known=known)
            now = self.clock()
            segment = Segment(
                id=segment_id,
                name=name,
                description=description,
                version=1,
                compiled=compiled,
                state=BUILDING,
                created_at=now,
                updated_at=now,
            )
            segment.warnings = await self.warnings(compiled)
            await self.store.put(SEGMENTS, segment_id, segment.doc())
            self.segments[segment_id] = segment
        await self._announce({"segment": segment_id})
        # Names and ids only: a definition's literals are customer data (`traits.email = "..."`).
        log.info("segment created", extra={"segment": segment_id, "version": 1, "fields": sorted(compiled.fields)})
        self._start_build(segment, reason="created")
        return segment

    async def update(
        self, segment_id: str, node=None, *, name: str | None = None, description: str | None = None
    ) -> Segment:
        known = await self.known() if node is not None else None
        async with self._lifecycle_lock:
            segment = self.get(segment_id)
            if node is not None:  # checked before anything changes: a refused update changes nothing
                compiled = self.compile(node, segment_id=segment_id, known=known)
                segment.warnings = await self.warnings(compiled)
            else:
                segment.warnings = []
            if name:
                segment.name = name
            if description:
                segment.description = description
            if node is not None:
                task = self._builds.pop(segment_id, None)
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                replaced = segment.pending[1] if segment.pending is not None else None
                segment.pending = (segment.building_version + 1, compiled)
                segment.state, segment.error = BUILDING, ""
            segment.updated_at = self.clock()
            await self.store.put(SEGMENTS, segment_id, segment.doc())
            if node is not None and replaced is not None:
                await self._release_traits(replaced)  # a build this update cancelled
        await self._announce({"segment": segment_id})
        log.info(
            "segment updated",
            extra={
                "segment": segment_id,
                "version": segment.building_version,
                "fields": sorted(segment.definition.fields),
            },
        )
        if node is not None:
            self._start_build(segment, reason="updated" if segment.serving else "created")
        return segment

    async def delete(self, segment_id: str, *, force: bool = False) -> int:
        # Asked before the lock, as `known` is: other lifecycle calls never wait on orchestration.
        journeys = await self._journeys_using(segment_id) if not force and segment_id in self.segments else []
        async with self._lifecycle_lock:
            if segment_id not in self.segments and segment_id in self.unreadable:
                await self.store.delete(SEGMENTS, segment_id)
                del self.unreadable[segment_id]
                log.info("unreadable stored segment deleted", extra={"segment": segment_id})
                return 0
            segment = self.get(segment_id)
            users = sorted(s.id for s in self.segments.values() if segment_id in s.definition.segments)
            if users:
                raise FailedPrecondition(
                    f"segment {segment_id!r} is referred to by {', '.join(users)}; change or delete those first",
                    reason="segment_in_use",
                )
            if journeys:
                raise FailedPrecondition(
                    f"segment {segment_id!r} is used by live journeys {named(journeys)} (they enter on it, are "
                    "scheduled over it or read its membership): archive them or publish versions without it "
                    "first, or force the deletion",
                    reason="segment_used_by_journeys",
                )
            version, at = segment.building_version + 1, self.clock()
            exited = await self._drop(segment_id, version=version, at=at)
            await self.store.delete(SEGMENTS, segment_id)
            await self._release_traits(segment.compiled, segment.definition)
        await self._announce({"segment": segment_id, "deleted": {"version": version, "at": at}})
        log.info("segment deleted", extra={"segment": segment_id, "exited": exited})
        return exited

    async def _drop(self, segment_id: str, *, version: int, at: float) -> int:
        """Forget a segment: its members exit (reason "deleted"), published before anything is forgotten."""
        task = self._builds.pop(segment_id, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        # Published after every batch applied so far, before any applied next (stream.py).
        async with self._quiet():
            by_partition: dict[int, list[Transition]] = {}
            for person_id in sorted(self.members.get(segment_id, ())):
                by_partition.setdefault(self._partition(person_id), []).append(
                    Transition(person_id, segment_id, False, at, "deleted", version, f"v{version}")
                )
            await self._publish([m for p, ts in sorted(by_partition.items()) for m in self._messages(p, ts)])
            exited = 0
            for person_id in self.members.pop(segment_id, set()):
                person = self.persons.get(person_id)
                if person is not None and person.members.pop(segment_id, None) is not None:
                    exited += 1
                    self.held.mark(person_id)
            self.segments.pop(segment_id, None)
            self._reindex()
        await self.snapshot()
        return exited

    async def _journeys_using(self, segment_id: str) -> list[tuple[str, str]]:
        """(id, name) of the live journeys that use the segment; none when orchestration is not configured,
        Unavailable when it cannot be asked."""
        if self.live_journeys is None:
            return []
        try:
            journeys = await self.live_journeys()
        except Unavailable as exc:
            raise Unavailable(
                f"{exc.message}; try again, or force the deletion", retry_after=5.0, reason=exc.reason
            ) from None
        return [(j.id, j.name) for j in journeys if segment_id in j.segments]

    async def computed_trait_readers(self, name: str) -> TraitReaders:
        """What reads the computed trait `name`: segments and live journeys as (id, name), deployed model
        versions as (model, version, role), each sorted. A segment reads it when its definition (the one
        serving, or the one being built) reads `computed.<name>` or compiles an event condition to it; a
        model version when a feature's path does. Journeys (models): None when orchestration (scoring) is
        not configured; Unavailable when it cannot be asked. Both are asked at once. Reads no lock: the
        profile service asks this while a segment's deletion here releases traits."""
        key = field_key(COMPUTED, name)

        def reads(compiled: CompiledSegment) -> bool:
            return any(f == key or f.startswith(key + ".") for f in compiled.fields) or any(
                t.get("name") == name for t in compiled.computed_traits
            )

        segments = sorted(
            (s.id, s.name)
            for s in self.segments.values()
            if (s.serving and reads(s.compiled)) or (s.state == BUILDING and reads(s.definition))
        )

        async def journeys() -> list[tuple[str, str]] | None:
            if self.readers_journeys is None:
                return None
            return sorted((j.id, j.name) for j in await self.readers_journeys() if name in j.computed)

        async def models() -> list[tuple[str, str, str]] | None:
            if self.readers_models is None:
                return None
            return sorted((m.name, m.version, m.role) for m in await self.readers_models() if name in m.computed)

        found_journeys, found_models = await asyncio.gather(journeys(), models(), return_exceptions=True)
        if isinstance(found_journeys, BaseException):
            raise found_journeys
        if isinstance(found_models, BaseException):
            raise found_models
        return TraitReaders(segments, found_journeys, found_models)

    def _traits_in_use(self) -> set[str]:
        """The computed traits something here reads: a segment's live definition (once it has served), the
        one being built, and every Estimate under way. A failed first build reads nothing."""
        names: set[str] = set()
        for segment in self.segments.values():
            if segment.serving:
                names.update(t["name"] for t in segment.compiled.computed_traits)
            if segment.state == BUILDING:
                names.update(t["name"] for t in segment.definition.computed_traits)
        for estimating in self._estimating:
            names |= estimating
        return names

    async def _release_traits(self, *definitions: CompiledSegment) -> None:
        """Delete on the profile service the computed traits of these definitions that nothing reads any
        more, and forget the values held for them (best effort: a trait left behind costs the profile
        service work, not correctness; the next release of the same trait tries again)."""
        names = {t["name"] for compiled in definitions for t in compiled.computed_traits} - self._traits_in_use()
        if not names or self.undefine_traits is None:
            return
        try:
            await self.undefine_traits(sorted(names))
        except Exception as exc:
            log.warning(
                "could not delete computed traits on the profile service",
                extra={"traits": sorted(names), "error": describe_error(exc)},
            )
            return
        # The profile service publishes nothing when it deletes a trait: without this, a trait defined
        # again later would be read with the values it had before (a person it now counts 0 for keeps them).
        fields = {field_key(COMPUTED, name) for name in names}
        for person_id, person in self.persons.items():
            if not fields.isdisjoint(person.fields):
                for name in fields:
                    person.fields.pop(name, None)
                self.held.mark(person_id)

    async def _announce(self, what: Mapping[str, Any]) -> None:
        if self.announce is not None:
            try:
                await self.announce(orjson.dumps(what).decode())
            except Exception as exc:  # the others pick it up from the store when they restart
                log.warning(
                    "could not announce a segment change to the other replicas", extra={"error": describe_error(exc)}
                )

    async def reload(self, announcement: str) -> None:
        """Another replica created, changed or deleted a segment: do the same here. Transitions carry the
        same ids (definition version, stored times), so JetStream keeps one copy of each."""
        what = orjson.loads(announcement)
        segment_id = what["segment"]
        record = await self.store.get(SEGMENTS, segment_id)
        async with self._lifecycle_lock:
            current = self.segments.get(segment_id)
            if record is None:
                deleted = what.get("deleted")
                if current is not None and deleted:
                    await self._drop(segment_id, version=deleted["version"], at=deleted["at"])
                return
            loaded = segment_from_doc(segment_id, record.doc, self.percentiles)
            if current is None:
                self.segments[segment_id] = loaded
                if loaded.state == BUILDING:
                    self._start_build(loaded, reason="updated" if loaded.serving else "created")
                elif loaded.serving:
                    # Built on the other replica before this one heard of it: its persons only (builds.py).
                    await self.adopt(loaded)
                return
            current.name, current.description, current.updated_at = loaded.name, loaded.description, loaded.updated_at
            if loaded.building_version > current.building_version:
                task = self._builds.pop(segment_id, None)
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                current.pending = (loaded.building_version, loaded.definition)
                current.state, current.error = BUILDING, ""
                self._start_build(current, reason="updated" if current.serving else "created")

    def get(self, segment_id: str) -> Segment:
        segment = self.segments.get(segment_id)
        if segment is None:
            raise NotFound(f"no segment {segment_id!r}", reason="unknown_segment")
        return segment

    async def wait_live(self, segment_id: str) -> Segment:
        """The segment once it is no longer being built (live, or failed); across builds that replace
        one another (an update while the create's build runs)."""
        while True:
            segment = self.get(segment_id)
            if segment.state != BUILDING:
                return segment
            task = self._builds.get(segment_id)
            if task is None:
                await asyncio.sleep(0.02)  # the replacing build has not started yet
            else:
                await asyncio.wait({task})  # unlike awaiting it, does not raise when it is cancelled
