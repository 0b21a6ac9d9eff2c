"""The API's reads of what journeys did: a journey's stats (entries, conversions, exits by reason, the
arbiter's decisions, each split variant against its control) and a person's decision history, the actions
held for the profile first.

Both read the store only: the engines write stats and decisions as they apply each batch, so a read may
trail the engines by a batch, never invent or lose a decision.

A person a privacy deletion forgot has no decisions left; rather than an empty list ("no journey tried to
reach them"), ListDecisions then answers NOT_FOUND with reason `person_deleted`, naming the privacy request
and when orchestration had it. It knows from the deletion's marker (`privacy.DELETED`, written for the
person and everyone merged into them as the notice arrives; no personal data), which is kept
CDP_ORCHESTRATION_TOMBSTONE_DAYS (35): a person deleted longer ago reads as one never reached.
"""

from __future__ import annotations

import collections

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_kit.errors import InvalidArgument, NotFound
from cdp_kit.person_export import rfc3339
from cdp_kit.storage.port import decode_cursor, encode_cursor
from cdp_orchestration.api_base import ApiBase
from cdp_orchestration.domain import experiments
from cdp_orchestration.merges import decision_persons
from cdp_orchestration.messages import decision_message, held_message, page_size, required
from cdp_orchestration.privacy import DELETED
from cdp_orchestration.state import DECISIONS, PERSONS, SENDS, decision_order, decisions_prefix, not_entered_prefix


class ReadCalls(ApiBase):
    """GetJourneyStats and ListDecisions (a part of `api.OrchestrationApi`)."""

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
        # Refused entries (one per journey, `state.not_entered_key`) are read whole and merged in by their time.
        pending: dict[str, collections.deque] = {}
        cursors: dict[str, str | None] = {p: encode_cursor(f"{p}:{after}") if after else None for p in persons}
        refused = await self._not_entered(persons, after)
        if refused:
            pending[""] = refused
        last = None
        while len(response.decisions) < size:
            for person in persons:
                if not pending.get(person) and person in cursors:
                    page = await self.store.scan(
                        DECISIONS, prefix=decisions_prefix(person), cursor=cursors[person], limit=min(size, 100)
                    )
                    pending[person] = collections.deque(
                        (record.key[len(person) + 1 :], record.doc) for record in page.records
                    )
                    if page.next_cursor is None:
                        del cursors[person]
                    else:
                        cursors[person] = page.next_cursor
            heads = [(queue[0][0], person) for person, queue in pending.items() if queue]
            if not heads:
                break
            last, person = min(heads)
            doc = pending[person].popleft()[1]
            if request.journey_id and doc["journey_id"] != request.journey_id:
                continue
            if request.action_id and doc["action_id"] != request.action_id:
                continue
            response.decisions.append(decision_message(doc))
        if last is not None and (cursors or any(pending.values())):
            response.next_page_token = encode_cursor(last)
        await self._deliveries(response.decisions)
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
            if not response.decisions:
                await self._refuse_deleted(person_id)
        return response

    async def _refuse_deleted(self, person_id: str) -> None:
        """NOT_FOUND (`person_deleted`) for a person a privacy deletion forgot (see the module docstring)."""
        record = await self.store.get(DELETED, person_id)
        if record is None:
            return
        doc = record.doc
        raise NotFound(
            f"person {person_id} was deleted (privacy request {doc.get('request_id', '')}, received "
            f"{rfc3339(doc.get('at'))}): orchestration keeps no decisions, nor anything else, about them",
            reason="person_deleted",
        )

    async def _deliveries(self, decisions) -> None:
        """What became of each SENT decision's send (its record in `orchestration_sends`, one read for the
        page): the arbiter letting an action through is not the provider taking it."""
        sent = [d for d in decisions if d.kind == pb.DECISION_KIND_SENT and d.action_id]
        if not sent:
            return
        records = await self.store.get_many(SENDS, {d.action_id for d in sent})
        for decision in sent:
            record = records.get(decision.action_id)
            if record is not None:
                decision.delivery = str(record.doc.get("status") or "")
                decision.delivery_reason = str(record.doc.get("reason") or "")

    async def _not_entered(self, persons: list[str], after: str | None) -> collections.deque:
        """The persons' refused entries after the cursor `after`, as (order, doc), newest first; the order
        sorts with the decisions' keys (what follows the person id) at the refusal's time."""
        found = []
        for person in persons:
            async for record in self.store.scan_all(DECISIONS, prefix=not_entered_prefix(person)):
                order = f"{decision_order(record.doc['at'])}:~entry:{record.doc['journey_id']}:{person}"
                if after is None or order > after:
                    found.append((order, record.doc))
        return collections.deque(sorted(found, key=lambda item: item[0]))

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
