"""A journey's draft through the API: `GetJourney(draft=true)` reads it and `DiscardDraft` throws it away.

A draft is the journey's next version, saved (UpdateJourney) and not yet published. GetJourney without
`draft` shows the live version once there is one, so an edit in progress was out of sight of anything
reading journeys back (`cdpctl definitions export` among them); with `draft` it is the draft, published
versions beside it or not, and NOT_FOUND when the journey has none.

DiscardDraft removes the draft and keeps the rest: published versions, state, running instances (none of
them runs a draft). It is idempotent: a journey without a draft answers OK with `discarded` false, so a
retried call, or two people discarding at once, both succeed. A journey never published is refused
(FAILED_PRECONDITION): its draft is all it holds, and a journey with no definition at all is no journey;
it is archived instead (`domain.lifecycle.discard_draft`). It needs `orchestration:admin`, the scope that
saves a draft.

A discard decided on a draft someone else saved again before the discard was stored is refused (ABORTED,
`journey_changes.JourneyChanged`: read it again); one whose draft was discarded or published meanwhile answers
`discarded` false; one that raced a change of state is decided again (`journeys.Journeys.change`). A discard
given `expected_revision` (the journey's revision as its caller read it) is made only on the journey at that
revision, and refused (ABORTED) otherwise, a repeat of one that succeeded included.

`DraftCalls` is a part of `api.OrchestrationApi` (through `api_journeys.JourneyCalls`, whose GetJourney reads
the draft here).
"""

from __future__ import annotations

import logging

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_kit.errors import InvalidArgument, NotFound
from cdp_orchestration.api_base import ApiBase, expected_revision
from cdp_orchestration.domain import lifecycle
from cdp_orchestration.journey_changes import draft_as_read_or_gone
from cdp_orchestration.messages import required

log = logging.getLogger("cdp.orchestration")


class DraftCalls(ApiBase):
    """The draft's RPCs of OrchestrationService (a part of `api.OrchestrationApi`)."""

    async def DiscardDraft(self, request, context) -> pb.DiscardDraftResponse:
        journey_id = required(request.journey_id, "journey_id")
        expected = expected_revision(request)
        changed = await self._change(journey_id, _discard, draft_as_read_or_gone, expected)
        if changed.saved is None:
            return pb.DiscardDraftResponse(journey=await self._journey(journey_id), discarded=False)
        version = changed.read.record.draft.version
        log.info("journey %s: draft v%d discarded", journey_id, version)
        return pb.DiscardDraftResponse(
            journey=await self._journey(journey_id),
            discarded=True,
            discarded_version=version,
        )

    async def _draft(self, journey_id: str, version: int) -> pb.Journey:
        """GetJourney with `draft`: the journey with its draft's definition."""
        if version:
            raise InvalidArgument(
                "version", f"{version} and draft both asked for: give a published version, or draft (version 0)"
            )
        record = await self._record(journey_id)
        if record.draft is None:
            live = f"live v{record.live.version}" if record.live is not None else "never published"
            raise NotFound(f"journey {journey_id} has no draft ({live}); UpdateJourney saves one")
        return await self._journey(journey_id, draft=True)


def _discard(record: lifecycle.JourneyRecord) -> lifecycle.JourneyRecord | None:
    """The record without its draft; None (nothing to save) when it has none."""
    return lifecycle.discard_draft(record) if record.draft is not None else None
