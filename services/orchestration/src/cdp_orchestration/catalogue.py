"""The catalogue journeys are validated against (`domain.document.Catalogue`), from what is available.

Two sources, each optional, combined:

- a configured file (`CDP_ORCHESTRATION_CATALOGUE_FILE`, JSON or YAML), each key optional (absent: that
  part is not checked):

      events: ["Cart Abandoned", "Order Completed"]        # every event name there is
      segments: ["vip", "churn-risk"]
      purposes: ["Marketing", "Analytics"]
      fields: {"scores": ["churn_risk"], "computed": [...]} # known names under these roots only

- the profile service (`CDP_PROFILE_ADDRESS`): the computed traits it defines are the known
  `computed.<name>` fields, added to the file's; those of kind count or sum are the catalogue's `counted`
  fields, which a journey's conditions read as 0 where a person has none (`computed.orders < 1` holds for
  someone who never ordered), as segments do;
- the segmentation service (`CDP_SEGMENTATION_ADDRESS`): the segments it has (ListSegments) are the known
  segments, added to the file's;
- the scoring service (`CDP_SCORING_ADDRESS`): the scores its deployed models write (ListModels) are the
  known `scores.<name>` fields, added to the file's.

A journey reading a field under a root the catalogue lists, with a name it does not know, or naming a
segment that does not exist, is refused with the node and field named (ValidateJourney, CreateJourney,
UpdateJourney, and PublishJourney, which checks the version going live again). When a service cannot be
asked, what the others give is used while a journey is edited (an outage must not stop journeys being
edited), but a publish whose journey names segments or scores waits for the service that knows them
(`current(required=...)`: UNAVAILABLE, naming it): a journey must not go live on a segment nobody checked.

`segments()` is the list of segments as segmentation has it now (None: not configured or not answering),
for a journey's warnings: a live journey entering on a segment deleted since says so when it is read.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
import orjson

from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from cdp.segmentation.v1 import segmentation_pb2, segmentation_pb2_grpc
from cdp_kit.errors import Unavailable
from cdp_kit.profile_fields import COMPUTED, ROOTS, SCORES
from cdp_kit.yamltext import YAMLError, load_yaml
from cdp_orchestration.domain.conditions import counted_fields
from cdp_orchestration.domain.document import Catalogue

log = logging.getLogger("cdp.orchestration.catalogue")

# The profile's computed traits, name -> op ("count", "last", ...); names alone (no op known) read as not counted.
ComputedTraits = Callable[[], Awaitable[Mapping[str, str] | frozenset[str]]]
Names = Callable[[], Awaitable[frozenset[str] | None]]  # None: nothing to check against yet

PROFILE, SEGMENTATION, SCORING = "profile", "segmentation", "scoring"
SEGMENTS_PAGE = 1_000  # the most ListSegments answers a call


class CatalogueError(ValueError):
    """A catalogue file that cannot be used; the message names the file's key."""


def read_catalogue(path: str) -> Catalogue:
    text = Path(path).read_text()
    try:
        document = load_yaml(text) if path.endswith((".yaml", ".yml")) else orjson.loads(text)
    except (orjson.JSONDecodeError, YAMLError) as error:
        raise CatalogueError(f"{path}: not valid JSON or YAML: {error}") from None
    return parse_catalogue(document, path)


