"""gRPC IdentityService: protobuf in, domain calls, protobuf out. The rules live in `domain`."""

from __future__ import annotations

import time
import uuid

from cdp.identity.v1 import identity_pb2, identity_pb2_grpc
from cdp_identity.codec import identifier_message, merge_record, timestamp
from cdp_identity.domain.normalize import split_key
from cdp_identity.engine import IdentityEngine
from cdp_identity.matching_service import MatchingService
from cdp_kit import timestamps
from cdp_kit.errors import InvalidArgument
from cdp_kit.interceptors import current_caller


def _pairs(identifiers, field: str = "identifiers") -> list[tuple[str, str]]:
    pairs = []
    for index, ident in enumerate(identifiers):
        if not ident.type:
            raise InvalidArgument(f"{field}[{index}].type", "is required (user_id, email, phone, anonymous_id, ...)")
        if not ident.value:
            raise InvalidArgument(f"{field}[{index}].value", "is required")
        pairs.append((ident.type, ident.value))
    return pairs


def _milliseconds(stamp, field: str) -> int:
    if timestamps.valid_ns(stamp):
        return timestamps.to_ms(stamp)
    raise InvalidArgument(
        field,
        f"seconds={stamp.seconds}, nanos={stamp.nanos} is not a Timestamp: it must lie in the years "
        "0001..9999 with nanos in 0..999999999",
    )


def _dropped(key_or_type: str, value: str | None, reason: str) -> identity_pb2.DroppedIdentifier:
    if value is None:
        kind, value = split_key(key_or_type)
    else:
        kind = key_or_type
    return identity_pb2.DroppedIdentifier(identifier=identity_pb2.Identifier(type=kind, value=value), reason=reason)


def graph_response(graph: dict) -> identity_pb2.GetGraphResponse:
    response = identity_pb2.GetGraphResponse(
        person_id=graph["person"], created_at=timestamp(graph["created_at"]), apart=graph["apart"]
    )
    for ident in graph["identifiers"]:
        response.identifiers.add(
            identifier=identity_pb2.Identifier(type=ident["type"], value=ident["value"]),
            added_at=timestamp(ident["added_at"]),
            owner=ident["owner"],
            quarantined=ident["quarantined"],
        )
    response.merges.extend(merge_record(m) for m in graph["merges"])
    for undone in graph["undone"]:  # merges undone by Unmerge: kept with when, by whom and why
        response.unmerged.add(
            merge=merge_record(undone),
            undone_at=timestamp(undone["undone_at"]),
            undone_by=undone.get("undone_by", ""),
            reason=undone.get("reason", ""),
        )
    for drop in graph["drops"]:
        response.drops.add(
            dropped=_dropped(drop["identifier"], None, drop["reason"]),
            event_id=drop["event_id"],
            at=timestamp(drop["at"]),
        )
    return response


