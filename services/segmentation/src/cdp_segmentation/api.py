"""gRPC SegmentationService: protobuf in, engine calls, protobuf out."""

from __future__ import annotations

import asyncio
import base64
import bisect
import logging
import weakref
from typing import Any

from google.protobuf import json_format, struct_pb2
from google.protobuf.message import DecodeError, EncodeError

from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from cdp_kit.errors import FailedPrecondition, InvalidArgument
from cdp_kit.storage.port import check_key
from cdp_kit.timestamps import set_seconds
from cdp_segmentation.catalogue import BUILDING, FAILED, LIVE, Segment, check_segment_id
from cdp_segmentation.domain import CompiledSegment, Node, from_json, parse, to_json, to_text
from cdp_segmentation.engine import SegmentationEngine
from cdp_segmentation.explain import Explainer

log = logging.getLogger("cdp.segmentation.api")

SCOPES = {
    "GetSegment": "segmentation:read",
    "ListSegments": "segmentation:read",
    "Estimate": "segmentation:read",
    "ListMembers": "segmentation:read",
    "GetMembership": "segmentation:read",
    # Which conditions hold for a person, never their values: a reader's question.
    "ExplainMembership": "segmentation:read",
    # Ids and names of what reads a computed trait: the profile service asks it before deleting one.
    "ListComputedTraitReaders": "segmentation:read",
    "CreateSegment": "segmentation:admin",
    "UpdateSegment": "segmentation:admin",
    "DeleteSegment": "segmentation:admin",
}
STATE_TO_PB = {
    BUILDING: segmentation_pb2.SEGMENT_STATE_BUILDING,
    LIVE: segmentation_pb2.SEGMENT_STATE_LIVE,
    FAILED: segmentation_pb2.SEGMENT_STATE_FAILED,
}
MAX_PAGE = 10_000
DEFAULT_PAGE = 1_000
# ListSegments pages (AIP-158). Unpaged, the listing grew with the segments until it passed the 4 MiB a gRPC
# client receives by default (about 1,000 segments with 4 KB descriptions) and failed for every caller.
# A page also ends before its segments pass SEGMENTS_PAGE_BYTES encoded, whatever page_size asked: one segment
# is at most about 150 KB (64 KiB of text, its tree, a 4,096-character description), so a page always fits.
MAX_SEGMENTS_PAGE = 1_000
DEFAULT_SEGMENTS_PAGE = 100
SEGMENTS_PAGE_BYTES = 3 * 1024 * 1024
# A ListSegments token is the last id listed after this mark. A person id holds no NUL (the store refuses
# one), so a ListMembers token, or anything else, never reads as one.
_SEGMENTS_TOKEN = "segments\x00"
MAX_TEXT = 64 * 1024
# A segment's name and description travel in every GetSegment and ListSegments answer: unlimited, a few
# segments named with megabytes made the listing larger than a client receives (4 MiB by default) or the
# server sends (16 MiB), and it failed for every caller until they were deleted. Characters, as gRPC's
# strings count them after decoding.
MAX_NAME = 256
MAX_DESCRIPTION = 4096


# Errors building or reading back a message whose tree nests deeper than protobuf decodes.
_UNWRITABLE = (DecodeError, EncodeError, json_format.Error, RecursionError, ValueError)


def definition_node(definition: segmentation_pb2.Definition, field: str) -> Node:
    """The node of a Definition (text or JSON tree); errors name `<field>.text` / `<field>.tree...`.
    Both forms are limited in size (MAX_TEXT) and nesting (MAX_DEPTH, in the parsers), and a node is only
    answered once it is known to travel: see `check_readable`."""
    form = definition.WhichOneof("form")
    if form == "text":
        if len(definition.text) > MAX_TEXT:
            raise InvalidArgument(f"{field}.text", f"{len(definition.text)} characters; at most {MAX_TEXT}")
        node = parse(definition.text, field=f"{field}.text")
    elif form == "tree":
        size = definition.tree.ByteSize()
        if size > MAX_TEXT:
            raise InvalidArgument(f"{field}.tree", f"{size} bytes encoded; at most {MAX_TEXT}")
        try:
            tree = json_format.MessageToDict(definition.tree)
        except ValueError:
            # A Struct can carry NaN and the infinities; JSON, and so the tree form, cannot.
            raise InvalidArgument(
                f"{field}.tree", "holds a number that is not finite (NaN or an infinity); use a finite number"
            ) from None
        node = from_json(whole_numbers(tree), field=f"{field}.tree")
    else:
        raise InvalidArgument(field, "is required: text (the readable form) or tree (the JSON form)")
    check_readable(node, field)
    return node


