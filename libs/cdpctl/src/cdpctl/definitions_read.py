"""Reading what people defined from the running services, through their gRPC APIs only: the sections of the
definitions document (definitions_document.py). `cdpctl definitions export` writes what this reads;
`import` reads the target platform the same way and compares definition by definition.

Left out on purpose: computed traits a segment or a journey reads (`seg_<hash>`: their segment or journey
defines them again) and those a deployed model reads (scoring defines them again at every start);
identity's quarantines (an identifier value is customer data, and `ListQuarantined` does not tell a
hand-set one from one the rules set). What an API cannot give is listed in the document's
`not_included`, with the service and the RPC that is missing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from cdpctl.definitions_document import ordered_segments, plain

SERVICES = {
    "computed_traits": "profile",
    "segments": "segmentation",
    "models": "scoring",
    "journeys": "orchestration",
    "identity": "identity",
    "crm": "crm",
}
LABELS = {
    "computed_traits": "computed traits",
    "segments": "segments",
    "models": "models",
    "journeys": "journeys",
    "identity": "identity",
    "crm": "crm connections",
}
TIMEOUT = 30.0
PAGE = 500
OWNED_PREFIX = "seg_"  # computed traits named by the hash of a segment's or journey's event condition


def _dict(message) -> dict[str, Any]:
    return plain(json_format.MessageToDict(message, preserving_proto_field_name=True))


@dataclass
class Services:
    """One stub per service, the caller's metadata, and what could not be read (`not_included`)."""

    stubs: dict[str, Any]
    metadata: tuple
    not_included: list[dict[str, str]] = field(default_factory=list)
    model_traits: set[str] = field(default_factory=set)  # the computed traits deployed models read
    # Each journey's revision as read: an import changes a journey only while it is still as read.
    revisions: dict[str, int] = field(default_factory=dict)

    def gap(self, kind: str, what: str, missing: str, name: str = "") -> None:
        entry = {"kind": kind, "what": what, "missing": missing}
        if name:
            entry["name"] = name
        self.not_included.append(entry)

    async def call(self, service: str, rpc: str, request, **options):
        return await getattr(self.stubs[service], rpc)(request, metadata=self.metadata, timeout=TIMEOUT, **options)


# --- one reader per kind --------------------------------------------------------------------------


async def read_models(s: Services) -> list[dict[str, Any]]:
    from cdp.scoring.v1 import scoring_pb2

    reply = await s.call("scoring", "ListModels", scoring_pb2.ListModelsRequest())
    models = []
    for model in sorted(reply.models, key=lambda m: m.name):
        versions = []
        for version in sorted(model.versions, key=lambda v: _version_key(v.spec.version)):
            entry = {
                "version": version.spec.version,
                "sha256": version.sha256,
                "role": scoring_pb2.Role.Name(version.role).removeprefix("ROLE_").lower(),
            }
            if version.role == scoring_pb2.ROLE_CANARY:
                entry["canary_percent"] = plain(version.canary_percent)
            if version.role != scoring_pb2.ROLE_INACTIVE:
                s.model_traits.update(str(t["name"]) for t in version.spec.computed_traits if "name" in t)
            versions.append(entry)
        models.append({"name": model.name, "live_version": model.live_version, "versions": versions})
    if models:
        s.gap(
            "models",
            "the ONNX files of the versions (the document holds each version's sha256)",
            "scoring: no RPC returns a version's file (ListModels and GetModel carry the spec only)",
        )
    return models


def _version_key(version: str) -> tuple:
    """1.10.0 after 1.9.0: numbers compare as numbers, the rest as text."""
    parts = version.replace("-", ".").split(".")
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


async def read_computed_traits(s: Services) -> list[dict[str, Any]]:
    from cdp.profile.v1 import profile_pb2

    reply = await s.call("profile", "ListComputedTraits", profile_pb2.ListComputedTraitsRequest())
    traits = [_dict(status.definition) for status in reply.traits]
    return sorted((t for t in traits if not _owned(s, t["name"])), key=lambda t: t["name"])


def _owned(s: Services, name: str) -> bool:
    """Defined again by what reads it: a segment's or journey's condition, or a deployed model (scoring
    defines its models' traits again at every start, over any other definition of the name)."""
    return name.startswith(OWNED_PREFIX) or name in s.model_traits


async def read_segments(s: Services) -> list[dict[str, Any]]:
    from cdp.segmentation.v1 import segmentation_pb2

    listed, token = [], ""
    while True:  # every page: ListSegments answers at most 1,000 segments (and under 3 MiB) a call
        page = await s.call(
            "segmentation", "ListSegments", segmentation_pb2.ListSegmentsRequest(page_size=PAGE, page_token=token)
        )
        listed.extend(page.segments)
        token = page.next_page_token
        if not token:
            break
    segments, depends_on = [], {}
    for segment in listed:
        entry = {"id": segment.id, "definition": segment.text}
        if segment.name:
            entry["name"] = segment.name
        if segment.description:
            entry["description"] = segment.description
        segments.append(entry)
        depends_on[segment.id] = list(segment.depends_on)
    return ordered_segments(segments, depends_on)


