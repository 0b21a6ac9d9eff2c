"""gRPC ProfileService: protobuf in, engine and domain calls, protobuf out."""

from __future__ import annotations

import base64
import binascii
import json
import math
import uuid

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from cdp.identity.v1 import identity_pb2, identity_pb2_grpc
from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from cdp_kit.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from cdp_kit.interceptors import current_caller
from cdp_kit.person_export import DELETE_SCOPE, EXPORT_SCOPE
from cdp_kit.timestamps import from_seconds, set_seconds, to_seconds
from cdp_profile.backfill import Backfill, check_owner
from cdp_profile.domain import ComputedTrait, Profile
from cdp_profile.engine import ProfileEngine
from cdp_profile.events import (
    dict_to_struct,
    python_to_value,
    struct_to_dict,
)
from cdp_profile.routing import Router

SCOPES = {
    "GetProfile": "profile:read",
    "BatchGetProfiles": "profile:read",
    "LookupProfile": "profile:read",
    # A person's event history with its properties: a data subject's record, like `Export`; no service
    # reads it, and every service holds profile:read.
    "ListEvents": EXPORT_SCOPE,
    "ListComputedTraits": "profile:read",
    # The whole record of a person: the scope of a data subject's access request, not a reader's.
    "Export": EXPORT_SCOPE,
    "UpdateTraits": "profile:write",
    "DefineComputedTrait": "profile:admin",
    "DeleteComputedTrait": "profile:admin",
    # Erasure is not an admin's of profile: scoring, segmentation and orchestration hold profile:admin
    # (they define computed traits), and must not be able to erase and suppress people.
    "Delete": DELETE_SCOPE,
}

MAX_BATCH = 500
# How long a computed trait's deletion waits for segmentation to say what reads it (it asks orchestration
# within 5 s itself); segmentation deleting its own traits waits 10 s for the answer.
READERS_TIMEOUT = 8.0
MAX_PAGE = 1000
# A ListEvents page ends early, with a token for the rest, once its events pass this: a page of 1,000
# events of up to 32 KB (the collector's limit) is 32 MB, past the 16 MiB a service sends, and a person's
# full page was refused RESOURCE_EXHAUSTED after it was built, whatever the token.
PAGE_MAX_BYTES = 8 * 1024 * 1024
CONSENT_PREFIXES = ("purpose:", "channel:")


def _provenance(version, out: profile_pb2.Provenance) -> None:
    out.source = version.source
    out.event_id = version.event_id
    set_seconds(out.at, version.at)
    if getattr(version, "recorded_at", None) is not None:
        set_seconds(out.recorded_at, version.recorded_at)


def profile_message(profile: Profile, *, now: float, as_of: float | None, history: bool) -> profile_pb2.Profile:
    view = profile.view(now=now, as_of=as_of)
    out = profile_pb2.Profile(person_id=profile.person_id, event_count=view.event_count)
    for name, version in view.traits.items():
        trait = out.traits[name]
        python_to_value(version.value, trait.value)
        _provenance(version, trait.provenance)
        if history:
            for old in profile.trait_history(name):
                if as_of is not None and old.at > as_of:
                    continue
                item = trait.history.add()
                python_to_value(old.value, item.value)
                _provenance(old, item.provenance)
    for group, version in view.groups.items():
        python_to_value(version.value, out.groups[group].value)
        _provenance(version, out.groups[group].provenance)
    for name, value in view.computed.items():
        python_to_value(value, out.computed[name])
    for key, state in view.consent.items():
        consent = out.consent[key]
        consent.granted = state.granted
        _provenance(state, consent.provenance)
        if history:
            for old in state.history:
                if as_of is not None and old.at > as_of:
                    continue
                item = consent.history.add(granted=old.granted)
                _provenance(old, item.provenance)
    for name, score in view.scores.items():
        out.scores[name].CopyFrom(
            profile_pb2.Score(value=score.value, model=score.model, version=score.version, at=from_seconds(score.at))
        )
    out.identifiers.extend(sorted(view.identifiers))
    out.merged_from.extend(view.merged_from)
    if view.first_seen is not None:
        set_seconds(out.first_seen, view.first_seen)
    if view.last_seen is not None:
        set_seconds(out.last_seen, view.last_seen)
    if as_of is not None:
        set_seconds(out.as_of, as_of)
    return out


