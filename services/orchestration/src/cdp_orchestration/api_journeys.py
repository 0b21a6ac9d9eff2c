"""A journey's life through the API: validate, create, save a draft (UpdateJourney), publish, pause, resume,
archive, get, list.

Journeys are written here: validated by the domain (`domain.document.parse_journey`, against the catalogues
of the moment), decided on the record as stored and saved against the version read (`Journeys.change`: a
change saved meanwhile by another call or replica is decided again or refused, never written over), then
announced to the other replicas. Publishing defines the computed traits the live version's conditions read
(the profile service's) before it goes live; with MIGRATION_MAP_BY_NODE_ID it moves running instances to the
new version, and a scheduled journey arms each member of its segment (read from the members' index, not
from every person; a publish stopped before every member was armed is armed again at the next start). Archiving ends the journey's running
instances, each through its person's engine. The draft's own calls (GetJourney's `draft`, DiscardDraft) are
in drafts.py.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_kit.bus import partition_for
from cdp_kit.errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable
from cdp_orchestration import streams
from cdp_orchestration.api_base import expected_revision
from cdp_orchestration.catalogue import SCORING, SEGMENTATION
from cdp_orchestration.domain import lifecycle
from cdp_orchestration.domain.document import JourneyInvalid, parse_journey
from cdp_orchestration.domain.journey import Journey, ScheduleEntry
from cdp_orchestration.domain.lifecycle import JourneyRecord, State
from cdp_orchestration.drafts import DraftCalls
from cdp_orchestration.journey_changes import always, draft_as_read
from cdp_orchestration.journeys import DRAFT
from cdp_orchestration.messages import STATE_OF_PB, offset, page_size, read_definition, required, token
from cdp_orchestration.state import ARMING, MEMBERS, members_prefix

ARM_PAGE = 500  # members read, and arm commands sent in one batch, at a time


class JourneyCalls(DraftCalls):
    """The journey lifecycle RPCs of OrchestrationService (a part of `api.OrchestrationApi`), the draft's among them."""

    async def ValidateJourney(self, request, context) -> pb.ValidateJourneyResponse:
        try:
            parse_journey(read_definition(request.definition), await self.catalogues.current())
        except JourneyInvalid as invalid:
            return pb.ValidateJourneyResponse(
                problems=[pb.Problem(node=p.node, field=p.field, message=p.message) for p in invalid.problems]
            )
        return pb.ValidateJourneyResponse()

    async def CreateJourney(self, request, context) -> pb.Journey:
        journey = parse_journey(read_definition(request.definition), await self.catalogues.current())
        if journey.id in self.journeys.records or await self.journeys.reload(journey.id) is not None:
            raise AlreadyExists(f"journey {journey.id} exists; UpdateJourney changes its draft")
        await self.journeys.add(lifecycle.create(journey))  # AlreadyExists too when created meanwhile
        await self._announce(journey.id)
        return await self._journey(journey.id)

    async def UpdateJourney(self, request, context) -> pb.Journey:
        journey_id = required(request.journey_id, "journey_id")
        expected = expected_revision(request)
        parsed: list[Journey] = []  # read once the journey is found (NOT_FOUND first), kept for a decision again

        async def save_draft(record: JourneyRecord) -> JourneyRecord:
            if not parsed:
                parsed.append(parse_journey(read_definition(request.definition), await self.catalogues.current()))
            return lifecycle.save_draft(record, parsed[0])

        await self._change(journey_id, save_draft, draft_as_read, expected)
        return await self._journey(journey_id)

    async def PublishJourney(self, request, context) -> pb.Journey:
        journey_id = required(request.journey_id, "journey_id")
        expected = expected_revision(request)

        async def publish(record: JourneyRecord) -> JourneyRecord:
            invalid = self.journeys.invalid.get((journey_id, DRAFT))
            if invalid is not None:
                raise FailedPrecondition(
                    f"journey {journey_id}'s draft, as stored, no longer validates ({invalid}): save a fixed "
                    "draft (cdpctl journey update) and publish that"
                )
            published = lifecycle.publish(record)
            live = published.live
            if live is not None:
                await self._check_live(live)
            # Conditions on past events read computed traits the profile service keeps: define them before
            # the version goes live, or its conditions would silently see nothing.
            if live is not None and live.computed_traits:
                if self.define_traits is None:
                    raise FailedPrecondition(
                        f"journey {journey_id} has conditions on past events, which need the profile service's "
                        "computed traits: set CDP_PROFILE_ADDRESS"
                    )
                await self.define_traits(live.computed_traits)
            return published

        # Noted before the version is saved, gone once its members are armed: a publish that stops in between
        # (a crash, the bus refusing a command) is armed again at the next start (`resume_arming`).
        # Each call its own note: a concurrent publish of the journey that fails drops its own only.
        note = f"{journey_id}:{uuid.uuid4().hex}"
        await self.store.put(ARMING, note, {"journey_id": journey_id, "at": time.time()})
        try:
            changed = await self._change(journey_id, publish, draft_as_read, expected)
        except Exception:
            await self.store.delete(ARMING, note)  # nothing saved
            raise
        previous, published = changed.read.record.live, changed.saved
        assert published is not None
        live = published.live
        if request.migration == pb.MIGRATION_MAP_BY_NODE_ID and previous is not None:
            await self._migrate(published, previous)
        if live is not None and isinstance(live.entry, ScheduleEntry):
            await self._arm_members(live)
        await self.store.delete(ARMING, note)
        return await self._journey(journey_id)

    async def _check_live(self, journey: Journey) -> None:
        """The version going live, checked again against what exists now: a segment deleted (or a model
        withdrawn) since its draft was saved is refused here, naming the field, rather than going live on
        something that never fires. The services that know what it names must answer (`Catalogues.current`)."""
        required = set()
        if journey.segments:
            required.add(SEGMENTATION)
        if any(name.startswith("scores.") for name in journey.fields_read):
            required.add(SCORING)
        catalogue = await self.catalogues.current(required=frozenset(required))
        if catalogue is not None:
            parse_journey(journey.document, catalogue)

    async def PauseJourney(self, request, context) -> pb.Journey:
        return await self._move(request.journey_id, lifecycle.pause)

    async def ResumeJourney(self, request, context) -> pb.Journey:
        return await self._move(request.journey_id, lifecycle.resume)

    async def ArchiveJourney(self, request, context) -> pb.Journey:
        journey_id = required(request.journey_id, "journey_id")
        await self._change(
            journey_id, lambda r: lifecycle.archive(r) if r.state is not State.ARCHIVED else None, always
        )
        answer = await self._journey(journey_id)
        # Its running instances end with reason "archived", each through its person's engine. Archiving
        # again sweeps again (a call interrupted half-way is retried safely).
        async for doc in self._instances_of(request.journey_id, running=True):
            await self._command(
                doc["person_id"],
                "exit",
                {"person_id": doc["person_id"], "instance_id": doc["id"], "reason": "archived"},
                f"exit:{doc['id']}",
            )
        return answer

    async def GetJourney(self, request, context) -> pb.Journey:
        journey_id = required(request.journey_id, "journey_id")
        if request.draft:
            return await self._draft(journey_id, request.version)
        record = await self._record(journey_id)
        if request.version and request.version not in record.versions:
            raise NotFound(f"journey {journey_id} has no published version {request.version}")
        return await self._journey(journey_id, request.version)

    async def ListJourneys(self, request, context) -> pb.ListJourneysResponse:
        await self.journeys.load()  # journeys created through other replicas too
        size, start = page_size(request.page_size), offset(request.page_token)
        wanted = {STATE_OF_PB[s] for s in request.states if s in STATE_OF_PB} or {
            State.DRAFT,
            State.ACTIVE,
            State.PAUSED,
        }
        ids = sorted(i for i, r in self.journeys.records.items() if r.state in wanted)
        response = pb.ListJourneysResponse()
        segments: list = []  # segmentation's list, read once for the page (the journeys' warnings)
        for journey_id in ids[start : start + size]:
            response.journeys.append(await self._journey(journey_id, segments=segments))
        if start + size < len(ids):
            response.next_page_token = token(start + size)
        return response

    async def _move(self, journey_id: str, change: Callable[[JourneyRecord], JourneyRecord]) -> pb.Journey:
        await self._change(required(journey_id, "journey_id"), change, always)
        return await self._journey(journey_id)

    async def _migrate(self, record: JourneyRecord, previous: Journey) -> None:
        new = record.live
        assert new is not None
        plans = {
            old.version: lifecycle.migration_plan(old, new)
            for old in record.versions.values()
            if old.version != new.version
        }
        # The journey's running instances, read once for every earlier version (`_instances_of`).
        async for doc in self._instances_of(record.id, running=True):
            plan = plans.get(doc["version"])
            if plan is not None and doc.get("node") in plan.moves:
                body = {
                    "person_id": doc["person_id"],
                    "instance_id": doc["id"],
                    "journey_id": record.id,
                    "from_version": doc["version"],
                    "to_version": new.version,
                    "moves": sorted(plan.moves),
                }
                await self._command(doc["person_id"], "migrate", body, f"migrate:{doc['id']}:{new.version}")

    async def _arm_members(self, journey: Journey) -> None:
        """Each member of a scheduled journey's segment gets a timer at their next slot (in their zone), set
        by their own engine; people joining the segment later get theirs as they join. The members are read
        from `MEMBERS` (the segment's rows, a page at a time, each page's commands sent together), not from
        every person's record; a row of someone who left meanwhile arms nothing (`timers.arm` checks the
        person's own segments). Sent again, a command is the same message (its id), and arming an armed
        person changes nothing: a publish armed again after a crash arms each member once."""
        segment = journey.entry.segment  # type: ignore[union-attr]
        cursor = None
        while True:
            page = await self.store.scan(MEMBERS, cursor=cursor, limit=ARM_PAGE, prefix=members_prefix(segment))
            commands = []
            for row in page.records:
                person_id = row.doc["person_id"]
                body = {"person_id": person_id, "journey_id": journey.id}
                msg_id = f"arm:{journey.id}:{journey.version}:{person_id}"
                commands.append(streams.command(partition_for(person_id, self.partitions), "arm", body, msg_id))
            if commands and not all(r.ok for r in await self.bus.publisher.publish_batch(commands)):
                raise Unavailable(
                    f"journey {journey.id} is published, but arming its segment's members could not be stored in "
                    "JetStream; it is done again at the next start of the service"
                )
            cursor = page.next_cursor
            if cursor is None:
                return

    async def resume_arming(self) -> int:
        """Arm the members of every scheduled journey whose publish stopped before it had armed them all
        (`ARMING`), then drop the note; the number of journeys armed. Run at start, beside the engine."""
        armed = 0
        async for note in self.store.scan_all(ARMING):
            record = await self.journeys.reload(note.doc["journey_id"])
            live = record.live if record is not None and record.state is not State.ARCHIVED else None
            if live is not None and isinstance(live.entry, ScheduleEntry):
                await self._arm_members(live)
                armed += 1
            await self.store.delete(ARMING, note.key)
        return armed
