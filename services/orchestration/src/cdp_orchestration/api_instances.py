"""What the API does to people in journeys: enrol a person, exit an instance, read instances, and the
approval gate's list with its approve / reject.

Everything that changes a person is a command to the engine owning the person's partition, the one writer
of that person's instances and arbiter state (`ApiBase._command`); the call then waits for the engine's
answer in the store (`ApiBase._answer`). The command's message id is the idempotency key (enrol) or the
instance or action id, so a retried call is applied once and reads the first answer. Reads come from the
store. Errors name the request field.
"""

from __future__ import annotations

import uuid
from typing import Any

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_kit.errors import FailedPrecondition, InvalidArgument, NotFound
from cdp_orchestration.api_base import ApiBase
from cdp_orchestration.messages import (
    APPROVAL_OF_PB,
    approval_message,
    identifier,
    instance_message,
    offset,
    page_size,
    person_id,
    required,
    struct_dict,
    token,
)
from cdp_orchestration.state import APPROVALS, ENROLLMENTS, INSTANCES


class InstanceCalls(ApiBase):
    """Enroll, ExitInstance, GetInstance, ListInstances and the approvals' RPCs (a part of `api.OrchestrationApi`)."""

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