def check_readable(node: Node, field: str) -> None:
    """Never accept what cannot be read back: the node written as a Segment (canonical text and JSON tree)
    inside a ListSegmentsResponse, the deepest message that carries it, must decode, and its text and tree
    must parse again (the text to the very same node). The depth limit makes this hold; checking it here
    keeps a store that every later ListSegments would fail on from ever being written."""
    try:
        message = segmentation_pb2.Segment(text=to_text(node))
        json_format.ParseDict(to_json(node), message.tree)
        carrier = segmentation_pb2.ListSegmentsResponse(segments=[message])
        [carried] = segmentation_pb2.ListSegmentsResponse.FromString(carrier.SerializeToString()).segments
        same_text = parse(carried.text) == node
        from_json(whole_numbers(json_format.MessageToDict(carried.tree)))
    except (*_UNWRITABLE, InvalidArgument) as exc:
        raise InvalidArgument(
            field, f"cannot be written back in a response and read again ({type(exc).__name__}); simplify it"
        ) from None
    if not same_text:
        raise InvalidArgument(field, "does not read back as the same definition from its canonical text")


def check_labels(request: Any) -> None:
    """A create's or update's name and description within their limits (MAX_NAME, MAX_DESCRIPTION)."""
    for field, limit in (("name", MAX_NAME), ("description", MAX_DESCRIPTION)):
        size = len(getattr(request, field))
        if size > limit:
            raise InvalidArgument(field, f"{size} characters; at most {limit}")