def _identity_violation(exc: grpc.aio.AioRpcError) -> tuple[str, str]:
    """Identity's refusal of a look-up, on this request's field: its `identifier.type` (an unknown type,
    with the known ones) is our `identifier_type`; anything else about the identifier, `identifier_value`."""
    try:
        status = rpc_status.from_call(exc)
    except ValueError:
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            for violation in bad.field_violations:
                if violation.field == "identifier.type":
                    return "identifier_type", violation.description
                return "identifier_value", violation.description
    return "identifier_value", exc.details() or "rejected by identity"


# Views of this many persons at most are kept (`current_message`); past it the oldest one goes.
MAX_VIEWS = 200_000


class _View:
    """A person's `GetProfile` answer and what it was built from: valid for as long as the profile object
    is the one it was built from (`HotProfiles` drops a view whenever the profile is written or the state
    reloaded) and no windowed computed value has aged (`until`)."""

    __slots__ = ("message", "profile", "until")

    def __init__(self, profile: Profile, message: profile_pb2.Profile, until: float) -> None:
        self.profile = profile
        self.message = message
        self.until = until


def current_message(views: dict, profile: Profile, *, now: float) -> profile_pb2.Profile:
    """The profile as `GetProfile` answers it without history or `as_of`: built once per change and
    shared by every read until the next one (the message is never changed after it is built)."""
    view = views.get(profile.person_id)
    if view is not None and view.profile is profile and now < view.until:
        return view.message
    message = profile_message(profile, now=now, as_of=None, history=False)
    expiry = profile.next_expiry()
    if len(views) >= MAX_VIEWS and profile.person_id not in views:
        del views[next(iter(views))]
    views[profile.person_id] = _View(profile, message, math.inf if expiry is None else expiry)
    return message


def definition_from_message(message: profile_pb2.ComputedTraitDefinition) -> ComputedTrait:
    document: dict = {"name": message.name, "op": message.op}
    if message.event_type:
        document["event_type"] = message.event_type
    if message.event_names:
        document["event_names"] = list(message.event_names)
    if message.property:
        document["property"] = message.property
    if message.HasField("where"):
        document["where"] = struct_to_dict(message.where)
    if message.window:
        document["window"] = message.window
    if message.compare:
        document["compare"] = message.compare
    return ComputedTrait.from_dict(document)


def status_message(backfill: Backfill) -> profile_pb2.ComputedTraitStatus:
    d = backfill.trait.to_dict()
    definition = profile_pb2.ComputedTraitDefinition(
        name=d["name"],
        op=d["op"],
        event_type=d.get("event_type") or "",
        event_names=d.get("event_names") or [],
        property=d.get("property") or "",
        window=str(d.get("window") or ""),  # already the shortest text ("30d")
        compare=d.get("compare") or "",
    )
    if d.get("where"):
        definition.where.CopyFrom(dict_to_struct(d["where"]))
    return profile_pb2.ComputedTraitStatus(
        definition=definition,
        state=backfill.state,
        profiles_done=backfill.done,
        profiles_total=backfill.total,
        defined_at=from_seconds(backfill.defined_at),
    )


def _named(readers) -> str:
    """`'vip' (VIP customers), 'churn'`: ids with their names where they have one (never definitions)."""
    return ", ".join(f"{r.id!r} ({r.name})" if r.name and r.name != r.id else repr(r.id) for r in readers)


def _versions(models) -> str:
    """`'churn_risk' 1.1.0 (live), 'churn_risk' 1.0.0 (inactive)`: model versions with their roles."""
    return ", ".join(f"{m.name!r} {m.version}" + (f" ({m.role})" if m.role else "") for m in models)


def _page_token(cursor) -> str:
    return "" if cursor is None else base64.urlsafe_b64encode(json.dumps(list(cursor)).encode()).decode()


def _cursor(token: str):
    if not token:
        return None
    try:
        return tuple(json.loads(base64.urlsafe_b64decode(token.encode())))
    except (ValueError, binascii.Error, TypeError):
        raise InvalidArgument("page_token", "is not a token this service returned; start without one") from None