def parse_catalogue(document: Any, where: str = "catalogue") -> Catalogue:
    if not isinstance(document, Mapping):
        raise CatalogueError(f"{where}: must be a mapping with events, segments, purposes and/or fields")
    unknown = sorted(set(document) - {"events", "segments", "purposes", "fields"})
    if unknown:
        raise CatalogueError(f"{where}: unknown key {unknown[0]!r}; known: events, segments, purposes, fields")

    def names(key: str, value: Any) -> frozenset[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise CatalogueError(f"{where}: {key} must be a list of names")
        return frozenset(value)

    fields = document.get("fields") or {}
    if not isinstance(fields, Mapping) or not set(fields) <= set(ROOTS):
        raise CatalogueError(f"{where}: fields must map roots ({', '.join(ROOTS)}) to lists of names")
    return Catalogue(
        events=names("events", document["events"]) if "events" in document else None,
        segments=names("segments", document["segments"]) if "segments" in document else None,
        purposes=names("purposes", document["purposes"]) if "purposes" in document else None,
        names={root: names(f"fields.{root}", value) for root, value in fields.items()},
    )


def profile_computed_traits(channel: grpc.aio.Channel, token: str) -> ComputedTraits:
    """The computed traits the profile service defines (ListComputedTraits), each name with its op."""
    stub = profile_pb2_grpc.ProfileServiceStub(channel)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()

    async def computed() -> dict[str, str]:
        response = await stub.ListComputedTraits(
            profile_pb2.ListComputedTraitsRequest(), metadata=metadata, timeout=5.0
        )
        return {t.definition.name: t.definition.op for t in response.traits}

    return computed


def live_segments(channel: grpc.aio.Channel, token: str) -> Names:
    """The ids of the segments the segmentation service has now (ListSegments, segmentation:read)."""
    stub = segmentation_pb2_grpc.SegmentationServiceStub(channel)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()

    async def listed() -> frozenset[str]:
        # Every page: ListSegments answers at most 1,000 segments (and under 3 MiB) a call, and a segment on
        # a later page is as real as one on the first (a journey naming it must not be refused).
        ids: set[str] = set()
        token = ""
        while True:
            answer = await stub.ListSegments(
                segmentation_pb2.ListSegmentsRequest(page_size=SEGMENTS_PAGE, page_token=token),
                metadata=metadata,
                timeout=5.0,
            )
            ids.update(segment.id for segment in answer.segments)
            token = answer.next_page_token
            if not token:
                return frozenset(ids)

    return listed


def deployed_scores(channel: grpc.aio.Channel, token: str) -> Names:
    """The scores the models deployed on the scoring service write, every version's (ListModels, scoring:read);
    None while it has no model yet (scores are then not checked, as segmentation does)."""
    stub = scoring_pb2_grpc.ScoringServiceStub(channel)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()

    async def listed() -> frozenset[str] | None:
        answer = await stub.ListModels(scoring_pb2.ListModelsRequest(), metadata=metadata, timeout=5.0)
        if not answer.models:
            return None
        return frozenset(o.score for m in answer.models for v in m.versions for o in v.spec.outputs if o.score)

    return listed


class Catalogues:
    """The catalogue for the next validation: the configured one, with what the services say exists."""

    def __init__(
        self,
        configured: Catalogue | None = None,
        computed: ComputedTraits | None = None,
        *,
        segments: Names | None = None,
        scores: Names | None = None,
    ) -> None:
        self.configured = configured
        self.computed = computed
        self.live_segments = segments
        self.scores = scores

    async def current(self, *, required: frozenset[str] = frozenset()) -> Catalogue | None:
        """The catalogue now. A service named in `required` (SEGMENTATION, SCORING) that is configured must
        answer (Unavailable naming it otherwise); the others are left out when they do not."""
        catalogue = self.configured
        base = catalogue or Catalogue()
        names = dict(base.names)
        segments = base.segments
        counted = base.counted
        changed = False
        for service, source, root in (
            (PROFILE, self.computed, COMPUTED),
            (SEGMENTATION, self.live_segments, None),
            (SCORING, self.scores, SCORES),
        ):
            if source is None:
                continue
            known = await _ask(service, source, service in required)
            if known is None:
                continue
            changed = True
            if root is None:
                segments = (segments or frozenset()) | frozenset(known)
            else:
                names[root] = names.get(root, frozenset()) | frozenset(known)
            if service == PROFILE and isinstance(known, Mapping):
                counted = counted | counted_fields(known)
        if not changed:
            return catalogue
        return Catalogue(base.events, base.fields, segments, base.purposes, names, counted)

    async def segments(self) -> frozenset[str] | None:
        """The segments segmentation has now; None when it is not configured or does not answer."""
        if self.live_segments is None:
            return None
        return await _ask(SEGMENTATION, self.live_segments, False)


async def _ask(service: str, source: Callable[[], Awaitable[Any]], required: bool) -> Any:
    try:
        return await source()
    except grpc.aio.AioRpcError as exc:
        if required:
            raise Unavailable(
                f"the {service} service could not be asked what exists ({exc.code().name}); the journey is not "
                "checked against it, so it is not published: publish again once it answers"
            ) from None
        log.warning("%s not read from the %s service (%s): not checked", _WHAT[service], service, exc.code().name)
        return None


_WHAT = {PROFILE: "computed traits", SEGMENTATION: "segments", SCORING: "deployed models' scores"}
