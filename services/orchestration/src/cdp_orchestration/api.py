"""gRPC OrchestrationService: protobuf in, journeys / commands / store reads, protobuf out.

Journeys are written here (validated by the domain, stored, announced to the other replicas). Everything
that changes a person - Enroll, ExitInstance, ApproveAction, RejectAction - is a command published to the
person's partition (`orchestration.in.<p>`) and applied by the engine that owns it, the one writer of
that person's instances and arbiter state; the call then waits (`answer_timeout`) for the engine's answer
in the store. A command is published with a stable message id (the idempotency key, the instance or
action id), so a retried call is applied once; a call that times out has still been accepted (it is in
the stream) and says so.

Reads (instances, decisions, approvals, stats) come from the store. Errors name the request field.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_kit.bus import Bus, partition_for
from cdp_kit.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from cdp_kit.storage import Store
from cdp_kit.storage.port import decode_cursor, encode_cursor
from cdp_orchestration import streams
from cdp_orchestration.catalogue import Catalogues
from cdp_orchestration.dispatch import Opens
from cdp_orchestration.domain import experiments, lifecycle
from cdp_orchestration.domain.document import JourneyInvalid, parse_journey
from cdp_orchestration.domain.journey import Journey, ScheduleEntry
from cdp_orchestration.domain.lifecycle import JourneyRecord, State
from cdp_orchestration.journeys import DRAFT, Journeys
from cdp_orchestration.merges import decision_persons
from cdp_orchestration.messages import (
    APPROVAL_OF_PB,
    JOURNEY_STATE,
    STATE_OF_PB,
    approval_message,
    decision_message,
    held_message,
    identifier,
    inbox_message,
    instance_message,
    offset,
    page_size,
    person_id,
    read_definition,
    required,
    set_time,
    struct_dict,
    token,
)
from cdp_orchestration.state import APPROVALS, DECISIONS, ENROLLMENTS, INSTANCES, PERSONS, STATS

POLL = 0.02  # seconds between looks at the store while a call waits for the engine's answer

SCOPES = {
    "ValidateJourney": "orchestration:read",
    "CreateJourney": "orchestration:admin",
    "UpdateJourney": "orchestration:admin",
    "PublishJourney": "orchestration:admin",
    "PauseJourney": "orchestration:admin",
    "ResumeJourney": "orchestration:admin",
    "ArchiveJourney": "orchestration:admin",
    "GetJourney": "orchestration:read",
    "ListJourneys": "orchestration:read",
    "Enroll": "orchestration:write",
    "ExitInstance": "orchestration:write",
    "GetInstance": "orchestration:read",
    "ListInstances": "orchestration:read",
    "ListApprovals": "orchestration:read",
    "ApproveAction": "orchestration:approve",
    "RejectAction": "orchestration:approve",
    "GetJourneyStats": "orchestration:read",
    "ListDecisions": "orchestration:read",
    "ListInbox": "orchestration:inbox",
    "MarkInboxRead": "orchestration:inbox",
    "SubscribeInbox": "orchestration:inbox",
}


class OrchestrationApi:
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

    # --- journeys ------------------------------------------------------------------------------------------

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
        await self._save(lifecycle.create(journey))
        return await self._journey(journey.id)

    async def UpdateJourney(self, request, context) -> pb.Journey:
        journey_id = required(request.journey_id, "journey_id")
        record = await self._record(journey_id)
        journey = parse_journey(read_definition(request.definition), await self.catalogues.current())
        await self._save(lifecycle.save_draft(record, journey))
        return await self._journey(journey_id)

    async def PublishJourney(self, request, context) -> pb.Journey:
        journey_id = required(request.journey_id, "journey_id")
        record = await self._record(journey_id)
        invalid = self.journeys.invalid.get((journey_id, DRAFT))
        if invalid is not None:
            raise FailedPrecondition(
                f"journey {journey_id}'s draft, as stored, no longer validates ({invalid}): save a fixed draft "
                "(cdpctl journey update) and publish that"
            )
        previous = record.live
        published = lifecycle.publish(record)
        # Conditions on past events read computed traits the profile service keeps: define them before the
        # version goes live, or its conditions would silently see nothing.
        live = published.live
        if live is not None and live.computed_traits:
            if self.define_traits is None:
                raise FailedPrecondition(
                    f"journey {journey_id} has conditions on past events, which need the profile service's "
                    "computed traits: set CDP_PROFILE_ADDRESS"
                )
            await self.define_traits(live.computed_traits)
        await self._save(published)
        if request.migration == pb.MIGRATION_MAP_BY_NODE_ID and previous is not None:
            await self._migrate(published, previous)
        if live is not None and isinstance(live.entry, ScheduleEntry):
            await self._arm_members(live)
        return await self._journey(journey_id)

    async def PauseJourney(self, request, context) -> pb.Journey:
        return await self._move(request.journey_id, lifecycle.pause)

    async def ResumeJourney(self, request, context) -> pb.Journey:
        return await self._move(request.journey_id, lifecycle.resume)

    async def ArchiveJourney(self, request, context) -> pb.Journey:
        record = await self._record(required(request.journey_id, "journey_id"))
        if record.state is not State.ARCHIVED:
            await self._save(lifecycle.archive(record))
        answer = await self._journey(record.id)
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
        for journey_id in ids[start : start + size]:
            response.journeys.append(await self._journey(journey_id))
        if start + size < len(ids):
            response.next_page_token = token(start + size)
        return response

    async def _record(self, journey_id: str) -> JourneyRecord:
        record = await self.journeys.reload(journey_id)
        if record is None:
            raise NotFound(f"journey {journey_id} does not exist")
        return record

    async def _save(self, record: JourneyRecord) -> None:
        await self.journeys.save(record)
        if self.announce is not None:
            await self.announce(record.id)

    async def _move(self, journey_id: str, change: Callable[[JourneyRecord], JourneyRecord]) -> pb.Journey:
        record = await self._record(required(journey_id, "journey_id"))
        await self._save(change(record))
        return await self._journey(journey_id)

    async def _journey(self, journey_id: str, version: int = 0) -> pb.Journey:
        record = self.journeys.get(journey_id)
        doc = self.journeys.docs[journey_id]
        shown: Journey | None = record.versions.get(version) if version else (record.live or record.draft)
        live = record.live
        message = pb.Journey(
            id=journey_id,
            name=shown.name if shown else "",
            state=JOURNEY_STATE[record.state],
            version=live.version if live else 0,
            draft_version=record.draft.version if record.draft is not None else 0,
            priority=shown.priority if shown else 0,
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
        return message

    async def _migrate(self, record: JourneyRecord, previous: Journey) -> None:
        new = record.live
        assert new is not None
        for old in record.versions.values():
            if old.version == new.version:
                continue
            plan = lifecycle.migration_plan(old, new)
            async for doc in self._instances_of(record.id, running=True):
                if doc["version"] != old.version or doc.get("node") not in plan.moves:
                    continue
                body = {
                    "person_id": doc["person_id"],
                    "instance_id": doc["id"],
                    "journey_id": record.id,
                    "from_version": old.version,
                    "to_version": new.version,
                    "moves": sorted(plan.moves),
                }
                await self._command(doc["person_id"], "migrate", body, f"migrate:{doc['id']}:{new.version}")

    async def _arm_members(self, journey: Journey) -> None:
        """Each member of a scheduled journey's segment gets a timer at their next slot (in their zone), set
        by their own engine; people joining the segment later get theirs as they join."""
        segment = journey.entry.segment  # type: ignore[union-attr]
        async for stored in self.store.scan_all(PERSONS):
            if segment in stored.doc.get("segments", ()):
                body = {"person_id": stored.key, "journey_id": journey.id}
                await self._command(stored.key, "arm", body, f"arm:{journey.id}:{journey.version}:{stored.key}")

    async def _instances_of(self, journey_id: str, *, running: bool) -> AsyncIterator[dict[str, Any]]:
        async for stored in self.store.scan_all(INSTANCES):
            doc = stored.doc
            if doc["journey_id"] == journey_id and (not running or doc["status"] != "ended"):
                yield doc

    # --- instances -------------------------------------------------------------------------------------

    async def Enroll(self, request, context) -> pb.EnrollResponse:
        journey_id = required(request.journey_id, "journey_id")
        person = person_id(request.person_id, "person_id")
        properties = struct_dict(request.properties, "properties") if request.HasField("properties") else {}
        key = identifier(request.idempotency_key, "idempotency_key") if request.idempotency_key else uuid.uuid4().hex
        record = await self._record(journey_id)
        if record.live is None:
            raise FailedPrecondition(f"journey {journey_id} has never been published; PublishJourney first")
        if self.person_exists is not None and not await self.person_exists(person):
            raise NotFound(f"person {person} has no profile: look the id up with `cdpctl profile TYPE VALUE`")
        body = {"person_id": person, "journey_id": journey_id, "idempotency_key": key, "properties": properties}
        await self._command(person, "enroll", body, f"enroll:{journey_id}:{key}")
        doc = await self._answer(lambda: self._doc(ENROLLMENTS, f"{journey_id}:{key}"), "Enroll")
        return pb.EnrollResponse(entered=doc["entered"], instance_id=doc["instance_id"], reason=doc["reason"])

    async def ExitInstance(self, request, context) -> pb.Instance:
        instance_id = required(request.instance_id, "instance_id")
        doc = await self._instance(instance_id)
        if doc["status"] != "ended":
            reason = f"api:{request.reason}" if request.reason else "api:exit requested"
            body = {"person_id": doc["person_id"], "instance_id": instance_id, "reason": reason}
            await self._command(doc["person_id"], "exit", body, f"exit:{instance_id}")

            async def ended() -> dict[str, Any] | None:
                now = await self._doc(INSTANCES, instance_id)
                return now if now is not None and now["status"] == "ended" else None

            doc = await self._answer(ended, "ExitInstance")
        return instance_message(doc)

    async def GetInstance(self, request, context) -> pb.Instance:
        return instance_message(await self._instance(required(request.instance_id, "instance_id")))

    async def ListInstances(self, request, context) -> pb.ListInstancesResponse:
        if bool(request.person_id) == bool(request.journey_id):
            raise InvalidArgument("person_id", "give a person_id or a journey_id (one of the two)")
        size, start = page_size(request.page_size), offset(request.page_token)
        field, value = ("person_id", request.person_id) if request.person_id else ("journey_id", request.journey_id)
        found = [r.doc for r in await self.store.find(INSTANCES, field, value, limit=10_000)]
        messages = [instance_message(doc) for doc in found]
        if request.states:
            messages = [m for m in messages if m.state in set(request.states)]
        messages.sort(key=lambda m: (m.entered_at.seconds, m.entered_at.nanos, m.id), reverse=True)
        response = pb.ListInstancesResponse(instances=messages[start : start + size])
        if start + size < len(messages):
            response.next_page_token = token(start + size)
        return response

    async def _instance(self, instance_id: str) -> dict[str, Any]:
        doc = await self._doc(INSTANCES, instance_id)
        if doc is None:
            raise NotFound(f"instance {instance_id} does not exist")
        return doc

    # --- approvals ----------------------------------------------------------------------------------------

    async def ListApprovals(self, request, context) -> pb.ListApprovalsResponse:
        size, start = page_size(request.page_size), offset(request.page_token)
        wanted = {APPROVAL_OF_PB[s] for s in request.states if s in APPROVAL_OF_PB} or {"pending"}
        found = [
            r.doc
            async for r in self.store.scan_all(APPROVALS)
            if r.doc["state"] in wanted and (not request.journey_id or r.doc["journey_id"] == request.journey_id)
        ]
        found.sort(key=lambda d: (d["requested_at"], d["action_id"]), reverse=True)
        response = pb.ListApprovalsResponse(approvals=[approval_message(d) for d in found[start : start + size]])
        if start + size < len(found):
            response.next_page_token = token(start + size)
        return response

    async def ApproveAction(self, request, context) -> pb.Approval:
        return await self._decide(request, "approve")

    async def RejectAction(self, request, context) -> pb.Approval:
        return await self._decide(request, "reject")

    async def _decide(self, request, command: str) -> pb.Approval:
        action_id = required(request.action_id, "action_id")
        doc = await self._doc(APPROVALS, action_id)
        if doc is None:
            raise NotFound(f"no action {action_id} waits for approval")
        if doc["state"] != "pending":
            raise FailedPrecondition(f"action {action_id} is {doc['state']} already")
        body = {
            "person_id": doc["person_id"],
            "action_id": action_id,
            "decided_by": request.decided_by,
            "note": request.note,
        }
        await self._command(doc["person_id"], command, body, f"{command}:{action_id}")

        async def decided() -> dict[str, Any] | None:
            now = await self._doc(APPROVALS, action_id)
            return now if now is not None and now["state"] != "pending" else None

        return approval_message(await self._answer(decided, f"{command.capitalize()}Action"))

    # --- stats and decisions -------------------------------------------------------------------------------

    async def GetJourneyStats(self, request, context) -> pb.JourneyStats:
        journey_id = required(request.journey_id, "journey_id")
        record = await self._record(journey_id)
        totals = await self._stats(journey_id, request.version)
        stats = pb.JourneyStats(
            journey_id=journey_id,
            entered=totals["entered"],
            active=totals["entered"] - sum(totals["ended"].values()),
            converted=totals["converted"],
        )
        stats.ended.update(totals["ended"])
        stats.decisions.update(totals["decisions"])
        journey = record.versions.get(request.version) if request.version else record.live
        if journey is not None:
            tally = {
                node: {name: experiments.Counts(*cell) for name, cell in variants.items()}
                for node, variants in totals["variants"].items()
            }
            for node_id, rows in experiments.split_stats(journey, tally).items():
                for row in rows:
                    stats.variants.add(
                        split_node=node_id,
                        variant=row.variant,
                        control=row.control,
                        entered=row.entries,
                        converted=row.conversions,
                        conversion_rate=row.rate or 0.0,
                        uplift=row.uplift or 0.0,
                        p_value=row.p_value if row.p_value is not None else 1.0,
                    )
        return stats

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

    async def ListDecisions(self, request, context) -> pb.ListDecisionsResponse:
        """The person's decisions, newest first, with those of every person merged into them; an id merged
        into another reads the survivor's (each decision names the person it was decided for). The first
        page starts with the actions held now until the profile applies the person's latest event (no
        decision yet: `messages.held_message`)."""
        person_id = required(request.person_id, "person_id")
        size = page_size(request.page_size)
        after = None
        if request.page_token:
            try:
                after = decode_cursor(request.page_token)
            except InvalidArgument:
                raise InvalidArgument("page_token", "is not a token this service gave") from None
        persons = await decision_persons(self.store, person_id)
        response = pb.ListDecisionsResponse()
        # Keys are `<person>:<inverted time>:...`: each person's scan reads the newest first, and merging the
        # scans by what follows the person id reads them all in one order. The token is the last one read.
        pending: dict[str, collections.deque] = {}
        cursors: dict[str, str | None] = {p: encode_cursor(f"{p}:{after}") if after else None for p in persons}
        last = None
        while len(response.decisions) < size:
            for person in persons:
                if not pending.get(person) and person in cursors:
                    page = await self.store.scan(
                        DECISIONS, prefix=f"{person}:", cursor=cursors[person], limit=min(size, 100)
                    )
                    pending[person] = collections.deque(page.records)
                    if page.next_cursor is None:
                        del cursors[person]
                    else:
                        cursors[person] = page.next_cursor
            heads = [(queue[0].key[len(person) + 1 :], person) for person, queue in pending.items() if queue]
            if not heads:
                break
            last, person = min(heads)
            doc = pending[person].popleft().doc
            if request.journey_id and doc["journey_id"] != request.journey_id:
                continue
            if request.action_id and doc["action_id"] != request.action_id:
                continue
            response.decisions.append(decision_message(doc))
        if last is not None and (cursors or any(pending.values())):
            response.next_page_token = encode_cursor(last)
        if after is None:
            # Read after the decisions: an action decided between the two reads is then not held any more.
            # One whose decision is read but whose hold is not yet cleared is listed once, as decided.
            decided = {d.action_id for d in response.decisions if d.kind != pb.DECISION_KIND_DEFERRED}
            held = await self._held(persons[0], request.journey_id, request.action_id)
            fresh = [h for h in held if h.action_id not in decided]
            if fresh:
                listed = list(response.decisions)
                del response.decisions[:]
                response.decisions.extend(fresh + listed)
        return response

    async def _held(self, person_id: str, journey_id: str, action_id: str) -> list[pb.Decision]:
        """The person's actions held for the profile (a merge hands those of the merged to the survivor)."""
        record = await self.store.get(PERSONS, person_id)
        held = record.doc["arbiter"]["deferred"] if record is not None and record.doc.get("arbiter") else []
        return [
            held_message(person_id, h)
            for h in held
            if h.get("profile")
            and (not journey_id or h["action"]["journey_id"] == journey_id)
            and (not action_id or h["action"]["action_id"] == action_id)
        ]

    # --- inbox -------------------------------------------------------------------------------------------

    def _inbox(self):
        if self.inbox is None:
            raise FailedPrecondition("the in-app channel is not running in this replica")
        return self.inbox

    async def ListInbox(self, request, context) -> pb.ListInboxResponse:
        person_id = required(request.person_id, "person_id")
        messages, token = await self._inbox().list(
            person_id,
            unread_only=request.unread_only,
            page_size=request.page_size or 50,
            page_token=request.page_token or None,
        )
        return pb.ListInboxResponse(messages=[inbox_message(m) for m in messages], next_page_token=token or "")

    async def MarkInboxRead(self, request, context) -> pb.MarkInboxReadResponse:
        person_id = required(request.person_id, "person_id")
        marked = await self._inbox().mark_read(person_id, list(request.message_ids))
        # Each newly read message is opened once: Message Opened goes back in like any outcome.
        await self.opens.opened(person_id, marked)
        return pb.MarkInboxReadResponse(marked=len(marked))

    async def SubscribeInbox(self, request, context):
        person_id = required(request.person_id, "person_id")
        inbox = self._inbox()
        async with inbox.subscribe(person_id) as subscription:
            # Subscribed before listing, so nothing falls between the two; a message in both comes once.
            unread, _ = await inbox.list(person_id, unread_only=True, page_size=500)
            seen = set()
            for message in reversed(unread):
                seen.add(message.message_id)
                yield inbox_message(message)
            async for message in subscription:
                if message.message_id not in seen:
                    yield inbox_message(message)

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