class ProfileApi(profile_pb2_grpc.ProfileServiceServicer):
    def __init__(
        self,
        engine: ProfileEngine,
        identity: identity_pb2_grpc.IdentityServiceStub | None = None,
        *,
        identity_token: str = "",
        router: Router | None = None,
        segmentation: segmentation_pb2_grpc.SegmentationServiceStub | None = None,
        segmentation_token: str = "",
    ) -> None:
        self.engine = engine
        self.identity = identity
        self.router = router
        self._identity_metadata = (("authorization", f"Bearer {identity_token}"),) if identity_token else ()
        # Asked which segments and live journeys read a computed trait before it is deleted; None: not asked.
        self.segmentation = segmentation
        self._segmentation_metadata = (("authorization", f"Bearer {segmentation_token}"),) if segmentation_token else ()

    def _owner(self, person_id: str) -> int | None:
        return None if self.router is None else self.router.owner(person_id)

    async def _forward(self, ordinal: int, method: str, request, context):
        """Ask the replica that owns the person; its answer (or error) is ours."""
        assert self.router is not None
        stub = self.router.stub(ordinal, context)
        try:
            return await getattr(stub, method)(request, metadata=self.router.metadata(context), timeout=30)
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "", trailing_metadata=tuple(exc.trailing_metadata() or ()))

    async def GetProfile(self, request: profile_pb2.GetProfileRequest, context) -> profile_pb2.Profile:
        if not request.person_id:
            raise InvalidArgument("person_id", "is required")
        if (owner := self._owner(request.person_id)) is not None:
            return await self._forward(owner, "GetProfile", request, context)
        profile = await self.engine.profile(request.person_id)
        if not request.include_history and not request.HasField("as_of"):
            return current_message(self.engine.hot.views, profile, now=self.engine.clock())
        as_of = to_seconds(request.as_of) if request.HasField("as_of") else None
        return profile_message(profile, now=self.engine.clock(), as_of=as_of, history=request.include_history)

    async def BatchGetProfiles(
        self, request: profile_pb2.BatchGetProfilesRequest, context
    ) -> profile_pb2.BatchGetProfilesResponse:
        if len(request.person_ids) > MAX_BATCH:
            raise InvalidArgument("person_ids", f"{len(request.person_ids)} ids; at most {MAX_BATCH} per call")
        response = profile_pb2.BatchGetProfilesResponse()
        now = self.engine.clock()
        remote: dict[int, list[str]] = {}
        for index, person in enumerate(request.person_ids):
            if not person:
                raise InvalidArgument(f"person_ids[{index}]", "is empty")
            if (owner := self._owner(person)) is not None:
                remote.setdefault(owner, []).append(person)
                continue
            try:
                profile = await self.engine.profile(person)
            except NotFound:
                response.missing.append(person)
                continue
            if request.include_history:
                response.profiles.append(profile_message(profile, now=now, as_of=None, history=True))
            else:
                response.profiles.append(current_message(self.engine.hot.views, profile, now=now))
        for owner, persons in remote.items():
            part = await self._forward(
                owner,
                "BatchGetProfiles",
                profile_pb2.BatchGetProfilesRequest(person_ids=persons, include_history=request.include_history),
                context,
            )
            response.profiles.extend(part.profiles)
            response.missing.extend(part.missing)
        return response

    async def LookupProfile(self, request: profile_pb2.LookupProfileRequest, context) -> profile_pb2.Profile:
        if not request.identifier_type:
            raise InvalidArgument("identifier_type", "is required (user_id, email, phone, anonymous_id, ...)")
        if not request.identifier_value:
            raise InvalidArgument("identifier_value", "is required")
        if self.identity is None:
            raise Unavailable("no identity service configured (CDP_IDENTITY_ADDRESS)", retry_after=5.0)
        try:
            found = await self.identity.Lookup(
                identity_pb2.LookupRequest(
                    identifier=identity_pb2.Identifier(type=request.identifier_type, value=request.identifier_value)
                ),
                timeout=5.0,
                metadata=self._identity_metadata,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"no person holds this {request.identifier_type}") from None
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                field, message = _identity_violation(exc)
                raise InvalidArgument(field, message) from None
            raise Unavailable(f"identity lookup failed: {exc.code().name} {exc.details()}", retry_after=1.0) from None
        if (owner := self._owner(found.person_id)) is not None:
            forwarded = profile_pb2.GetProfileRequest(
                person_id=found.person_id, include_history=request.include_history
            )
            if request.HasField("as_of"):
                forwarded.as_of.CopyFrom(request.as_of)
            return await self._forward(owner, "GetProfile", forwarded, context)
        profile = await self.engine.profile(found.person_id)
        if not request.include_history and not request.HasField("as_of"):
            return current_message(self.engine.hot.views, profile, now=self.engine.clock())
        as_of = to_seconds(request.as_of) if request.HasField("as_of") else None
        return profile_message(profile, now=self.engine.clock(), as_of=as_of, history=request.include_history)

    async def ListEvents(self, request: profile_pb2.ListEventsRequest, context) -> profile_pb2.ListEventsResponse:
        if not request.person_id:
            raise InvalidArgument("person_id", "is required")
        if (owner := self._owner(request.person_id)) is not None:
            return await self._forward(owner, "ListEvents", request, context)
        size = request.page_size or 50
        if not 1 <= size <= MAX_PAGE:
            raise InvalidArgument("page_size", f"{size} is out of range: 1..{MAX_PAGE}")
        profile = await self.engine.profile(request.person_id)
        entries, cursor = profile.events(
            limit=size, before=_cursor(request.page_token), types=tuple(request.types), names=tuple(request.names)
        )
        response = profile_pb2.ListEventsResponse()
        size = 0
        for index, entry in enumerate(entries):
            event = response.events.add(
                event_id=entry.event_id,
                type=entry.type,
                name=entry.name,
                at=from_seconds(entry.at),
                properties=dict_to_struct(entry.properties),
                source=entry.source,
            )
            size += event.ByteSize()
            if size > PAGE_MAX_BYTES and index + 1 < len(entries):
                cursor = entry.cursor()  # the page ends here; the next one goes on after this entry
                break
        response.next_page_token = _page_token(cursor)
        return response

    async def UpdateTraits(self, request: profile_pb2.UpdateTraitsRequest, context) -> profile_pb2.UpdateTraitsResponse:
        if not request.person_id:
            raise InvalidArgument("person_id", "is required")
        if (owner := self._owner(request.person_id)) is not None:
            return await self._forward(owner, "UpdateTraits", request, context)
        traits = struct_to_dict(request.traits) if request.HasField("traits") else {}
        for key in request.consent:
            if not key.startswith(CONSENT_PREFIXES) or key.partition(":")[2] == "":
                raise InvalidArgument(f"consent[{key!r}]", "keys are 'purpose:<Name>' or 'channel:<name>'")
        if not traits and not request.consent:
            raise InvalidArgument("traits", "give at least one trait or consent entry")
        at = to_seconds(request.at) if request.HasField("at") else None
        profile, change = await self.engine.update_traits(
            request.person_id,
            traits,
            dict(request.consent),
            source=request.source or "api",
            at=at,
            request_id=request.request_id or uuid.uuid4().hex,
        )
        return profile_pb2.UpdateTraitsResponse(
            profile=profile_message(profile, now=self.engine.clock(), as_of=None, history=False),
            changed=sorted(change.traits),
        )

    async def DefineComputedTrait(
        self, request: profile_pb2.DefineComputedTraitRequest, context
    ) -> profile_pb2.ComputedTraitStatus:
        if not request.HasField("definition"):
            raise InvalidArgument("definition", "is required")
        trait = definition_from_message(request.definition)
        return status_message(await self.engine.define(trait, current_caller()))

    async def ListComputedTraits(
        self, request: profile_pb2.ListComputedTraitsRequest, context
    ) -> profile_pb2.ListComputedTraitsResponse:
        return profile_pb2.ListComputedTraitsResponse(
            traits=[status_message(b) for _name, b in sorted(self.engine.backfills.items())]
        )

    async def DeleteComputedTrait(
        self, request: profile_pb2.DeleteComputedTraitRequest, context
    ) -> profile_pb2.DeleteComputedTraitResponse:
        if not request.name:
            raise InvalidArgument("name", "is required")
        known = self.engine.backfills.get(request.name)
        if known is None:
            raise NotFound(f"no computed trait named {request.name!r}", reason="unknown_trait")
        check_owner(known, current_caller(), "delete")  # before naming its readers to a caller who may not
        if not request.force:
            await self._refuse_while_read(request.name)
        await self.engine.undefine(request.name, current_caller())
        return profile_pb2.DeleteComputedTraitResponse()

    async def _refuse_while_read(self, name: str) -> None:
        """FailedPrecondition naming the segments, live journeys and deployed model versions that read the
        computed trait, as segmentation answers (it asks orchestration for the journeys, scoring for the
        models); Unavailable when it cannot be asked: a trait is never deleted from under its readers
        blindly. Not configured: nothing is asked."""
        if self.segmentation is None:
            return
        try:
            readers = await self.segmentation.ListComputedTraitReaders(
                segmentation_pb2.ListComputedTraitReadersRequest(name=name),
                metadata=self._segmentation_metadata,
                timeout=READERS_TIMEOUT,
            )
        except grpc.aio.AioRpcError as exc:
            detail = exc.details() if exc.code() == grpc.StatusCode.UNAVAILABLE else ""
            raise Unavailable(
                f"what reads computed trait {name!r} could not be learnt from the segmentation service "
                f"({exc.code().name}{': ' + detail if detail else ''}); try again, or force the deletion",
                retry_after=5.0,
                reason="segmentation_unavailable",
            ) from None
        parts = []
        if readers.segments:
            parts.append(f"segments {_named(readers.segments)}")
        if readers.journeys:
            parts.append(f"live journeys {_named(readers.journeys)}")
        if readers.models:
            parts.append(f"deployed models {_versions(readers.models)}")
        if parts:
            raise FailedPrecondition(
                f"computed trait {name!r} is read by {' and '.join(parts)}: they would read it as missing (0 for "
                "a count or sum, a model's feature its default) once it is deleted; change or delete them first, "
                "or force the deletion",
                reason="computed_trait_in_use",
            )

    async def Export(self, request: profile_pb2.ExportRequest, context) -> profile_pb2.ExportResponse:
        if not request.person_id:
            raise InvalidArgument("person_id", "is required")
        if (owner := self._owner(request.person_id)) is not None:
            return await self._forward(owner, "Export", request, context)
        person_id, document = await self.engine.export(request.person_id)
        return profile_pb2.ExportResponse(person_id=person_id, document=dict_to_struct(document))

    async def export_person(self, person_id: str, merged_person_ids, context) -> dict:
        """PrivacyService/ExportPerson: what `Export` returns (the profile follows merges, so a person
        merged into this one is in it), and the profile of any merged person still held apart (identity
        merged them after profile last heard); a person profile does not hold (unknown, or deleted): {}."""
        documents: list[dict] = []
        for asked in (person_id, *merged_person_ids):
            document = await self._export_document(asked, context)
            if document and all(d["person_id"] != document["person_id"] for d in documents):
                documents.append(document)
        if not documents:
            return {}
        first, *others = documents
        return {**first, "held_apart": others} if others else first

    async def _export_document(self, person_id: str, context) -> dict | None:
        if (owner := self._owner(person_id)) is not None:
            assert self.router is not None
            stub = self.router.stub(owner, context)
            try:
                reply = await stub.Export(
                    profile_pb2.ExportRequest(person_id=person_id), metadata=self.router.metadata(context), timeout=30
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return None
                await context.abort(
                    exc.code(), exc.details() or "", trailing_metadata=tuple(exc.trailing_metadata() or ())
                )
            return struct_to_dict(reply.document)
        try:
            _person, document = await self.engine.export(person_id)
        except NotFound:
            return None
        return document

    async def Delete(self, request: profile_pb2.DeleteRequest, context) -> profile_pb2.DeleteResponse:
        if not request.person_id:
            raise InvalidArgument("person_id", "is required")
        if (owner := self._owner(request.person_id)) is not None:
            return await self._forward(owner, "Delete", request, context)
        if request.mode == profile_pb2.DELETE_MODE_UNSPECIFIED:
            raise InvalidArgument("mode", "choose DELETE_MODE_DELETE or DELETE_MODE_SUPPRESS_WITH_DELETE")
        result = await self.engine.delete(
            request.person_id,
            suppress=request.mode == profile_pb2.DELETE_MODE_SUPPRESS_WITH_DELETE,
            request_id=request.request_id or None,
        )
        return profile_pb2.DeleteResponse(
            request_id=result["request_id"],
            identifiers=result["identifiers"],
            timeline_events=result["timeline_events"],
            suppressed=result["suppressed"],
        )


__all__ = ["SCOPES", "ProfileApi", "current_message", "profile_message"]