class IdentityApi(identity_pb2_grpc.IdentityServiceServicer):
    def __init__(self, engine: IdentityEngine, matching: MatchingService) -> None:
        self.engine = engine
        self.matching = matching

    async def Resolve(self, request: identity_pb2.ResolveRequest, context) -> identity_pb2.ResolveResponse:
        pairs = _pairs(request.identifiers)
        if not pairs:
            raise InvalidArgument("identifiers", "give at least one identifier")
        at = _milliseconds(request.at, "at") if request.HasField("at") else int(time.time() * 1000)
        request_id = request.request_id or f"resolve:{uuid.uuid4()}"
        resolution, rejected = await self.engine.resolve(pairs, request_id=request_id, at=at)
        response = identity_pb2.ResolveResponse(person_id=resolution.person, created=resolution.created)
        response.merges.extend(merge_record(m) for m in resolution.merges)
        response.dropped.extend(_dropped(r.type, r.value, r.reason) for r in rejected)
        response.dropped.extend(_dropped(d.key, None, d.reason) for d in resolution.drops)
        return response

    async def Lookup(self, request: identity_pb2.LookupRequest, context) -> identity_pb2.LookupResponse:
        person = await self._person(request, "identifier")
        graph = await self.engine.describe(person)
        return identity_pb2.LookupResponse(
            person_id=graph["person"],
            identifiers=[identity_pb2.Identifier(type=i["type"], value=i["value"]) for i in graph["identifiers"]],
        )

    async def GetGraph(self, request: identity_pb2.GetGraphRequest, context) -> identity_pb2.GetGraphResponse:
        person = await self._person(request, "identifier")
        return graph_response(await self.engine.describe(person))

    async def _person(self, request, identifier_field: str) -> str:
        which = request.WhichOneof("key")
        if which == "person_id":
            if not request.person_id:
                raise InvalidArgument("person_id", "is empty")
            return await self.engine.canonical(request.person_id)
        if which == identifier_field:
            ident = request.identifier
            _pairs([ident], identifier_field)
            return await self.engine.lookup_identifier(ident.type, ident.value)
        raise InvalidArgument("key", f"give person_id or {identifier_field}")

    async def Merge(self, request: identity_pb2.MergeRequest, context) -> identity_pb2.MergeResponse:
        for field in ("person_id", "other_person_id"):
            if not getattr(request, field):
                raise InvalidArgument(field, "is required")
        cause = {"event_id": f"api:{uuid.uuid4()}", "identifiers": [], "rule": "api", "detail": request.reason}
        merge = await self.engine.merge(request.person_id, request.other_person_id, cause=cause, force=request.force)
        if merge is None:
            return identity_pb2.MergeResponse(person_id=await self.engine.canonical(request.person_id))
        return identity_pb2.MergeResponse(person_id=merge.winner, merge=merge_record(merge))

    async def Unmerge(self, request: identity_pb2.UnmergeRequest, context) -> identity_pb2.UnmergeResponse:
        if not request.merge_id:
            raise InvalidArgument("merge_id", "is required (see GetGraph's merges)")
        split = await self.engine.unmerge(request.merge_id, reason=request.reason, by=current_caller().name)
        return identity_pb2.UnmergeResponse(
            winner=split.winner,
            loser=split.loser,
            loser_identifiers=[identifier_message(k) for k in split.loser_identifiers],
        )

    async def ListQuarantined(self, request, context) -> identity_pb2.ListQuarantinedResponse:
        response = identity_pb2.ListQuarantinedResponse()
        for key, person, at in await self.engine.list_quarantined():
            response.identifiers.add(identifier=identifier_message(key), person_id=person, quarantined_at=timestamp(at))
        return response

    async def SetQuarantine(
        self, request: identity_pb2.SetQuarantineRequest, context
    ) -> identity_pb2.SetQuarantineResponse:
        (pair,) = _pairs([request.identifier], "identifier")
        changed = await self.engine.set_quarantine(*pair, request.quarantined)
        return identity_pb2.SetQuarantineResponse(changed=changed)

    async def MatchRecords(
        self, request: identity_pb2.MatchRecordsRequest, context
    ) -> identity_pb2.MatchRecordsResponse:
        return await self.matching.match_records(request)

    async def MatchRecordsBulk(self, request_iterator, context):
        async for progress in self.matching.match_records_bulk(request_iterator):
            yield progress

    async def ListReviews(self, request: identity_pb2.ListReviewsRequest, context) -> identity_pb2.ListReviewsResponse:
        return await self.matching.list_reviews(request)

    async def ResolveReview(
        self, request: identity_pb2.ResolveReviewRequest, context
    ) -> identity_pb2.ResolveReviewResponse:
        return await self.matching.resolve_review(request)

    async def GetMatchingModel(
        self, request: identity_pb2.GetMatchingModelRequest, context
    ) -> identity_pb2.GetMatchingModelResponse:
        return self.matching.model()


SCOPES = {
    "Resolve": "identity:write",
    "Lookup": "identity:read",
    "GetGraph": "identity:read",
    "Merge": "identity:admin",
    "Unmerge": "identity:admin",
    "ListQuarantined": "identity:read",
    "SetQuarantine": "identity:admin",
    "MatchRecords": "identity:write",
    "GetMatchingModel": "identity:read",
    "MatchRecordsBulk": "identity:write",
    "ListReviews": "identity:read",
    "ResolveReview": "identity:admin",
}