def whole_numbers(value: Any) -> Any:
    """A protobuf Struct holds every number as a double: 50 arrives as 50.0. JSON does not tell them
    apart, so a whole number is an int again, and a tree means what the same text means (the same
    canonical text, and the same computed-trait names)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [whole_numbers(v) for v in value]
    return value


# A definition's canonical text and tree as sent (or None: it cannot be sent), per compiled definition: they
# depend on it alone, and writing them (the text, the tree, the tree into a Struct, and the check that it
# decodes inside a response) was about 60 µs of CPU a segment, so a ListSegments of 3,000 segments held the
# event loop, and with it the stream, 0.18 s. Kept while the definition is (weakly: a replaced one goes).
_SENT: weakref.WeakKeyDictionary[CompiledSegment, tuple[str, struct_pb2.Struct] | None] = weakref.WeakKeyDictionary()


def _as_sent(compiled: CompiledSegment) -> tuple[str, struct_pb2.Struct] | None:
    if compiled in _SENT:
        return _SENT[compiled]
    sent: tuple[str, struct_pb2.Struct] | None
    try:
        tree = struct_pb2.Struct()
        json_format.ParseDict(to_json(compiled.node), tree)
        # Decodable by the caller inside the deepest response that carries it (one level above Segment).
        segmentation_pb2.ListSegmentsResponse.FromString(
            segmentation_pb2.ListSegmentsResponse(segments=[segmentation_pb2.Segment(tree=tree)]).SerializeToString()
        )
        sent = (to_text(compiled.node), tree)
    except _UNWRITABLE:
        sent = None
    _SENT[compiled] = sent
    return sent


def segment_message(engine: SegmentationEngine, segment: Segment) -> segmentation_pb2.Segment:
    compiled = segment.definition
    sent = _as_sent(compiled)
    if sent is None:
        # Only a definition stored before the nesting limit existed can get here.
        raise FailedPrecondition(
            f"segment {segment.id!r} has a stored definition nested too deeply to be sent; delete it",
            reason="unreadable_definition",
        )
    text, tree = sent
    message = segmentation_pb2.Segment(
        id=segment.id,
        name=segment.name,
        description=segment.description,
        text=text,
        version=segment.building_version,
        state=STATE_TO_PB[segment.state],
        profiles_done=segment.done,
        profiles_total=segment.total,
        size=len(engine.members.get(segment.id, ())),
        depends_on=sorted(compiled.segments),
        computed_traits=[t["name"] for t in compiled.computed_traits],
        time_dependent=compiled.time_dependent,
        error=segment.error,
    )
    message.tree.CopyFrom(tree)
    set_seconds(message.created_at, segment.created_at)
    set_seconds(message.updated_at, segment.updated_at)
    if segment.live_at:
        set_seconds(message.live_at, segment.live_at)
    return message


def segments_token(last: str) -> str:
    """The opaque ListSegments page token after segment id `last`."""
    return base64.urlsafe_b64encode((_SEGMENTS_TOKEN + last).encode()).decode()


def segments_after(token: str) -> str:
    """The segment id a ListSegments page token continues after; INVALID_ARGUMENT naming `page_token` for a
    token ListSegments did not give."""
    try:
        decoded = base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        decoded = ""
    after = decoded.removeprefix(_SEGMENTS_TOKEN)
    if after == decoded or not after:
        raise InvalidArgument("page_token", "is not a token ListSegments gave")
    return after


class SegmentationApi(segmentation_pb2_grpc.SegmentationServiceServicer):
    def __init__(self, engine: SegmentationEngine, explainer: Explainer | None = None) -> None:
        self.engine = engine
        # A person of another replica's partition is asked of that replica (explain.py); None: this engine
        # answers for the persons it holds.
        self.explainer = explainer if explainer is not None else Explainer(engine)

    async def CreateSegment(self, request: segmentation_pb2.CreateSegmentRequest, context) -> segmentation_pb2.Segment:
        check_segment_id(request.id)
        check_labels(request)
        if not request.HasField("definition"):
            raise InvalidArgument("definition", "is required: text (the readable form) or tree (the JSON form)")
        node = definition_node(request.definition, "definition")
        segment = await self.engine.create(request.id, node, name=request.name, description=request.description)
        warnings = list(segment.warnings)  # this call's: another create or update may replace them
        if request.wait:
            segment = await self.engine.wait_live(segment.id)
        message = segment_message(self.engine, segment)
        message.warnings.extend(warnings)
        return message

    async def UpdateSegment(
        self, request: segmentation_pb2.UpdateSegmentRequest, context
    ) -> segmentation_pb2.UpdateSegmentResponse:
        check_segment_id(request.id)
        check_labels(request)
        node = definition_node(request.definition, "definition") if request.HasField("definition") else None
        segment = await self.engine.update(request.id, node, name=request.name, description=request.description)
        warnings = list(segment.warnings)
        if node is not None:
            segment = await self.engine.wait_live(segment.id)
            if segment.state == FAILED:
                raise FailedPrecondition(
                    f"the new definition could not be evaluated over the population ({segment.error}); "
                    f"version {segment.version} stays live",
                    reason="build_failed",
                )
            entered, exited, sample_entered, sample_exited = segment.last_diff
        else:
            entered, exited, sample_entered, sample_exited = 0, 0, [], []
        message = segment_message(self.engine, segment)
        message.warnings.extend(warnings)
        return segmentation_pb2.UpdateSegmentResponse(
            segment=message,
            entered=entered,
            exited=exited,
            sample_entered=sample_entered,
            sample_exited=sample_exited,
        )

    async def DeleteSegment(
        self, request: segmentation_pb2.DeleteSegmentRequest, context
    ) -> segmentation_pb2.DeleteSegmentResponse:
        check_segment_id(request.id)
        return segmentation_pb2.DeleteSegmentResponse(exited=await self.engine.delete(request.id, force=request.force))

    async def ListComputedTraitReaders(
        self, request: segmentation_pb2.ListComputedTraitReadersRequest, context
    ) -> segmentation_pb2.ListComputedTraitReadersResponse:
        if not request.name:
            raise InvalidArgument("name", "is required: the computed trait's name")
        readers = await self.engine.computed_trait_readers(request.name)
        response = segmentation_pb2.ListComputedTraitReadersResponse(
            journeys_checked=readers.journeys is not None, models_checked=readers.models is not None
        )
        for reader_id, name in readers.segments:
            response.segments.add(id=reader_id, name=name)
        for reader_id, name in readers.journeys or ():
            response.journeys.add(id=reader_id, name=name)
        for model, version, role in readers.models or ():
            response.models.add(name=model, version=version, role=role)
        return response

    async def GetSegment(self, request: segmentation_pb2.GetSegmentRequest, context) -> segmentation_pb2.Segment:
        check_segment_id(request.id)
        return segment_message(self.engine, self.engine.get(request.id))

    async def ListSegments(
        self, request: segmentation_pb2.ListSegmentsRequest, context
    ) -> segmentation_pb2.ListSegmentsResponse:
        """A page of the segments in id order, from the id after the previous page's last (a key, not an
        offset: a segment created or deleted between two pages moves no other one across the boundary, so
        none is listed twice or skipped). Ends at page_size segments or before SEGMENTS_PAGE_BYTES."""
        if request.page_size < 0 or request.page_size > MAX_SEGMENTS_PAGE:
            raise InvalidArgument(
                "page_size",
                f"{request.page_size} is out of range: 0 (default {DEFAULT_SEGMENTS_PAGE}) to {MAX_SEGMENTS_PAGE}",
            )
        after = segments_after(request.page_token) if request.page_token else None
        limit = request.page_size or DEFAULT_SEGMENTS_PAGE
        ids = sorted(self.engine.segments)
        start = 0 if after is None else bisect.bisect_right(ids, after)
        response = segmentation_pb2.ListSegmentsResponse()
        size = 0
        last = None
        for segment_id in ids[start:]:
            if len(response.segments) >= limit:
                break
            segment = self.engine.segments[segment_id]
            # One segment that cannot be sent (stored before the nesting limit) is left out and named in the
            # log; the listing stays readable for everyone.
            try:
                message = segment_message(self.engine, segment)
            except (*_UNWRITABLE, FailedPrecondition) as exc:
                log.error(
                    "segment left out of ListSegments: its definition cannot be sent",
                    extra={"segment": segment.id, "error": type(exc).__name__},
                )
                last = segment_id
                continue
            # The field's tag and length prefix: at most 1 + 5 bytes.
            grown = size + message.ByteSize() + 6
            if response.segments and grown > SEGMENTS_PAGE_BYTES:
                break
            response.segments.append(message)
            size = grown
            last = segment_id
        if last is not None and last != ids[-1]:
            response.next_page_token = segments_token(last)
        return response

    async def Estimate(self, request: segmentation_pb2.EstimateRequest, context) -> segmentation_pb2.EstimateResponse:
        if not request.HasField("definition"):
            raise InvalidArgument("definition", "is required: text (the readable form) or tree (the JSON form)")
        # Parsed in a worker thread: 64 KiB of text is ~0.1 s of work the event loop need not wait for.
        node = await asyncio.to_thread(definition_node, request.definition, "definition")
        estimate = await self.engine.estimate(node)
        compiled = estimate.compiled
        message = segmentation_pb2.EstimateResponse(
            size=estimate.size,
            population=estimate.population,
            sample=estimate.sample,
            text=to_text(compiled.node),
            computed_traits=[t["name"] for t in compiled.computed_traits],
            time_dependent=compiled.time_dependent,
            evaluate_ms=estimate.evaluate_ms,
            warnings=estimate.warnings,
        )
        json_format.ParseDict(to_json(compiled.node), message.tree)
        return message

    async def ListMembers(
        self, request: segmentation_pb2.ListMembersRequest, context
    ) -> segmentation_pb2.ListMembersResponse:
        check_segment_id(request.segment_id, "segment_id")
        if request.page_size < 0 or request.page_size > MAX_PAGE:
            raise InvalidArgument("page_size", f"{request.page_size} is out of range: 0 (default) to {MAX_PAGE}")
        after = ""
        if request.page_token:
            try:
                after = base64.b64decode(request.page_token.encode(), altchars=b"-_", validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                after = ""
            if not after:
                raise InvalidArgument("page_token", "is not a token this service gave")
        members, more, total = self.engine.list_members(
            request.segment_id, after=after, limit=request.page_size or DEFAULT_PAGE
        )
        response = segmentation_pb2.ListMembersResponse(total=total)
        for person_id, since in members:
            set_seconds(response.members.add(person_id=person_id).since, since)
        if more and members:
            response.next_page_token = base64.urlsafe_b64encode(members[-1][0].encode()).decode()
        return response

    async def GetMembership(
        self, request: segmentation_pb2.GetMembershipRequest, context
    ) -> segmentation_pb2.GetMembershipResponse:
        if not request.person_id:
            raise InvalidArgument("person_id", "is required")
        response = segmentation_pb2.GetMembershipResponse(person_id=request.person_id)
        for segment_id, since in sorted(self.engine.membership(request.person_id).items()):
            set_seconds(response.segments.add(segment_id=segment_id).since, since)
        return response

    async def ExplainMembership(
        self, request: segmentation_pb2.ExplainMembershipRequest, context
    ) -> segmentation_pb2.ExplainMembershipResponse:
        check_segment_id(request.segment_id, "segment_id")
        if not request.person_id:
            raise InvalidArgument("person_id", "is required")
        check_key("persons", request.person_id, field="person_id")
        return await self.explainer.explain(request, context)


__all__ = [
    "MAX_DESCRIPTION",
    "MAX_NAME",
    "SCOPES",
    "SegmentationApi",
    "check_labels",
    "check_readable",
    "definition_node",
    "segment_message",
]