async def read_journeys(s: Services) -> list[dict[str, Any]]:
    from cdp.orchestration.v1 import orchestration_pb2 as pb

    states = [pb.JOURNEY_STATE_DRAFT, pb.JOURNEY_STATE_ACTIVE, pb.JOURNEY_STATE_PAUSED, pb.JOURNEY_STATE_ARCHIVED]
    listed, token = [], ""
    while True:
        page = await s.call(
            "orchestration", "ListJourneys", pb.ListJourneysRequest(states=states, page_size=PAGE, page_token=token)
        )
        listed.extend(page.journeys)
        token = page.next_page_token
        if not token:
            break
    journeys = []
    for journey in sorted(listed, key=lambda j: j.id):
        s.revisions[journey.id] = journey.revision
        versions = []
        for number in range(1, journey.version + 1):
            shown = await s.call(
                "orchestration", "GetJourney", pb.GetJourneyRequest(journey_id=journey.id, version=number)
            )
            versions.append(_dict(shown.definition))
        draft = None
        if journey.draft_version and not journey.version:
            draft = _dict(journey.definition)  # never published: what ListJourneys shows is the draft
        elif journey.draft_version:
            draft = await _draft(s, journey.id)
            if draft is not None and draft.get("version") != journey.draft_version:
                # an orchestration older than GetJourney's `draft` answers with the live version
                draft = None
                s.gap(
                    "journeys",
                    f"draft v{journey.draft_version} (unpublished edits after live v{journey.version})",
                    "orchestration: GetJourney has no `draft` in this release (upgrade orchestration to export it)",
                    journey.id,
                )
        state = pb.JourneyState.Name(journey.state).removeprefix("JOURNEY_STATE_").lower()
        journeys.append({"id": journey.id, "state": state, "versions": versions, "draft": draft})
    return journeys


async def _draft(s: Services, journey_id: str) -> dict[str, Any] | None:
    """The journey's draft; None when it was published or discarded since ListJourneys."""
    import grpc

    from cdp.orchestration.v1 import orchestration_pb2 as pb

    try:
        shown = await s.call("orchestration", "GetJourney", pb.GetJourneyRequest(journey_id=journey_id, draft=True))
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise
    return _dict(shown.definition)


async def read_identity(s: Services) -> dict[str, Any]:
    from cdp.identity.v1 import identity_pb2

    s.gap(
        "identity",
        "merge rules (identifier types, limits, windows, blocked values): CDP_IDENTITY_RULES_FILE",
        "identity: no RPC returns the rules in use",
    )
    s.gap(
        "identity",
        "quarantined identifiers (SetQuarantine): identifier values are customer data",
        "identity: ListQuarantined does not tell identifiers quarantined by hand from those the rules quarantined",
    )
    reply = await s.call("identity", "GetMatchingModel", identity_pb2.GetMatchingModelRequest())
    if reply.origin == "default" or not reply.model_json:
        return {"matching_model": None}
    return {"matching_model": {"origin": reply.origin, "model": plain(json.loads(reply.model_json))}}


async def read_crm(s: Services) -> list[dict[str, Any]]:
    from cdp.crm.v1 import crm_pb2

    reply = await s.call("crm", "ListConnections", crm_pb2.ListConnectionsRequest())
    connections = []
    for connection in sorted(reply.connections, key=lambda c: c.id):
        mappings = []
        for mapping in connection.mappings:
            entry = _dict(mapping)
            entry["mode"] = crm_pb2.Mode.Name(mapping.mode).removeprefix("MODE_").lower()
            mappings.append(entry)
        connections.append(
            {
                "id": connection.id,
                "kind": crm_pb2.CrmKind.Name(connection.kind).removeprefix("CRM_KIND_").lower(),
                "account": connection.account,
                "url": connection.url,
                "credentials": {name: {"env": variable} for name, variable in sorted(connection.credentials.items())},
                "mappings": mappings,
            }
        )
    if connections:
        s.gap(
            "crm",
            "limits, on_delete, inbound, webhooks, auth_url, mappings' about and field transforms",
            "crm: Connection and Mapping (ListConnections) do not carry them; no RPC returns the connections document",
        )
    return connections


# Models first: the computed traits a deployed model reads are left out of computed_traits.
READERS: dict[str, Callable[[Services], Any]] = {
    "models": read_models,
    "computed_traits": read_computed_traits,
    "segments": read_segments,
    "journeys": read_journeys,
    "identity": read_identity,
    "crm": read_crm,
}
