"""What every part of the gRPC OrchestrationService shares: its collaborators, a journey read and changed
through `journeys.Journeys`, a journey as a `Journey` message, and commands to a person's engine.

A command (enrol, exit, approve, migrate, arm) is published to the person's partition
(`orchestration.in.<p>`) with a stable message id (the idempotency key, the instance or action id), so a
retried call is applied once; the engine owning the partition applies it and writes its answer to the
store, which the call waits for (`answer_timeout`). A call that times out has still been accepted (it is in
the stream) and says so.

`ApiBase` is the base of each part (api_journeys, drafts, api_instances, api_reads, api_inbox), all joined in
`api.OrchestrationApi`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_kit.bus import Bus, partition_for
from cdp_kit.errors import InvalidArgument, NotFound, Unavailable
from cdp_kit.storage import Store
from cdp_orchestration import streams
from cdp_orchestration.catalogue import Catalogues
from cdp_orchestration.dispatch import Opens
from cdp_orchestration.domain.journey import Journey, ScheduleEntry, SegmentEntry
from cdp_orchestration.domain.lifecycle import JourneyRecord, State
from cdp_orchestration.journey_changes import Changed, Decide, Redecide
from cdp_orchestration.journeys import DRAFT, Journeys
from cdp_orchestration.messages import JOURNEY_STATE, set_time
from cdp_orchestration.state import INSTANCES, STATS

POLL = 0.02  # seconds between looks at the store while a call waits for the engine's answer
FIND_PAGE = 1000  # instances read per lookup (`_instances_of`)


def expected_revision(request: Any) -> int:
    """The request's `expected_revision`: the journey's revision as its caller read it (0: not checked)."""
    revision = request.expected_revision
    if revision < 0:
        raise InvalidArgument(
            "expected_revision",
            f"{revision} is no revision: give the journey's revision as read (cdpctl journey get shows it), "
            "or 0 not to check it",
        )
    return revision


class ApiBase:
    def __init__(
        self,
        *,
        journeys: Journeys,
        store: Store,
        bus: Bus,
        partitions: int,
        inbox: Any = None,
        answer_timeout: float = 10.0,
        announce: Callable[[str], Awaitable[None]] | None = None,
        define_traits: Callable[[Sequence[Mapping[str, Any]]], Awaitable[None]] | None = None,
        opens: Opens | None = None,
        catalogues: Catalogues | None = None,
        person_exists: Callable[[str], Awaitable[bool]] | None = None,
        stopping: asyncio.Event | None = None,
    ) -> None:
        self.journeys = journeys
        self.store = store
        self.bus = bus
        self.partitions = partitions
        self.inbox = inbox
        self.answer_timeout = answer_timeout
        self.announce = announce
        self.define_traits = define_traits
        self.opens = opens if opens is not None else Opens(store)
        self.catalogues = catalogues or Catalogues()
        # whether the profile service knows a person id (None: no profile service to ask)
        self.person_exists = person_exists
        # set once the service starts stopping (`ServiceRuntime.stopping`): open streams end then (api_inbox)
        self.stopping = stopping

    # --- journeys ------------------------------------------------------------------------------------------

    async def _record(self, journey_id: str) -> JourneyRecord:
        record = await self.journeys.reload(journey_id)
        if record is None:
            raise NotFound(f"journey {journey_id} does not exist")
        return record

    async def _change(self, journey_id: str, decide: Decide, redecide: Redecide, expected: int = 0) -> Changed:
        """The journey's change decided on the record as stored and saved against the version decided on
        (`Journeys.change`: decided again or refused when someone saved it meanwhile; refused when it is not
        at the revision `expected`, the caller's, when given), then announced."""
        changed = await self.journeys.change(journey_id, decide, redecide=redecide, expected=expected)
        if changed.saved is not None:
            await self._announce(journey_id)
        return changed

    async def _announce(self, journey_id: str) -> None:
        if self.announce is not None:
            await self.announce(journey_id)

    async def _journey(
        self, journey_id: str, version: int = 0, *, draft: bool = False, segments: list | None = None
    ) -> pb.Journey:
        """The journey as the API shows it. `segments`: a list several calls share (ListJourneys), holding
        segmentation's list once one of them has read it."""
        record = self.journeys.get(journey_id)
        doc = self.journeys.docs[journey_id]
        revision = self.journeys.revision(journey_id)  # read with the record: the revision it is
        shown: Journey | None = record.versions.get(version) if version else (record.live or record.draft)
        if draft:
            shown = record.draft
        live = record.live
        message = pb.Journey(
            id=journey_id,
            name=shown.name if shown else "",
            state=JOURNEY_STATE[record.state],
            version=live.version if live else 0,
            draft_version=record.draft.version if record.draft is not None else 0,
            priority=shown.priority if shown else 0,
            revision=revision,
        )
        if shown is not None:
            message.definition.update(dict(shown.document))
        message.invalid = "; ".join(
            f"{'draft' if number == DRAFT else f'v{number}'}: {reason}"
            for (owner, number), reason in sorted(self.journeys.invalid.items())
            if owner == journey_id
        )
        set_time(message.created_at, doc.get("created_at"))
        set_time(message.updated_at, doc.get("updated_at"))
        set_time(message.published_at, doc.get("published_at"))
        totals = await self._stats(journey_id, 0)
        message.active_instances = totals["entered"] - sum(totals["ended"].values())
        if live is not None and live.segments and record.state in (State.ACTIVE, State.PAUSED):
            if segments is None or not segments:
                read = await self.catalogues.segments()
                if segments is not None:
                    segments.append(read)
            else:
                read = segments[0]
            message.warnings.extend(self._gone(live, read))
        return message

    @staticmethod
    def _gone(journey: Journey, existing: frozenset[str] | None) -> list[str]:
        """What the live version names that segmentation no longer has (deleted since it was published)."""
        if existing is None:
            return []  # not configured, or not answering: nothing known to say
        warnings = []
        entry = journey.entry
        entered_on = entry.segment if isinstance(entry, SegmentEntry | ScheduleEntry) else None
        if entered_on is not None and entered_on not in existing:
            how = "is scheduled over" if isinstance(entry, ScheduleEntry) else "enters on"
            warnings.append(
                f"{how} segment {entered_on!r}, which does not exist any more (deleted in segmentation): nobody "
                "enters; publish a version on another segment, or create the segment again"
            )
        for segment in sorted(journey.segments - existing - {entered_on}):
            warnings.append(
                f"reads membership of segment {segment!r}, which does not exist any more (deleted in "
                "segmentation): nobody is a member of it"
            )
        return warnings

    async def _stats(self, journey_id: str, version: int) -> dict[str, Any]:
        prefix = f"{journey_id}:{version}:" if version else f"{journey_id}:"
        totals: dict[str, Any] = {"entered": 0, "converted": 0, "ended": {}, "variants": {}, "decisions": {}}
        async for stored in self.store.scan_all(STATS, prefix=prefix):
            doc = stored.doc
            totals["entered"] += doc["entered"]
            totals["converted"] += doc["converted"]
            for name in ("ended", "decisions"):
                for key, count in doc[name].items():
                    totals[name][key] = totals[name].get(key, 0) + count
            for node, variants in doc["variants"].items():
                for variant, (entries, conversions) in variants.items():
                    cell = totals["variants"].setdefault(node, {}).setdefault(variant, [0, 0])
                    cell[0] += entries
                    cell[1] += conversions
        return totals

    async def _instances_of(self, journey_id: str, *, running: bool) -> AsyncIterator[dict[str, Any]]:
        """The journey's instances (every version's; `running`: those not ended), read page by page through the
        instances' index by journey: publishing (its migration) and archiving read the journey's own instances,
        not every journey's (a scan of the whole collection, once per earlier version when publishing)."""
        after = None
        while True:
            page = await self.store.find(INSTANCES, "journey_id", journey_id, limit=FIND_PAGE, after=after)
            for stored in page:
                doc = stored.doc
                if not running or doc["status"] != "ended":
                    yield doc
            if len(page) < FIND_PAGE:
                return
            after = page[-1].key

    # --- commands -----------------------------------------------------------------------------------------

    async def _command(self, person_id: str, name: str, body: dict[str, Any], msg_id: str) -> None:
        partition = partition_for(person_id, self.partitions)
        [result] = await self.bus.publisher.publish_batch([streams.command(partition, name, body, msg_id)])
        if not result.ok:
            raise Unavailable("the command could not be stored in JetStream; retry")

    async def _answer(self, check: Callable[[], Awaitable[Any]], call: str) -> Any:
        deadline = time.monotonic() + self.answer_timeout
        while True:
            answer = await check()
            if answer:
                return answer
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"{call} was accepted but not applied within {self.answer_timeout:.0f}s (the person's "
                    "partition is busy or moving); it will be applied: retry with the same key to read the answer"
                )
            await asyncio.sleep(POLL)

    async def _doc(self, collection: str, key: str) -> dict[str, Any] | None:
        stored = await self.store.get(collection, key)
        return stored.doc if stored is not None else None
